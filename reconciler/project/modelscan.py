"""Which model classes a saved file changed, read from its source (control plane; no import).

Dev mode compares only the tables of what changed. A file's top-level classes are hashed one by
one (normalised AST, as revision checksums are: comments and formatting do not count), and every
other top-level statement together: imports, constants, `Table(...)` objects, helper functions.
Between two versions of a file the changed classes are those whose hash differs, appeared or
disappeared; when anything outside the classes changed, a class body may mean something else
(a constant it uses, an imported type), so the whole file is compared.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from reconciler.core.headers import node_hash


@dataclass(frozen=True)
class FileDigest:
    classes: Mapping[str, str]  # top-level class name -> hash of its definition
    rest: str  # hash of every other top-level statement, in order


def digest(source: bytes) -> FileDigest | None:
    """The digest of a model file's source; None when it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    classes: dict[str, str] = {}
    rest = ast.Module(body=[], type_ignores=[])
    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef) and stmt.name not in classes:
            one = node_hash(stmt)
            if one is None:
                return None
            classes[stmt.name] = one
        else:
            rest.body.append(stmt)  # a second class of the same name rebinds it: part of "rest"
    rest_hash = node_hash(rest)
    return None if rest_hash is None else FileDigest(MappingProxyType(classes), rest_hash)


def read_digest(path: Path) -> FileDigest | None:
    try:
        return digest(path.read_bytes())
    except OSError:
        return None


def changed_classes(old: FileDigest | None, new: FileDigest | None) -> frozenset[str] | None:
    """The classes that differ between two digests of one file; None: compare the whole file
    (no earlier digest, the file does not parse or is gone, or code outside classes changed)."""
    if old is None or new is None or old.rest != new.rest:
        return None
    names = set(old.classes) | set(new.classes)
    return frozenset(n for n in names if old.classes.get(n) != new.classes.get(n))
