"""Which model classes a saved file changed, read from its source (control plane; no import).

Dev mode compares only the tables of what changed. A file's top-level classes are hashed one by
one (normalised AST, as revision checksums are: comments and formatting do not count), and every
other top-level statement together: imports, constants, `Table(...)` objects, helper functions.
Between two versions of a file the changed classes are those whose hash differs, appeared or
disappeared; when anything outside the classes changed, a class body may mean something else
(a constant it uses, an imported type), so the whole file is compared.

Parsing and hashing are what a save costs here (at 1000 classes, a third of a second on the path
from save to applied), so a file is cut at the lines that start a top-level statement and each
piece is parsed and hashed once per distinct text: a save re-parses only the pieces it changed.
A cut inside a statement (a string or bracket left open, a clause like `else:`) leaves a piece
that does not parse on its own; the whole file is parsed then, as before.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from reconciler.core.headers import node_hash


@dataclass(frozen=True)
class FileDigest:
    classes: Mapping[str, str]  # top-level class name -> hash of its definition
    rest: str  # hash of every other top-level statement, in order


_LINES = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")  # line ends as Python's tokenizer counts them
_CLAUSE = re.compile(r"(?:else|elif|except|finally)\b")
_KEPT = 20_000  # pieces kept (a few MB at most); then the memo starts again
_pieces: dict[str, tuple[tuple[ast.stmt, str | None], ...]] = {}  # text -> (statement, class hash)


def _cut(text: str) -> list[str]:
    """The source cut before each line that may start a top-level statement (not indented, not
    a comment, a closing bracket, a clause of the statement above, or after a decorator)."""
    pieces: list[str] = []
    current: list[str] = []
    decorated = False
    for line in _LINES.findall(text):
        head = line[:1]
        code = bool(head) and not head.isspace() and head != "#"
        if code and current and not decorated and head not in ")]}" and not _CLAUSE.match(line):
            pieces.append("".join(current))
            current = []
        current.append(line)
        if code:
            decorated = head == "@"
    if current:
        pieces.append("".join(current))
    return pieces


def _piece(text: str) -> tuple[tuple[ast.stmt, str | None], ...] | None:
    """The statements of one piece with each class's hash, memoised by the piece's text; None
    when the piece does not parse alone."""
    found = _pieces.get(text)
    if found is None:
        try:
            body = ast.parse(text).body
        except (SyntaxError, ValueError):
            return None
        found = tuple((stmt, node_hash(stmt) if isinstance(stmt, ast.ClassDef) else None) for stmt in body)
        if len(_pieces) >= _KEPT:
            _pieces.clear()
        _pieces[text] = found
    return found


def _misplaced_future(statements: list[tuple[ast.stmt, str | None]]) -> bool:
    """A future import after other code: a whole parse refuses it, a piece's parse does not."""
    opening = True  # the docstring and future imports that may come first
    for n, (stmt, _) in enumerate(statements):
        future = isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"
        docstring = n == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
        if future and not opening:
            return True
        opening = opening and (future or docstring)
    return False


def _statements(source: bytes) -> list[tuple[ast.stmt, str | None]] | None:
    """The top-level statements of a source, each class's with its hash; None: does not parse."""
    try:
        pieces = _cut(source.decode("utf-8"))
    except UnicodeDecodeError:
        pieces = []  # another coding cookie: parse the bytes whole
    out: list[tuple[ast.stmt, str | None]] = []
    for text in pieces:
        found = _piece(text)
        if found is None:
            break
        out.extend(found)
    else:
        if pieces and not _misplaced_future(out):
            return out
    try:
        body = ast.parse(source).body
    except (SyntaxError, ValueError):
        return None
    return [(stmt, node_hash(stmt) if isinstance(stmt, ast.ClassDef) else None) for stmt in body]


def digest(source: bytes) -> FileDigest | None:
    """The digest of a model file's source; None when it does not parse."""
    statements = _statements(source)
    if statements is None:
        return None
    classes: dict[str, str] = {}
    rest = ast.Module(body=[], type_ignores=[])
    for stmt, one in statements:
        if isinstance(stmt, ast.ClassDef) and stmt.name not in classes:
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
