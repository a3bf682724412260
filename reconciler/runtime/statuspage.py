"""The status page (`GET /`): what an SRE looks at instead of reading `/status`'s JSON.

Rendered on the server from the same redacted status document, with the standard library only
(`html.escape` on every value): the state in words and colour, its conditions, the database's
heads against the repository's, the pending revisions with the guard's findings, the revision graph
(`graphsvg`), the journal's last steps, the lock holder, the alert history, drift and, with
`[fleet]`, the tenants by state (just below the heads). It reloads itself with a meta refresh; it
has no form and no script. The whole page goes through `redact` once more before it is served.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any, Protocol

from reconciler.core.graph import RevisionGraph
from reconciler.core.graphlayout import layout
from reconciler.core.state import applied_revisions
from reconciler.redact import redact
from reconciler.runtime.graphsvg import svg

GOOD = {"in_sync", "ahead"}
BAD = {"blocked", "dirty", "diverged", "multiple_heads", "unknown", "failed", "checksum_mismatch"}
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
.state{display:inline-block;padding:.2em .7em;border-radius:.3em;color:#fff;font-weight:600}
.good{background:#1a7f37}.warn{background:#b7791f}.bad{background:#c53030}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}
.graph .edge{stroke:#888;stroke-width:2}.graph circle{stroke:#333;stroke-width:1.5}
.graph .applied circle{fill:#1a7f37}.graph .pending circle{fill:#fff}.graph .draft circle{fill:#b7791f}
.graph .tenants circle{fill:#bbb}
.graph text{font:12px monospace}
"""


@dataclass(frozen=True)
class PageData:
    """What the page shows besides the status document (each part optional)."""

    graph_svg: str = ""
    journal: Sequence[Mapping[str, Any]] = ()
    alerts: Sequence[Mapping[str, Any]] = ()
    lock_holder: str | None = None
    target: str = ""
    refresh: int = 10  # seconds between reloads; 0: none
    files: Mapping[str, str] = field(default_factory=dict)  # revision id -> its file's name


def render(doc: Mapping[str, Any], data: PageData) -> str:
    parts = [
        _head(data),
        _headline(doc, data.target),
        f'<p id="message">{escape(str(doc.get("message") or ""))}</p>',
        _conditions(doc.get("conditions") or ()),
        _heads(doc),
        _fleet(doc.get("fleet")),
        _pending(doc, data.files),
        _section("graph", "Revision graph", data.graph_svg) if data.graph_svg else "",
        _journal(data.journal),
        _section("lock", "Lock", escape(data.lock_holder) if data.lock_holder else "not held"),
        _alerts(data.alerts),
        _drift(doc.get("drift")),
        "</body></html>\n",
    ]
    return redact("".join(p for p in parts if p))


def _head(data: PageData) -> str:
    refresh = f'<meta http-equiv="refresh" content="{int(data.refresh)}">' if data.refresh > 0 else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"{refresh}<title>{escape(data.target or 'schema-reconciler')} status</title>"
        f"<style>{STYLE}</style></head><body>"
    )


def _headline(doc: Mapping[str, Any], target: str) -> str:
    """The state (the worst condition, else the sync state) in words and colour; the sync state
    beside it when a condition hides it (blocked, and behind)."""
    sync = str(doc.get("sync_state") or "unknown")
    state = str(doc.get("state") or "unknown")
    state = sync if state == "unknown" else state
    beside = f' <span id="sync">(sync state: {_words(sync)})</span>' if sync != state else ""
    return (
        f"<h1>{escape(target or 'schema-reconciler')}: "
        f'<span class="state {_tone(state)}" id="state">{_words(state)}</span>{beside}</h1>'
    )


def _words(state: str) -> str:
    return escape(state.replace("_", " "))


def _tone(state: str) -> str:
    return "good" if state in GOOD else "bad" if state in BAD else "warn"


def _section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{escape(title)}</h2>{body}</section>'


def _list(items: Iterable[str]) -> str:
    shown = [f"<li>{escape(i)}</li>" for i in items]
    return f"<ul>{''.join(shown)}</ul>" if shown else "<p>none</p>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(_text(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>" if body else "<p>none</p>"


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _conditions(conditions: Iterable[Any]) -> str:
    return _section("conditions", "Conditions", _list(str(c) for c in conditions))


def _heads(doc: Mapping[str, Any]) -> str:
    db, repo = list(doc.get("db_heads") or ()), list(doc.get("repo_heads") or ())
    rows = [("database", ", ".join(db) or "(none)"), ("repository", ", ".join(repo) or "(none)")]
    return _section("heads", "Heads", _table(("where", "heads"), rows))


