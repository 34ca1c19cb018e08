"""``mixed_precision = "auto"``: bf16 where the device computes it natively, float32 elsewhere."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import spacy
import torch

from spacy_ctx.backends import precision
from spacy_ctx.backends.precision import cpu_bf16_support, resolve_precision
from spacy_ctx.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["The bank raised rates. We sat on the river bank.", "Apple is buying a startup in London."]
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw {extra}
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw {extra}
"""


def _without_torch_checks(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)


@pytest.mark.parametrize(
    "extra, native",
    [("avx512_bf16 avx512_vnni", True), ("amx_bf16 amx_tile", True), ("avx512_vnni", False), ("", False)],
)
def test_cpuinfo_flags_decide_without_torch_checks(tmp_path, monkeypatch, extra, native):
    _without_torch_checks(monkeypatch)
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra=extra))
    found, reason = cpu_bf16_support(path)
    assert found is native
    assert "/proc/cpuinfo" in reason


def test_unreadable_cpuinfo_means_fp32(tmp_path, monkeypatch):
    _without_torch_checks(monkeypatch)
    assert cpu_bf16_support(tmp_path / "missing")[0] is False


def test_torch_checks_win_over_cpuinfo(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra="avx512_bf16"))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert cpu_bf16_support(path) == (False, "CPU without AVX-512 BF16 or AMX (torch.cpu)")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_bf16_support(path) == (True, "CPU with AMX (torch.cpu)")


