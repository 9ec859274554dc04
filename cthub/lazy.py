"""Lazy package APIs (PEP 562): a stage package declares its public names once, as imports under
`if TYPE_CHECKING:` (so that mypy types `from hub import from_pretrained`), and each name is imported from
its module on first use, so that `cthub --help` or a light import loads no heavy library:

    if TYPE_CHECKING:
        from finetune.train import FitResult, fit

    __getattr__, __all__ = lazy_package(__name__, __file__)

The runtime reads the name -> module mapping from that import block of the package's own source (the same
idea as scientific-python's lazy_loader stubs, without a second file), so the list is never written twice.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def type_checking_imports(source: str) -> dict[str, tuple[str, str]]:
    """{public name: (module, name in that module)} for the `from module import ...` statements under the
    module-level `if TYPE_CHECKING:` blocks of `source`."""
    exports: dict[str, tuple[str, str]] = {}
    for node in ast.parse(source).body:
        if not (
            isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        ):
            continue
        for statement in node.body:
            if not isinstance(statement, ast.ImportFrom) or statement.level or statement.module is None:
                raise ValueError(
                    f"line {statement.lineno}: only `from module import name` goes under TYPE_CHECKING"
                )
            for alias in statement.names:
                exports[alias.asname or alias.name] = (statement.module, alias.name)
    return exports


def lazy_package(package: str, init_file: str) -> tuple[Callable[[str], Any], list[str]]:
    """`(__getattr__, __all__)` for `package`, whose `__init__.py` is `init_file`: the public names
    are those imported under its `if TYPE_CHECKING:` block, each imported from its module when first used."""
    exports = type_checking_imports(Path(init_file).read_text(encoding="utf-8"))
    public = sorted(exports)

    def __getattr__(name: str) -> Any:
        if name in exports:
            module, attribute = exports[name]
            return getattr(importlib.import_module(module), attribute)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, public


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package` that imports `exports[name]` when `name` is first used
    (the explicit-mapping form, for a package whose names are not declared under TYPE_CHECKING)."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
