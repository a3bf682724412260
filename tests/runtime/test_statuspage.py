"""The status page rendered from status documents of each state: the state in words, the pending
revisions and the guard's findings, the graph's nodes, the journal, the fleet; every value escaped,
no form and no script, and the password and an alert URL never on it."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from reconciler.core.graph import Revision, build_graph
from reconciler.core.graphlayout import layout
from reconciler.redact import register_url
from reconciler.runtime.alerthistory import AlertHistory
from reconciler.runtime.graphsvg import svg
from reconciler.runtime.statusdoc import STATUS_DEFAULTS
from reconciler.runtime.statuspage import PageData, render

CANARY = "Canary-pw-7731"


class Page(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.sections: dict[str, list[str]] = {}
        self._section: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag == "section":
            self._section = dict(self.tags[-1][1]).get("id")

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._section:
            self.sections.setdefault(self._section, []).append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._section = None

    def section_text(self, ident: str) -> str:
        return " ".join(self.sections.get(ident, []))

    def by_id(self, ident: str) -> dict[str, str]:
        return next(attrs for _tag, attrs in self.tags if attrs.get("id") == ident)

    @property
    def words(self) -> str:
        return " ".join(self.text)


def doc(**values: Any) -> dict[str, Any]:
    return {**STATUS_DEFAULTS, **values}


def graph_svg(count: int) -> str:
    revs = [
        Revision(f"r{n:04d}", (f"r{n - 1:04d}",) if n else (), (), (), Path("r.py"), f"m{n}", "h")
        for n in range(count)
    ]
    graph = build_graph(revs)
    parents = {r: graph.revisions[r].down_revisions for r in graph.revisions}
    marks = {r: "applied" if int(r[1:]) < count - 2 else "pending" for r in graph.revisions}
    labels = {r: graph.revisions[r].message for r in graph.revisions}
    return svg(layout(graph), parents, marks, labels, frozenset(graph.heads))


STATES = {
    "in_sync": doc(state="in_sync", sync_state="in_sync", db_heads=["r0009"], repo_heads=["r0009"]),
    "behind": doc(
        sync_state="behind",
        db_heads=["r0007"],
        repo_heads=["r0009"],
        pending=["r0008", "r0009"],
        guard={
            "findings": [
                {"revision": "r0009", "where": "r0009.py:14", "kind": "drop_column", "message": "loses data"}
            ]
        },
    ),
    "blocked": doc(sync_state="behind", state="blocked", conditions=["blocked"], pending=["r0008"]),
    "dirty": doc(sync_state="behind", state="dirty", conditions=["dirty"], dirty=["r0008"]),
    "drift": doc(
        sync_state="in_sync",
        conditions=["drift"],
        drift={"count": 1, "differences": [{"text": "column user.x only in the database"}]},
    ),
    "fleet": doc(
        sync_state="behind",
        fleet={
            "tenants": 3,
            "counts": {"in_sync": 1, "failed": 1, "held": 1},
            "failed": [{"name": "tenant_b", "revision": "r0009", "error": "boom"}],
            "wave": {"index": 1, "count": 3, "halted": True, "reason": "1 failed", "complete": False},
        },
    ),
}


@pytest.mark.parametrize("state", sorted(STATES))
def test_each_state_is_shown_in_words_with_its_parts(state: str) -> None:
    files = {"r0008": "r0008_add_email.py"}
    data = PageData(graph_svg=graph_svg(10), target="app", refresh=5, files=files)
    page = Page(render(STATES[state], data))
    shown = page.words
    assert "form" not in {t for t, _ in page.tags} and "script" not in {t for t, _ in page.tags}
    assert any(
        t == "meta" and a.get("http-equiv") == "refresh" and a.get("content") == "5" for t, a in page.tags
    )
    assert len([a for t, a in page.tags if t == "g" and "node" in a.get("class", "")]) == 10
    if state == "behind":
        assert "behind" in shown and "drop_column: loses data" in shown
        assert "r0008 (r0008_add_email.py)" in page.section_text("pending")  # with its file
        assert "warn" in page.by_id("state")["class"]
    if state == "in_sync":
        assert "good" in page.by_id("state")["class"]
    if state in ("blocked", "dirty"):  # the condition is the headline, the sync state beside it
        assert state in page.section_text("conditions") and "bad" in page.by_id("state")["class"]
        assert "(sync state: behind)" in shown
    if state == "drift":
        assert "column user.x only in the database" in shown
    if state == "fleet":
        assert "tenant_b" in shown and "Fleet (3 tenants)" in shown
        assert page.section_text("fleet").count("wave 2 of 3: halted. 1 failed") == 1


def test_values_are_escaped_and_secrets_redacted() -> None:
    register_url(f"postgresql://app:{CANARY}@db/app")
    hostile = doc(sync_state="behind", message=f"<script>alert(1)</script> password {CANARY}")
    html = render(
        hostile, PageData(journal=[{"revision": "<img src=x>", "outcome": "failed", "error": CANARY}])
    )
    assert "<script>" not in html and "<img" not in html and "&lt;script&gt;" in html
    assert CANARY not in html


def test_a_200_revision_history_weighs_under_100_kb() -> None:
    journal = [
        {"revision": f"r{n:04d}", "outcome": "applied", "duration_ms": 12, "host": "pod-1", "trigger": "tick"}
        for n in range(50)
    ]
    html = render(STATES["behind"], PageData(graph_svg=graph_svg(200), journal=journal))
    assert len(html.encode("utf-8")) < 100_000


def test_the_alert_history_shows_each_delivery_newest_first() -> None:
    history = AlertHistory(kept=2, clock=lambda: 1_700_000_000.0)
    seen: list[tuple[str, str]] = []
    history.counting("sent", lambda e, s: seen.append((e, s)))("blocked", "ops-webhook")
    history.record("failed", "recovered", "ops-webhook")
    history.record("dropped", "dirty", "slack")
    assert seen == [("blocked", "ops-webhook")]
    assert [r["event"] for r in history.rows()] == ["dirty", "recovered"]  # the oldest fell off
    page = Page(render(doc(sync_state="in_sync"), PageData(alerts=history.rows())))
    assert "dirty" in page.section_text("alerts") and "dropped" in page.section_text("alerts")
    assert "2023-11-14T22:13:20Z" in page.section_text("alerts")
