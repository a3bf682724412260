"""Which model classes a save changed, from the source alone (dev mode's compare scope)."""

from __future__ import annotations

import pytest

from reconciler.project.modelscan import changed_classes, digest

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
