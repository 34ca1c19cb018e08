"""Entry points and registries: what setup.cfg declares is what spaCy and srsly find.

Every name in ``[options.entry_points]`` must resolve through the registry that
reads its group (spaCy factories and architectures, srsly msgpack codecs) and
through ``importlib.metadata`` (the installed metadata must match setup.cfg).
Importing ``spacy_ctx`` must stay cheap, and building a pipeline must not load
weights.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.metadata as metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import spacy
import srsly
from spacy.language import Language
from spacy.tokens import DocBin

import spacy_ctx.loaders
from spacy_ctx.ctx_data import CtxData
from spacy_ctx.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
DIST_NAME = "spacy-ctx"


def declared_entry_points() -> List[Tuple[str, str, str]]:
    """(group, name, "module:attr") for every entry point in setup.cfg."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keep names as written
    assert parser.read(ROOT / "setup.cfg", encoding="utf8"), "setup.cfg not found"
    found = []
    for group, block in parser["options.entry_points"].items():
        for line in block.strip().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, target = (part.strip() for part in line.partition("="))
            assert name and ":" in target, f"malformed entry point in [{group}]: {line!r}"
            found.append((group, name, target))
    return found


DECLARED = declared_entry_points()
IDS = [f"{group}:{name}" for group, name, _ in DECLARED]


def import_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_in_registry(group: str, name: str) -> Any:
    """Look ``name`` up the way the library that reads ``group`` does."""
    if group == "spacy_factories":
        spacy.blank("en")  # Language() loads the spacy_factories entry points
        assert Language.has_factory(name), f"spaCy has no factory {name!r}"
        return spacy.registry.factories.get(name)
    if group.startswith("spacy_"):
        registry_name = group[len("spacy_"):]
        assert spacy.registry.has(registry_name, name), f"{registry_name}: no {name!r}"
        return getattr(spacy.registry, registry_name).get(name)
    if group.startswith("srsly_"):
        return getattr(srsly, group[len("srsly_"):]).get(name)
    if group.startswith("thinc_"):
        import thinc.api

        return thinc.api.registry.get(group[len("thinc_"):], name)
    raise AssertionError(f"setup.cfg declares entry points in an unknown group {group!r}")


def installed_entry_points() -> Dict[Tuple[str, str], metadata.EntryPoint]:
    dist = metadata.distribution(DIST_NAME)
    return {(ep.group, ep.name): ep for ep in dist.entry_points}


# --------------------------------------------------------------------------
# setup.cfg <-> registries <-> installed metadata
# --------------------------------------------------------------------------


def test_setup_cfg_declares_the_expected_entry_points() -> None:
    declared = {(group, name) for group, name, _ in DECLARED}
    assert ("spacy_factories", "ctx_bert") in declared
    assert ("spacy_architectures", "spacy_ctx.BertEncoder.v1") in declared
    assert ("srsly_msgpack_encoders", "spacy_ctx_data") in declared
    assert ("srsly_msgpack_decoders", "spacy_ctx_data") in declared
    assert len(declared) == len(DECLARED), "a name is declared twice in one group"


@pytest.mark.parametrize("group,name,target", DECLARED, ids=IDS)
def test_declared_name_resolves_in_its_registry(group: str, name: str, target: str) -> None:
    resolved = resolve_in_registry(group, name)
    assert callable(resolved)
    assert resolved is import_target(target), f"{group}:{name} is {resolved!r}, not {target}"


@pytest.mark.parametrize("group,name,target", DECLARED, ids=IDS)
def test_declared_name_is_installed_and_loads(group: str, name: str, target: str) -> None:
    installed = installed_entry_points()
    assert (group, name) in installed, (
        f"{group}:{name} is in setup.cfg but not in the installed metadata; "
        "reinstall the package (pip install -e .)"
    )
    entry_point = installed[(group, name)]
    assert entry_point.value.replace(" ", "") == target.replace(" ", ""), (
        f"installed {entry_point.value!r} differs from setup.cfg {target!r}; reinstall"
    )
    # The lookup spaCy and srsly do: by group, across all installed distributions.
    (by_group,) = [ep for ep in metadata.entry_points(group=group) if ep.name == name]
    loaded = by_group.load()
    assert callable(loaded)
    assert loaded is import_target(target)


def test_no_stale_installed_entry_points() -> None:
    declared = {(group, name): target for group, name, target in DECLARED}
    for key, entry_point in installed_entry_points().items():
        assert key in declared, (
            f"installed entry point {key} ({entry_point.value}) is no longer in setup.cfg; "
            "reinstall the package (pip install -e .)"
        )


def test_codec_round_trip_in_process() -> None:
    ctx = CtxData(
        layers=np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4),
        layer_names=["layer_1", "layer_2"],
        model_name="tiny",
        piece_counts=np.array([1, 0, 2], dtype=np.int32),
    )
    value = srsly.msgpack_loads(srsly.msgpack_dumps({"ctx": ctx, "other": [1, "x"]}))
    assert value["other"] == [1, "x"]
    restored = value["ctx"]
    assert isinstance(restored, CtxData)
    assert restored.layers.dtype == np.float16
    np.testing.assert_array_equal(restored.layers, ctx.layers)
    np.testing.assert_array_equal(restored.piece_counts, ctx.piece_counts)
    assert restored.layer_names == ctx.layer_names and restored.model_name == "tiny"


# --------------------------------------------------------------------------
# fresh interpreters
# --------------------------------------------------------------------------


