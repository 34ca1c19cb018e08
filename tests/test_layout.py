"""The import graph of spacy_ctx runs one way: pipeline -> thinc_layers -> backends -> encoders, pieces.

Every import in the package (module level or inside a function) is read from the
source with ``ast`` and checked against the allowed dependencies of its part.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Iterator, Set, Tuple

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "spacy_ctx"

# Part of the package -> the parts it may import (besides itself).
ALLOWED: Dict[str, Set[str]] = {
    "errors": set(),
    "ctx_data": set(),
    "assets": {"errors"},
    "loaders": {"errors", "assets"},
    "encoders": {"errors"},
    "pieces": {"errors"},
    "backends": {"errors", "encoders", "pieces"},
    "doc_data": {"ctx_data", "errors"},
    "thinc_layers": {"errors", "backends"},
    "architectures": {"errors", "loaders", "backends", "thinc_layers"},
    "pipeline": {"errors", "ctx_data", "doc_data", "backends", "thinc_layers"},
}
# Entry points and tools that sit above everything.
TOP = {"__init__", "__main__", "cli", "training_config", "training", "annotate", "model_info"}
# Third-party frameworks a part must not use: encoders are plain PyTorch, pieces and
# ctx_data know nothing of models, backends know nothing of Thinc or spaCy's classes.
FORBIDDEN_LIBRARIES: Dict[str, Set[str]] = {
    "encoders": {"spacy", "thinc", "tokenizers"},
    "pieces": {"spacy", "thinc", "torch"},
    "backends": {"thinc", "spacy"},
    "ctx_data": {"spacy", "thinc", "torch"},
    "errors": {"spacy", "thinc", "torch", "numpy"},
}


def _part(module: str) -> str:
    """'spacy_ctx.backends.bert' -> 'backends'; 'spacy_ctx.cli' -> 'cli'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts)


def _imports(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from . import x" / "from .. import x" import submodules by name.
            if not node.module:
                for alias in node.names:
                    yield node.lineno, f"{target}.{alias.name}"
            else:
                yield node.lineno, target


def _violations() -> Iterator[str]:
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        module = _module_name(path)
        part = _part(module)
        if part in TOP:
            continue
        assert part in ALLOWED, f"{path}: part {part!r} has no import rule; add it to ALLOWED"
        for line, target in _imports(path):
            top = target.split(".")[0]
            if top == "spacy_ctx":
                if target == "spacy_ctx":
                    yield f"{path}:{line} imports the package root (import the module instead)"
                    continue
                other = _part(target)
                if other != part and other not in ALLOWED[part]:
                    yield f"{path}:{line}: {part} may not import {target} ({other})"
            elif top in FORBIDDEN_LIBRARIES.get(part, set()):
                yield f"{path}:{line}: {part} may not import {top}"


def test_imports_run_one_way() -> None:
    found = list(_violations())
    assert not found, "upward or sideways imports:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source, location, expected",
    [
        ("from ..thinc_layers.listeners import x\n", "backends/bert.py", "backends may not import"),
        ("from ..pieces.chars import x\n", "encoders/elmo.py", "encoders may not import"),
        ("import spacy\n", "encoders/bert.py", "encoders may not import spacy"),
        ("from spacy_ctx.pipeline import component\n", "thinc_layers/x.py", "thinc_layers may not"),
    ],
)
def test_checker_catches_bad_imports(tmp_path, monkeypatch, source, location, expected) -> None:
    """The checker itself: a planted upward import is reported."""
    fake = tmp_path / "spacy_ctx"
    target = fake / location
    target.parent.mkdir(parents=True)
    target.write_text(source, encoding="utf8")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", fake)
    assert any(expected in v for v in _violations())
