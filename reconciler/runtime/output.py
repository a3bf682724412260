"""What the one-shot commands print: their results as text lines, and `apply`'s progress line.

No click here (cli.py is its one importer and echoes the lines); colour is the caller's decision,
passed in, as in `terminal`.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from reconciler import logs
from reconciler.project import differences
from reconciler.redact import redact
from reconciler.runtime import terminal

if TYPE_CHECKING:
    from pathlib import Path

    from reconciler.control.guard import Analysis
    from reconciler.core.graph import RevisionGraph
    from reconciler.core.status import Status
    from reconciler.runtime.options import Context


def status_lines(
    data: dict[str, Any], colour: bool = False, fleet: dict[str, Any] | None = None
) -> list[str]:
    """`status` as text (stdout); a fleet's counts, wave and failed tenants after it."""
    lines = [
        f"target:     {data['target']} ({data['url']})",
        f"state:      {terminal.state(data['state'], colour)}",
    ]
    if data["conditions"]:
        lines.append(f"conditions: {', '.join(terminal.state(c, colour) for c in data['conditions'])}")
    lines.append(f"db heads:   {', '.join(data['db_heads']) or '(none)'}")
    lines.append(f"repo heads: {', '.join(data['repo_heads']) or '(none)'}")
    if data["pending"]:
        lines.append(f"pending:    {len(data['pending'])}: {', '.join(data['pending'])}")
    lines += [chain_line(chain, colour) for chain in data.get("chains") or ()]
    if data["state"] != "in_sync":
        lines.append(data["message"])
    checked = (data.get("guard") or {}).get("checked_per_operation")
    if checked:
        lines.append(f"guard:      checked operation by operation as they run: {', '.join(checked)}")
    return lines + (fleet_lines(fleet, colour) if fleet else [])


def fleet_lines(fleet: dict[str, Any], colour: bool) -> list[str]:
    counts = ", ".join(f"{n} {terminal.state(state, colour)}" for state, n in fleet["counts"].items())
    wave = fleet["wave"]
    lines = [f"fleet:      {fleet['tenants']} tenants ({fleet['source']}): {counts or 'none'}"]
    if wave["count"] > 1 or wave["halted"]:
        lines.append(
            f"wave:       {wave['index'] + 1} of {wave['count']}"
            + (" (complete)" if wave["complete"] else "")
        )
    if wave["halted"]:
        lines.append(f"halted:     {wave['reason']}")
    if fleet["suspended"]:
        lines.append("suspended:  no tenant is applied until `reconciler resume`")
    lines += [f"failed:     {t['name']}: {t['error'] or t['revision']}" for t in fleet["failed"][:20]]
    return lines


def chain_line(chain: dict[str, Any], colour: bool = False) -> str:
    """One line per chain when the database has several (`[[target.chains]]`)."""
    pending = f"; {len(chain['pending'])} pending" if chain["pending"] else ""
    heads = ", ".join(chain["db_heads"]) or "(none)"
    state = terminal.state(chain["state"], colour)
    return f"chain {chain['chain']} ({chain['version_table']}): {state} at {heads}{pending}"


def plan_dict(result: Status, steps: list[Any], analysis: Analysis, sql: str | None) -> dict[str, Any]:
    """`plan --json`: the status, the steps, the guard's findings (and the SQL with --sql)."""
    data = result.as_dict()
    data["steps"] = [s.__dict__ for s in steps]
    data["findings"] = [f.as_dict() for f in analysis.findings]
    data["lock_rules"] = analysis.linter
    if sql is not None:
        data["sql"] = sql
    return data


def plan_lines(state: str, steps: list[Any], findings: tuple[Any, ...], sql: str | None) -> list[str]:
    """`plan` as text (stdout): the SQL with --sql, else the steps with their findings."""
    if sql is not None:
        return [sql]
    if not steps:
        return [f"nothing to apply: the database is {state}"]
    lines = []
    for index, step in enumerate(steps, start=1):
        lines.append(f"{index:>3}. {step.revision}  {step.message}")
        for finding in (f for f in findings if f.revision == step.revision):
            ack = " (acknowledged)" if finding.acknowledged else ""
            lines.append(f"       {finding.kind:<12} {finding.where}  {finding.message}{ack}")
    return lines