def _pending(doc: Mapping[str, Any], files: Mapping[str, str]) -> str:
    pending = [str(p) for p in doc.get("pending") or ()]
    shown = [f"{p} ({files[p]})" if p in files else p for p in pending]
    guard = doc.get("guard") or {}
    findings = guard.get("findings", []) if isinstance(guard, Mapping) else []
    rows = [(f.get("revision"), f.get("where"), _finding(f)) for f in findings]
    body = _list(shown) + (
        "<h3>Guard findings</h3>" + _table(("revision", "where", "finding"), rows) if rows else ""
    )
    return _section("pending", f"Pending revisions ({len(pending)})", body)


def _finding(finding: Mapping[str, Any]) -> str:
    rule = f" [{finding['rule']}]" if finding.get("rule") else ""
    return f"{finding.get('kind')}{rule}: {finding.get('message')}"


def _journal(steps: Sequence[Mapping[str, Any]]) -> str:
    columns = ("revision", "outcome", "duration_ms", "host", "trigger", "error")
    rows = [tuple(step.get(c) for c in columns) for step in steps[:50]]
    return _section("journal", "Last journal steps", _table(columns, rows))


def _alerts(alerts: Sequence[Mapping[str, Any]]) -> str:
    rows = [(a.get("event"), a.get("at"), a.get("delivery")) for a in alerts]
    return _section("alerts", "Alerts", _table(("event", "when", "delivered"), rows))


def _drift(drift: Any) -> str:
    if not drift:
        return _section("drift", "Drift", "<p>none</p>")
    found = drift.get("differences", []) if isinstance(drift, Mapping) else []
    return _section(
        "drift", "Drift", _list(str(d.get("text", d)) if isinstance(d, Mapping) else str(d) for d in found)
    )


def _fleet(fleet: Any) -> str:
    if not isinstance(fleet, Mapping):
        return ""
    counts = sorted((fleet.get("counts") or {}).items())
    failed = [(t.get("name"), t.get("revision"), t.get("error")) for t in fleet.get("failed") or ()]
    wave = f'<p id="wave">{escape(_wave(fleet.get("wave") or {}))}</p>'
    body = _table(("state", "tenants"), counts) + wave + _table(("tenant", "revision", "error"), failed)
    return _section("fleet", f"Fleet ({fleet.get('tenants', 0)} tenants)", body)


def _wave(wave: Mapping[str, Any]) -> str:
    """The rollout's wave in words: which of how many, complete or halted and why."""
    if not wave:
        return "wave: none"
    where = f"wave {int(wave.get('index', 0)) + 1} of {wave.get('count', 1)}"
    if wave.get("halted"):
        return f"{where}: halted. {wave.get('reason') or ''}".strip()
    return f"{where}: {'complete' if wave.get('complete') else 'rolling out'}"


class CachedGraph(Protocol):
    @property
    def cached_graph(self) -> RevisionGraph | None: ...


def page_of(
    doc: Mapping[str, Any],
    project: CachedGraph,
    refresh: int,
    journal: Sequence[Mapping[str, Any]] = (),
    alerts: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The daemon's page: its status document, the graph its last run read, the journal's last
    steps and the alerts, as the loop cached them."""
    graph = project.cached_graph
    fleet = isinstance(doc.get("fleet"), Mapping)
    drawn = graph_of(graph, doc.get("db_heads") or (), fleet) if graph is not None else ""
    target = str(doc.get("target") or "")
    known = graph.revisions if graph is not None else {}
    files = {r: known[r].path.name for r in doc.get("pending") or () if r in known}  # the listed ones
    data = PageData(drawn, journal, alerts, doc.get("lock_holder"), target, refresh, files)
    return render(doc, data)


def graph_of(graph: RevisionGraph, db_heads: Iterable[str], fleet: bool = False) -> str:
    """The graph's SVG with each revision applied (below the database's heads), draft or pending;
    for a fleet, `tenants` (each tenant has its own heads: the fleet's section counts them)."""
    applied = applied_revisions(graph, db_heads)
    revisions = graph.revisions
    marks = {r: "tenants" if fleet else "applied" if r in applied else "pending" for r in revisions}
    marks.update({r: "draft" for r in revisions if revisions[r].draft})
    parents = {r: revisions[r].down_revisions for r in revisions}
    labels = {r: revisions[r].message for r in revisions}
    return svg(layout(graph), parents, marks, labels, frozenset(graph.heads))
