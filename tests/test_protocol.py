"""The worker wire protocol: every message survives its JSON line, and another version is refused.

No database, no worker process: only `reconciler.protocol`'s codec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from reconciler import codec, protocol

JOB = protocol.Job(
    url="postgresql://app:s3cret@db/app",
    migrations_dir="/srv/app/migrations",
    root="/srv/app",
    alembic_ini="/srv/app/alembic.ini",
    models="app.models:db",
    imports=("app.extra",),
    x_args={"tenant": "acme"},
    expected_identity={"dialect": "postgresql", "database": "app"},
    secrets=("s3cret",),
    ddl_lock_timeout=5.0,
)

REQUESTS: list[Any] = [
    protocol.InitRequest(job=JOB),
    protocol.ProbeRequest(),
    protocol.UpgradeRequest(("r2", "r3"), {"r2": {"allow": ["drop_column"], "tables": {"users": 3}}}),
    protocol.UpgradeRequest(("r3",)),
    protocol.DowngradeRequest("r1"),
    protocol.StampRequest(("r1", "r2"), purge=True),
    protocol.StairwayRequest(("r2", "r3"), ("r1",)),
    protocol.SqlRequest(end="r3", start="r1"),
    protocol.RecordRequest(("r2", "r3")),
    protocol.CompareRequest(),
    protocol.HeadersRequest(("/srv/app/migrations/versions/r1.py",)),
    protocol.BindRequest({"dialect": "sqlite", "database": ":memory:"}, ("journal",)),
    protocol.InitDirRequest("flask"),
    protocol.InitDirRequest(),
    protocol.AppUrlRequest(),
    protocol.GenerateRequest(
        message="add users",
        draft=True,
        rev_id="abc123",
        tables=frozenset({"users", "orders"}),
        files=frozenset({"/srv/app/models.py"}),
        classes={"/srv/app/models.py": frozenset({"User"})},
        known=frozenset({protocol.KnownDifference("add_index x"), protocol.KnownDifference("k", "d")}),
        rescan=True,
    ),
    protocol.GenerateRequest(),
    protocol.RevisionRequest("empty", "head", None),
    protocol.MergeRequest(("a", "b"), "merge", "m1"),
    protocol.ProceedRequest(),
    protocol.StopRequest(),
    protocol.ExitRequest(),
]

REPLIES: list[Any] = [
    protocol.InitReply(4242, "3.9.18", {"sqlalchemy": "1.4.54", "alembic": "1.13.0"}, True, 1),
    protocol.EmptyReply(),
    protocol.StepReply(1500, ("r2",)),
    protocol.StairwayReply(
        ("r2",), (protocol.StairwayFailure("r3", "downgrade", "", ("extra table t",)),), duration_ms=90
    ),
    protocol.UpgradeReply(protocol.StepDone("r3", True, 12), stopped=False, duration_ms=40),
    protocol.UpgradeReply(None, stopped=True),
    protocol.SqlReply("ALTER TABLE users ADD COLUMN age INTEGER;"),
    protocol.RecordReply(({"revision": "r2", "ops": [{"kind": "drop_column"}], "error": None},)),
    protocol.CompareReply(({"kind": "add_table", "key": "add_table users", "text": "users"},)),
    protocol.HeadersReply(({"path": "/v/r1.py", "revision": "r1", "down_revision": None},)),
    protocol.BindReply(True),
    protocol.AppUrlReply({"url": "sqlite:///app.db", "where": "create_app()"}),
    protocol.AppUrlReply(None),
    protocol.InitDirReply("generic", "/srv/app/alembic.ini"),
    protocol.GenerateReply(
        path="/v/abc_add_users.py",
        revision="abc",
        message="add users",
        operations=({"kind": "add_table", "table": "users", "name": "users", "text": "create users"},),
        destructive=("drop column users.age",),
        renames=(),
        compared=("users",),
        hook_failures=({"name": "ruff", "exit_code": "1", "output": "x"},),
        duration_ms=812,
    ),
    protocol.GenerateReply(),
    protocol.ErrorReply("OperationalError", "cannot reach the database", "08006", 5, None),
    protocol.ErrorReply("RuntimeError", "revision r2 failed", None, 1, "r2"),
]


def _line(data: Any) -> Any:
    return json.loads(json.dumps(data))  # what really crosses the pipe


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_each_request_survives_its_json_line(request_: Any) -> None:
    line = protocol.request_line(request_)
    assert json.loads(line)["op"] == type(request_).op
    assert protocol.parse_request(json.loads(line)) == request_


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: type(r).__name__)
def test_each_reply_survives_its_json_line(reply: Any) -> None:
    if isinstance(reply, protocol.ErrorReply):
        wire = _line(protocol.error_reply(reply))
        assert wire["ok"] is False and wire["error"]["class"] == reply.error_class
        assert codec.decode(protocol.ErrorReply, wire["error"]) == reply
    else:
        wire = _line(protocol.ok_reply(reply))
        assert wire["ok"] is True
        assert protocol.parse_reply(type(reply), wire) == reply


@pytest.mark.parametrize(
    "event",
    [
        protocol.NonTransactional("r2", "autocommit_block()"),
        protocol.StepEvent("r3", protocol.StepDone("r2", ran=False, duration_ms=7)),
        protocol.StepEvent("r1"),
    ],
)
def test_each_event_survives_its_json_line(event: Any) -> None:
    line = json.loads(protocol.event_line(event))
    assert line["event"] == type(event).name
    assert protocol.parse_event(line) == event


def test_an_unknown_event_is_refused() -> None:
    with pytest.raises(protocol.ProtocolError, match="unknown worker event 'fly'"):
        protocol.parse_event({"event": "fly"})


def test_every_op_has_one_request_class_whose_reply_class_is_a_message() -> None:
    assert set(protocol.REQUESTS) == {type(r).op for r in REQUESTS}
    for cls in protocol.REQUESTS.values():
        assert cls.reply in {type(r) for r in REPLIES}


def test_the_job_sends_only_its_declared_fields() -> None:
    """A subclass's fields (the control plane's `python`, `timeout`) never go on the wire."""

    @dataclass(frozen=True)
    class LocalJob(protocol.Job):
        python: str = "/usr/bin/python3"

    wire = json.loads(
        protocol.request_line(protocol.InitRequest(job=LocalJob(url="u", migrations_dir="m", root="r")))
    )
    assert "python" not in wire["job"]
    assert protocol.parse_request(wire).job == protocol.Job(url="u", migrations_dir="m", root="r")


def test_a_request_with_a_field_of_the_wrong_type_or_an_unknown_field_is_refused() -> None:
    with pytest.raises(protocol.ProtocolError, match=r"UpgradeRequest\.revisions: expected"):
        protocol.parse_request({"op": "upgrade", "revisions": 3})
    with pytest.raises(protocol.ProtocolError, match="unknown field"):
        protocol.parse_request({"op": "probe", "surprise": True})
    with pytest.raises(protocol.ProtocolError, match="missing field revision"):
        protocol.parse_request({"op": "downgrade"})
    with pytest.raises(protocol.ProtocolError, match="unknown worker request 'fly'"):
        protocol.parse_request({"op": "fly"})


def test_an_init_of_another_protocol_version_is_refused_naming_both_versions() -> None:
    wire = json.loads(protocol.request_line(protocol.InitRequest(job=JOB)))
    wire["protocol"] = protocol.PROTOCOL_VERSION + 1
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.parse_request(wire)
    message = str(caught.value)
    assert f"version {protocol.PROTOCOL_VERSION + 1}" in message
    assert f"version {protocol.PROTOCOL_VERSION}:" in message
    with pytest.raises(protocol.ProtocolError, match="version 0"):
        protocol.check_version(protocol.PROTOCOL_VERSION, 0)  # a worker that sends no version
