"""`GET /` on a real daemon: the status page of the state it is in, with its graph, behind the
same Host check as the other endpoints, and never the password or an alert URL's path."""

from __future__ import annotations

import http.client
from pathlib import Path

import pytest

from tests.builders import flask_project
from tests.dbs import assert_no_canary
from tests.runtime.test_daemon import config, daemon
from tests.runtime.test_statuspage import Page


def get(port: int, host: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


@pytest.mark.postgres
def test_the_daemon_serves_its_status_page(tmp_path: Path, pg_canary_url: str) -> None:
    project = flask_project(tmp_path / "p", pg_canary_url)
    project.chain(3)
    sink = "https://hooks.example.invalid/services/T000/SECRETPATH"
    config(project, sinks=[sink], extra="page_refresh = 7")
    with daemon(project) as d:
        d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync")
        code, html = get(d.port, f"127.0.0.1:{d.port}")
        assert code == 200
        page = Page(html)
        assert "in sync" in page.words
        nodes = [a for t, a in page.tags if t == "g" and "node" in a.get("class", "")]
        assert sorted(a["data-revision"] for a in nodes) == ["r0000", "r0001", "r0002"]
        assert all("applied" in a["class"] for a in nodes)
        journal = page.section_text("journal")
        assert all(rev in journal for rev in ("r0000", "r0001", "r0002")) and "applied" in journal
        assert any(t == "meta" and a.get("content") == "7" for t, a in page.tags)
        assert "SECRETPATH" not in html and "form" not in {t for t, _ in page.tags}
        assert_no_canary(html)
        refused, _ = get(d.port, "evil.example")  # a rebound name: refused as for /status
        assert refused == 403