def test_this_machine_agrees_with_its_cpuinfo():
    """torch's answer and /proc/cpuinfo's flags agree on the machine running the tests."""
    flags = precision._cpuinfo_flags()
    if flags is None or not hasattr(torch.cpu, "_is_avx512_bf16_supported"):
        pytest.skip("no /proc/cpuinfo or no torch check to compare")
    assert cpu_bf16_support()[0] == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_resolution_of_each_setting(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_bf16_cached", lambda: (True, "CPU with avx512_bf16"))
    assert resolve_precision(None, "cpu").precision == "fp32"
    assert resolve_precision("bf16", "cpu").precision == "bf16"
    assert resolve_precision("fp16", "cpu").dtype == torch.float16
    auto = resolve_precision("auto", "cpu")
    assert auto.precision == "bf16" and auto.dtype == torch.bfloat16 and "avx512_bf16" in auto.reason
    monkeypatch.setattr(precision, "_cpu_bf16_cached", lambda: (False, "CPU without avx512_bf16"))
    assert resolve_precision("auto", "cpu").precision == "fp32"
    assert resolve_precision("auto", "cpu").dtype is None
    assert resolve_precision("auto", "meta").precision == "fp32"
    with pytest.raises(ConfigError, match="mixed_precision"):
        resolve_precision("int8", "cpu")


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_on_cuda_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    choice = resolve_precision("auto", "cuda:0")
    assert choice.precision == expected
    assert f"{capability[0]}.{capability[1]}" in choice.reason


def _nlp(family: str, source, **model):
    nlp = spacy.blank("en")
    if family == "bert":
        config = {"name": str(source), **model}
        nlp.add_pipe("ctx_bert", config={"model": config, "store": "all"})
    else:
        options, weights = source
        config = {"options": str(options), "weights": str(weights), **model}
        nlp.add_pipe("ctx_elmo", config={"model": config, "store": "all"})
    nlp.initialize()
    return nlp


def _layers(nlp):
    return np.concatenate([np.asarray(doc._.ctx.layers) for doc in nlp.pipe(TEXTS)], axis=1)


@pytest.fixture(params=["bert", "elmo"])
def encoder(request, tiny_bert_dir, tiny_elmo_files):
    return request.param, tiny_bert_dir if request.param == "bert" else tiny_elmo_files


@pytest.mark.parametrize("native", [True, False])
def test_auto_runs_like_bf16_where_native_else_like_fp32(encoder, monkeypatch, native, caplog):
    family, source = encoder
    monkeypatch.setattr(precision, "_cpu_bf16_cached", lambda: (native, "test CPU"))
    # ELMo's "auto" stays float32 on CPU (its LSTM loop is slower in bf16 there).
    bf16 = native and family == "bert"
    expected = _layers(_nlp(family, source, mixed_precision="bf16" if bf16 else None))
    with caplog.at_level(logging.INFO, logger="spacy_ctx"):
        nlp = _nlp(family, source, mixed_precision="auto")
        got = _layers(nlp)
    np.testing.assert_array_equal(got, expected)
    backend = nlp.get_pipe(f"ctx_{family}").backend
    assert backend.precision == ("bf16" if bf16 else "fp32")
    info = backend.precision_info()
    reason = "auto: test CPU" if family == "bert" else "auto: bf16 is slower than float32 for elmo on cpu"
    assert info["mixed_precision"] == "auto" and info["reason"] == reason
    assert f"mixed_precision = 'auto' runs in {backend.precision} on cpu ({reason})" in caplog.text


def test_elmo_auto_uses_bf16_on_a_native_gpu(tiny_elmo_files, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    backend = _nlp("elmo", tiny_elmo_files, mixed_precision="auto").get_pipe("ctx_elmo").backend
    assert backend.precision_choice(torch.device("cuda:0")).precision == "bf16"


def test_auto_is_saved_as_auto(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "_cpu_bf16_cached", lambda: (False, "test CPU"))
    nlp = _nlp("bert", tiny_bert_dir, mixed_precision="auto")
    nlp.to_disk(tmp_path / "pipe")
    loaded = spacy.load(tmp_path / "pipe").get_pipe("ctx_bert").backend
    assert loaded.mixed_precision == "auto" and loaded.settings()["mixed_precision"] == "auto"


def test_load_time_config_overrides_win_over_the_saved_backend(encoder, tmp_path):
    """``spacy.load(path, config=...)`` overrides of the encoder's runtime settings apply
    to the loaded backend (the config, not backend.json, is the source of truth)."""
    family, source = encoder
    name = f"ctx_{family}"
    nlp = _nlp(family, source)
    ref = _layers(nlp)
    nlp.to_disk(tmp_path / "pipe")
    bf16_ref = _layers(_nlp(family, source, mixed_precision="bf16"))
    override = {"components": {name: {"model": {"mixed_precision": "bf16"}}}}
    loaded = spacy.load(tmp_path / "pipe", config=override)
    assert loaded.get_pipe(name).backend.mixed_precision == "bf16"
    np.testing.assert_array_equal(_layers(loaded), bf16_ref)
    # Without an override the saved setting (float32) is kept.
    plain = spacy.load(tmp_path / "pipe")
    assert plain.get_pipe(name).backend.mixed_precision is None
    np.testing.assert_array_equal(_layers(plain), ref)


def test_setting_precision_on_a_loaded_backend(tiny_elmo_files):
    nlp = _nlp("elmo", tiny_elmo_files)
    ref = _layers(nlp)
    backend = nlp.get_pipe("ctx_elmo").backend
    assert len(backend.word_cache) > 0
    backend.mixed_precision = "bf16"
    assert len(backend.word_cache) == 0  # cached embeddings were computed in float32
    low = _layers(nlp)
    assert not np.array_equal(low, ref)
    backend.mixed_precision = None
    np.testing.assert_array_equal(_layers(nlp), ref)
    with pytest.raises(ConfigError, match="mixed_precision"):
        backend.mixed_precision = "int8"


def test_bad_mixed_precision_names_the_choices(tiny_bert_dir):
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir), "mixed_precision": "bf8"}})
    with pytest.raises(ConfigError, match='"auto"'):
        nlp.initialize()


@pytest.mark.gpu
def test_auto_on_this_gpu(tiny_bert_dir):
    major, _ = torch.cuda.get_device_capability(0)
    nlp = _nlp("bert", tiny_bert_dir, mixed_precision="auto", device="cuda:0")
    assert nlp.get_pipe("ctx_bert").backend.precision == ("bf16" if major >= 8 else "fp32")
    assert len(_layers(nlp)) == 3
