"""ctx_bert's copy of the pooled rows to the Doc: converted to the stored dtype on the
encoder's device first (``to_host``, ``quantize_rows_on_device``), with exactly the
values a conversion of the float32 rows on the host gives."""

import numpy as np
import pytest
import spacy
import torch

from spacy_ctx.ctx_data import quantize_rows
from spacy_ctx.pipeline.component import quantize_rows_on_device

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["The bank raised rates.", "We sat on the river bank , watching   boats.", "", "apple " * 40]


def test_device_quantization_equals_host_quantization():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn((2, 50, 24), generator=generator) * torch.logspace(-3, 3, 50)[None, :, None]
    rows[0, 3] = 0.0  # an all-zero row keeps scale 0 and zero values
    rows[1, 7, :] = torch.tensor([127.0, 0.5, -0.5, 1.5, 2.5, -2.5] + [0.0] * 18)  # ties to even
    values, scales = quantize_rows_on_device(rows)
    expected_values, expected_scales = quantize_rows(rows.numpy())
    assert values.dtype == np.int8 and scales.dtype == np.float32
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(scales, expected_scales)
    assert scales[0, 3] == 0 and not values[0, 3].any()
    empty_values, empty_scales = quantize_rows_on_device(torch.zeros((1, 0, 24)))
    assert empty_values.shape == (1, 0, 24) and empty_scales.shape == (1, 0)


@pytest.mark.parametrize("store", ["last", "all"])
def test_stored_dtypes_equal_the_float32_rows_converted(tiny_bert_dir, store):
    docs = {}
    for dtype in ("float32", "float16", "int8"):
        nlp = spacy.blank("en")
        nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}, "store": store,
                                         "store_dtype": dtype})
        nlp.initialize()
        docs[dtype] = list(nlp.pipe(TEXTS))
    for full, half, small in zip(docs["float32"], docs["float16"], docs["int8"]):
        rows = full._.ctx.layers
        assert rows.dtype == np.float32 and half._.ctx.stored.dtype == np.float16
        np.testing.assert_array_equal(half._.ctx.stored, rows.astype(np.float16))
        values, scales = quantize_rows(rows)
        assert small._.ctx.store_dtype == "int8"
        np.testing.assert_array_equal(small._.ctx.stored, values)
        np.testing.assert_array_equal(small._.ctx.scales, scales)
        np.testing.assert_array_equal(small._.ctx.piece_counts, full._.ctx.piece_counts)