@contextmanager
def progress_line(ctx: Context) -> Iterator[terminal.ProgressLine | None]:
    """On a terminal, `n of N, revision` as one line rewritten in place, which replaces the
    per-revision log lines; none when piped, quiet, verbose or logging JSON."""
    if not sys.stderr.isatty() or ctx.quiet or ctx.verbose or ctx.json_logs():
        yield None
        return
    line = terminal.ProgressLine(sys.stderr)
    logs.hide("revision_applied", "reconcile_finished")  # the line, then the summary, say it
    logs.set_status_line(line)
    try:
        yield line
    finally:
        logs.set_status_line(None)
        line.close()


def history_lines(lines: list[str], colour: bool, drawn: list[tuple[str, str]] | None = None) -> list[str]:
    """`history` lines with their marks and tags coloured (stdout); with `drawn` (the graph's
    characters and revision of each line, `core.graphlayout.text_rows`) behind the lanes."""
    shown = [terminal.history_line(line, colour) for line in lines]
    if drawn is None:
        return shown
    width = max(len(chars) for chars, _rev in drawn)
    texts = iter(shown)
    return [f"{chars:<{width}}  {next(texts)}".rstrip() if rev else chars for chars, rev in drawn]


def drift_lines(found: list[dict[str, str]]) -> list[str]:
    """`drift`'s differences and count (stderr)."""
    lines = [f"  - {difference['text']}" for difference in found]
    return [*lines, f"drift: {len(found)} difference(s)" if found else "no drift"]


def journal_lines(table: list[str], colour: bool) -> list[str]:
    """`journal`'s table with its outcome column coloured (stdout)."""
    return terminal.column(table, "outcome", terminal.OUTCOME_STYLES, colour)


def baseline_line(path: Path, count: int, url: str) -> str:
    """What `baseline` wrote (stderr)."""
    dialect = differences.dialect_of(url)
    return f"wrote {count} known difference(s) for {dialect} to {path} (the lists of other dialects are kept)"


def init_line(made: Any) -> str:
    """What `init` created (stderr)."""
    return f"created {made.directory} and {made.alembic_ini} from the {made.template} template: {made.reason}"


def downgraded_line(target: str, undo: list[str]) -> str:
    """How `downgrade` ended (stderr)."""
    return f"downgraded to {target}" if undo else f"nothing to undo: {target} is the current revision"


def internal_error(exc: Exception) -> tuple[str, str]:
    """A bug of ours: its redacted traceback (no locals), and the message asking for a report."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return redact(text), f"internal error {exc.__class__.__name__}: {redact(str(exc))}; please report it"


def downgrade_lines(target: str, undo: list[str], graph: RevisionGraph) -> list[str]:
    """What `downgrade` shows before it asks (stderr)."""
    lines = [f"downgrade to {target} will undo, newest first:"]
    return lines + [f"  {rev}  {graph.revisions[rev].message}" for rev in undo]


def written_lines(written: Any) -> list[str]:
    """What `revision` / `migrate` / `merge` wrote, with the destructive operations (stderr);
    `written` None: merge had nothing to merge."""
    if written is None:
        return ["nothing to merge: the repository has one head"]
    if written.path is None:
        return ["No changes in schema detected."]
    lines = [f"Generating {written.path} ... done"]
    lines += [f"  - {operation['text']}" for operation in written.operations]
    lines += [f"  ! {line}" for line in written.destructive]
    if written.destructive:
        lines.append(
            f"review it: applying refuses data loss until the file says it is meant "
            f"(`reconciler confirm {written.revision}` writes `allow_destructive = True`)"
        )
    for failure in written.hook_failures:
        lines.append(
            f"  post-write hook {failure.get('hook', '?')} failed (the revision is kept): "
            f"{failure.get('output', '')}".rstrip()
        )
    return lines