def run_python(code: str, *args: str, timeout: float = 60) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_import_spacy_ctx_imports_neither_torch_nor_spacy() -> None:
    run_python(
        "import sys, spacy_ctx; assert 'torch' not in sys.modules and 'spacy' not in sys.modules"
    )
    # Nor does the msgpack codec, which srsly loads while spaCy itself is being imported.
    run_python(
        "import sys, srsly, spacy_ctx, numpy\n"
        "assert srsly.msgpack_loads(srsly.msgpack_dumps({'a': 1})) == {'a': 1}\n"
        "assert 'spacy_ctx.ctx_data' in sys.modules, 'the codec entry point was not loaded'\n"
        "heavy = [m for m in ('torch', 'spacy', 'thinc', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(spacy_ctx.__version__)"
    )


_FRESH_PROCESS_SCRIPT = r"""
import json, sys
import spacy
from spacy.tokens import DocBin
from spacy.vocab import Vocab

report = {}
# 1. The srsly decoder entry point turns stored dicts back into CtxData on its own.
docs = list(DocBin().from_bytes(open(sys.argv[1], "rb").read()).get_docs(Vocab()))
value = docs[0].user_data[("._.", "ctx", None, None)]
report["decoded_type"] = type(value).__module__ + "." + type(value).__name__
report["decoded_shape"] = list(value.layers.shape)
report["pipeline_imported_before_blank"] = "spacy_ctx.pipeline.factories" in sys.modules
# 2. Factories are found through entry points only (nothing imported them).
nlp = spacy.blank("en")
report["has_factory"] = spacy.language.Language.has_factory("ctx_bert")
component = nlp.add_pipe("ctx_bert", config={"model": {"name": sys.argv[2]}})
report["loaded_after_add_pipe"] = component.is_loaded
report["shape"] = list(nlp("Hello world")._.ctx.layers.shape)
print(json.dumps(report))
"""


def test_fresh_process_finds_codec_and_factory(tiny_bert_dir: Path, tmp_path: Path) -> None:
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}, "store": "all"})
    data_path = tmp_path / "docs.spacy"
    data_path.write_bytes(DocBin(store_user_data=True, docs=[nlp("Hello big world")]).to_bytes())
    output = run_python(_FRESH_PROCESS_SCRIPT, str(data_path), str(tiny_bert_dir))
    report = json.loads(output.strip().splitlines()[-1])
    assert report == {
        "decoded_type": "spacy_ctx.ctx_data.CtxData",
        "decoded_shape": [3, 3, 32],
        "pipeline_imported_before_blank": False,
        "has_factory": True,
        "loaded_after_add_pipe": False,
        "shape": [1, 2, 32],
    }


# --------------------------------------------------------------------------
# building a pipeline does no I/O
# --------------------------------------------------------------------------


@pytest.fixture
def loader_calls(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """Record checkpoint look-ups; hub downloads are forbidden (tests are offline)."""
    calls: List[str] = []
    resolve = spacy_ctx.loaders.resolve_bert_dir

    def counting_resolve(name):
        calls.append(str(name))
        return resolve(name)

    def no_download(repo_id):
        raise AssertionError(f"tried to download {repo_id!r}")

    monkeypatch.setattr(spacy_ctx.loaders, "resolve_bert_dir", counting_resolve)
    monkeypatch.setattr(spacy_ctx.loaders, "download_from_hub", no_download)
    return calls


def test_add_pipe_does_not_load_weights(tiny_bert_dir: Path, loader_calls: List[str]) -> None:
    nlp = spacy.blank("en")
    component = nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}})
    assert not component.is_loaded
    assert nlp.pipe_names == ["ctx_bert"] and nlp.config["components"]["ctx_bert"]
    assert loader_calls == []
    doc = nlp("Hello world")  # first use loads
    assert component.is_loaded and loader_calls == [str(tiny_bert_dir)]
    assert doc._.ctx.layers.shape == (1, 2, 32)
    nlp("Once more")
    assert loader_calls == [str(tiny_bert_dir)]  # loaded once


def test_add_pipe_with_default_hub_model_does_no_io(loader_calls: List[str]) -> None:
    nlp = spacy.blank("en")
    component = nlp.add_pipe("ctx_bert")  # default model: resolved (and loaded) only on first use
    assert not component.is_loaded
    assert loader_calls == []


def test_add_pipe_with_missing_directory_defers_the_error(
    tmp_path: Path, loader_calls: List[str]
) -> None:
    nlp = spacy.blank("en")
    component = nlp.add_pipe("ctx_bert", config={"model": {"name": str(tmp_path / "nope")}})
    assert not component.is_loaded
    with pytest.raises(CheckpointError, match="nope"):
        nlp("Hello")


def test_architecture_builds_an_unloaded_model(
    tiny_bert_dir: Path, loader_calls: List[str]
) -> None:
    from spacy_ctx.thinc_layers.backend_layer import ensure_backend, get_backend

    build = spacy.registry.architectures.get("spacy_ctx.BertEncoder.v1")
    model = build(name=str(tiny_bert_dir))
    assert get_backend(model) is None and loader_calls == []
    model.initialize()
    assert get_backend(model) is ensure_backend(model) is not None
    assert loader_calls == [str(tiny_bert_dir)]


def test_pipeline_from_its_own_config(tiny_bert_dir: Path) -> None:
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}, "store": "all"})
    rebuilt = spacy.util.load_model_from_config(nlp.config, auto_fill=True)
    assert rebuilt.pipe_names == ["ctx_bert"]
    assert not rebuilt.get_pipe("ctx_bert").is_loaded
    text = "The bank rose by the river ."
    np.testing.assert_array_equal(rebuilt(text)._.ctx.layers, nlp(text)._.ctx.layers)
