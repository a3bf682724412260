"""`reconciler test`'s rules: what differs between two schema fingerprints, the revisions to step
(`--since`), and the line that names a failing step."""

from __future__ import annotations

from collections.abc import Iterable

from reconciler.core.graph import RevisionGraph

STEPS = ("upgrade", "downgrade", "upgrade again")


def difference(expected: Iterable[str], found: Iterable[str]) -> list[str]:
    """Sentences of the fingerprint `found` against `expected`: what is missing, what is extra."""
    want, got = set(expected), set(found)
    return [f"missing {fact}" for fact in _ordered(want - got)] + [
        f"extra {fact}" for fact in _ordered(got - want)
    ]


_RANK = ("table", "enum", "sequence", "column", "index", "constraint", "foreign", "check")


def _ordered(facts: set[str]) -> list[str]:
    """Tables and types before what they hold: the first words of a failure line say the most."""
    kind = {k: n for n, k in enumerate(_RANK)}
    return sorted(facts, key=lambda f: (kind.get(f.split(" ", 1)[0], len(_RANK)), f))


def stepped(graph: RevisionGraph, changed: Iterable[str] | None) -> tuple[list[str], list[str]]:
    """(the revisions upgraded plainly first, the revisions stepped), both in apply order: every
    revision when `changed` is None, else the changed ones and their descendants."""
    order = graph.topological(graph.revisions)
    if changed is None:
        return [], order
    wanted = set(changed)
    picked = {rev for rev in order if graph.ancestors(rev) & wanted}
    # what is not picked has no picked ancestor (a descendant of a changed one is picked): it can
    # all be applied first
    return [r for r in order if r not in picked], [r for r in order if r in picked]


def failure_line(revision: str, step: str, error: str, difference: Iterable[str]) -> str:
    """One line per failing step: the revision, the step, and the error or the difference."""
    found = list(difference)
    detail = error or "; ".join(found[:6]) + (f"; and {len(found) - 6} more" if len(found) > 6 else "")
    return f"{revision}: {step}: {detail}"
