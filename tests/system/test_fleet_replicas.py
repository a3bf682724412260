"""Replicas sharing a tenant fleet with no coordinator but the database's locks: a SIGKILLed
replica's tenants are finished by another, and two replicas at once apply every tenant exactly
once with no lock errors. Real `reconciler apply` processes; the witness file (written only in a
revision's real run) counts how often each tenant's upgrade ran.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests import fleets
from tests.fleets import FLEET_DIALECTS, TenantFleet, wait_for

pytestmark = pytest.mark.slow  # two or three CLI processes each


@pytest.fixture(params=FLEET_DIALECTS)
def dialect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def events(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def at_head(found: TenantFleet, head: str) -> bool:
    return found.all_heads() == {t: {head} for t in found.tenants}


def test_a_sigkilled_replicas_tenants_are_finished_by_another_replica_each_applied_once(
    tmp_path: Path, dialect: str
) -> None:
    with fleets.fleet(dialect, tmp_path, size=4, concurrency=2) as found:
        slow = found.name("00")
        found.revision("f2", "f1", slow=slow, seconds=120)
        first = found.start("apply")
        try:
            wait_for(found.marker.exists, 90, f"the first replica's run of {slow} to start sleeping")
            first.send_signal(signal.SIGKILL)
            first.communicate(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        assert first.returncode == -signal.SIGKILL
        assert found.heads(slow) == {"f1"}  # the killed run left nothing behind

        second = found.cli("apply", timeout=200)

        assert second.returncode == 0, second.stderr[-3000:]
        assert at_head(found, "f2"), found.all_heads()
        assert found.witnessed() == {t: 1 for t in found.tenants}


def test_two_replicas_at_once_apply_every_tenant_exactly_once_without_lock_errors(
    tmp_path: Path, dialect: str
) -> None:
    with fleets.fleet(dialect, tmp_path, size=6, concurrency=2) as found:
        found.revision("f2", "f1")
        replicas = [found.start("apply"), found.start("apply")]
        outputs = []
        try:
            for proc in replicas:
                outputs.append(proc.communicate(timeout=200))
        finally:
            for proc in replicas:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

        for proc, (_, stderr) in zip(replicas, outputs):
            assert proc.returncode == 0, stderr[-3000:]
            seen = events(stderr)
            assert not [e for e in seen if e.get("level") == "error"], stderr[-3000:]
            assert "LockTimeout" not in stderr and "lock_timeout" not in stderr
        assert at_head(found, "f2"), found.all_heads()
        assert found.witnessed() == {t: 1 for t in found.tenants}
        applied = [
            e["target"]
            for _, stderr in outputs
            for e in events(stderr)
            if e.get("event") == "reconcile_finished" and e.get("outcome") == "applied"
        ]
        assert sorted(applied) == sorted(found.tenants)  # each by one replica only
