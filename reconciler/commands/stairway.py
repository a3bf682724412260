"""`reconciler test`: every revision stepped on a scratch database, then the history's shape.

On a scratch database (`authoring.scratch_settings`: a SQLite file beside the target's, or a
temporary database on its server), one worker runs every step in one run of env.py (see
`worker/stairway.py`): each revision upgraded, downgraded (the schema's fingerprint must be the
one before), upgraded again (the fingerprint must be the first upgrade's). Then: one head, and the
models at head match the schema (after the known differences), a table only in the database
being a model module nobody imported. With `--since REF` only the revisions whose files changed
since that git ref, and their descendants, are stepped; the others are applied plainly first.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from reconciler import logs
from reconciler.commands import heads, stairjobs, stairsteps
from reconciler.commands.authoring import scratch_settings
from reconciler.commands.stairsteps import Failure, TestReport
from reconciler.core import stairway as rules
from reconciler.core.graph import RevisionGraph
from reconciler.errors import ConfigError
from reconciler.settings import Settings

log = logs.get("reconciler.test")


def run_test(settings: Settings, since: str | None = None, jobs: int = 1) -> TestReport:
    graph = heads.repository_graph(settings)
    changed = None if since is None else changed_since(settings, graph, since)
    before, stepped = rules.stepped(graph, changed)
    report = TestReport(stepped=stepped, before=before)
    if len(graph.heads) > 1:
        report.failures.append(
            Failure(
                "",
                "one head",
                f"{len(graph.heads)} heads ({', '.join(graph.heads)}): run "
                "`reconciler rebase` or `reconciler merge`",
            )
        )
        return report
    if jobs > 1 and len(stepped) > 1:
        stairjobs.run_ranges(settings, report, jobs)
    else:
        with scratch_settings(settings) as scratch:
            stairsteps.step_one(scratch, report)
    failures = len(report.failures)
    log.info("test_finished", stepped=len(stepped), checked=len(report.checked), failures=failures)
    return report


def changed_since(settings: Settings, graph: RevisionGraph, ref: str) -> list[str]:
    """The revisions whose files differ from git ref `ref` (committed since, changed or new)."""
    # from the repository's top: revision files may live outside the migrations directory
    # (alembic.ini's version_locations)
    top = Path(_git(settings.migrations_dir, ["rev-parse", "--show-toplevel"], ref).strip())
    diff = _git(top, ["diff", "--name-only", ref], ref)
    new = _git(top, ["ls-files", "--others", "--exclude-standard"], ref)
    paths = {(top / line).resolve() for line in (diff + new).splitlines() if line.strip()}
    return [rev for rev, r in graph.revisions.items() if r.path.resolve() in paths]


def _git(cwd: Path, args: list[str], ref: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"--since {ref}: cannot run git ({exc}); install git or drop --since") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["git failed"])[-1]
        raise ConfigError(
            f"--since {ref!r}: {reason}; give a ref git knows here (a branch, tag or commit, e.g. "
            "origin/main), fetched with enough history"
        )
    return done.stdout


def junit_xml(report: TestReport) -> str:
    """The report as JUnit XML: one test case per revision step, and one per history check."""
    from xml.etree import ElementTree as ET  # deferred: only with --junit

    suite = ET.Element("testsuite", name="reconciler test")
    failed = {(f.revision, f.step): f for f in report.failures}
    stopped = next((f.revision for f in report.failures if f.revision), None)
    reached = True
    for rev in report.stepped:
        for step in rules.STEPS:
            case = ET.SubElement(suite, "testcase", classname="revisions", name=f"{rev} {step}")
            if (rev, step) in failed:
                ET.SubElement(case, "failure", message=failed[rev, step].line).text = failed[rev, step].line
                reached = False
            elif not reached or (stopped is not None and rev not in report.checked and rev != stopped):
                ET.SubElement(case, "skipped", message="not reached: an earlier step failed")
        if rev == stopped:
            reached = False
    for f in report.failures:
        if not f.revision:
            case = ET.SubElement(suite, "testcase", classname="history", name=f.step)
            ET.SubElement(case, "failure", message=f.line).text = f.line
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(1 for c in cases if c.find("failure") is not None)))
    suite.set("skipped", str(sum(1 for c in cases if c.find("skipped") is not None)))
    suite.set("time", f"{report.seconds:.3f}")
    return ET.tostring(suite, encoding="unicode") + "\n"
