"""Which model classes a save changed, from the source alone (dev mode's compare scope)."""

from __future__ import annotations

import ast

import pytest

from reconciler.core.headers import node_hash
from reconciler.project.modelscan import FileDigest, changed_classes, digest

pytestmark = pytest.mark.core

BEFORE = b"""\
from myapp import db

NAME = 50


class User(db.Model):
    id = db.Column(db.Integer, primary_key=True)


class Post(db.Model):
    id = db.Column(db.Integer, primary_key=True)
"""


def changed(after: bytes) -> frozenset[str] | None:
    return changed_classes(digest(BEFORE), digest(after))


def test_formatting_and_comments_change_nothing() -> None:
    reformatted = BEFORE.replace(b"\n", b"\r\n").replace(b"primary_key=True", b"primary_key = True")
    assert changed(reformatted + b"# a comment\n") == frozenset()


def test_a_changed_class_is_named_alone() -> None:
    after = BEFORE + b"    title = db.Column(db.String(NAME))\n"
    assert changed(after) == {"Post"}


def test_added_and_removed_classes_are_named() -> None:
    after = BEFORE.split(b"\n\nclass Post")[0] + b"\n\nclass Tag(db.Model):\n    id = 1\n"
    assert changed(after) == {"Post", "Tag"}


@pytest.mark.parametrize(
    "after",
    [
        BEFORE.replace(b"NAME = 50", b"NAME = 80"),  # a constant a class body may use
        BEFORE.replace(b"from myapp import db", b"from other import db"),
        BEFORE + b"tags = db.Table('tags', db.Column('id', db.Integer))\n",  # an imperative table
        BEFORE + b"    broken = (\n",  # does not parse: the worker reports where
    ],
)
def test_code_outside_the_classes_means_the_whole_file(after: bytes) -> None:
    assert changed(after) is None


def test_no_earlier_digest_means_the_whole_file() -> None:
    assert changed_classes(None, digest(BEFORE)) is None


TRICKY = b'''"""Models."""
from __future__ import annotations
import x

@dec
@dec2(
    1)
class A(B):
    a = 1
# a comment at column 0 inside a class
    b = 2

if X:
    pass
else:
    y = 1
try:
    import q
except ImportError:
    q = None
s = """
class Q:
    pass
"""
z = 1 + \\
2
class A: pass
'''


def whole_parse_digest(source: bytes) -> FileDigest | None:
    """What the digest was before files were parsed piece by piece: one `ast.parse`."""
    tree = ast.parse(source)
    classes: dict[str, str] = {}
    rest = ast.Module(body=[], type_ignores=[])
    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef) and stmt.name not in classes:
            classes[stmt.name] = str(node_hash(stmt))
        else:
            rest.body.append(stmt)
    return FileDigest(classes, str(node_hash(rest)))


@pytest.mark.parametrize(
    "source",
    [BEFORE, BEFORE.replace(b"\n", b"\r\n"), TRICKY, b"import x\nfrom __future__ import annotations\n", b""],
)
def test_a_file_read_piece_by_piece_digests_as_a_whole_parse(source: bytes) -> None:
    assert digest(source) == whole_parse_digest(source)
    assert digest(source) == whole_parse_digest(source)  # from the memo


def test_a_string_that_looks_like_a_class_is_not_one() -> None:
    after = TRICKY.replace(b"class Q:\n    pass", b"class Q:\n    passed = 1")
    assert changed_classes(digest(TRICKY), digest(after)) is None  # the string is code outside classes
