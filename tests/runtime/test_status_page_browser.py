"""The status page in a real browser (headless Chromium, scripts off): a daemon in each state —
in sync, behind with pending revisions, blocked, dirty, drift, a fleet with a halted wave — shows
that state in words and colour, its pending revisions, its graph's nodes; the screenshot is not
blank; and neither the HTML nor the text read off the screenshot holds the password or the alert
URL's path. With RECONCILER_SCREENSHOTS set, the screenshots are kept (`scripts/screenshots.sh`
makes the README's pictures this way)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.builders import Project, create_table, flask_project
from tests.dbs import CANARY_FORMS, assert_no_canary
from tests.runtime.browser import Browser, Shot, browser, squashed
from tests.runtime.test_daemon import config, daemon
from tests.runtime.test_fleet_daemon import FLEET, run_sql
from tests.system.test_cli_admin import HALF_APPLIED, cli, user_project

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SINK = "https://hooks.example.invalid/services/T000/SECRETPATH"
SECRETS_READ = ("40SS", "SECRETPATH")  # what OCR keeps of the password (every encoding) and the path
TONES = {"good": (0x1A, 0x7F, 0x37), "warn": (0xB7, 0x79, 0x1F), "bad": (0xC5, 0x30, 0x30)}
CANARY_ERROR = 'raise RuntimeError("cannot use " + op.get_bind().engine.url.render_as_string(False))'


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with browser() as opened:
        yield opened


@dataclass(frozen=True)
class Scenario:
    """A daemon brought into one state: the database fixture, the project, when it is there, and
    what the page must then show."""

    url_fixture: str
    build: Callable[[Path, str], Project]
    reached: Callable[[dict[str, Any]], bool]
    state: str  # the headline, in words
    tone: str
    shows: tuple[str, ...] = ()  # words the page must show, besides the state
    pending: tuple[str, ...] = ()
    nodes: dict[str, str] | None = None  # revision -> mark, for the graph's nodes


def _config(project: Project, extra: str = "", interval: float = 0.3) -> Project:
    config(project, interval=interval, sinks=[SINK], extra=f"page_refresh = 5\n{extra}")
    return project


def in_sync(root: Path, url: str) -> Project:
    project = flask_project(root, url)
    project.chain(3)
    return _config(project)


def _applied_one_then_two_more(root: Path, url: str) -> Project:
    """r0000 applied; r0001 (a new table) and r0002 (dropping r0000's table) not yet."""
    project = flask_project(root, url)
    project.chain(1)
    project.write_config()
    assert cli(project, "apply").returncode == 0
    project.revision("r0001", "r0000", upgrade=create_table("t_r1"), message="add t_r1")
    project.revision("r0002", "r0001", upgrade='op.drop_table("t_r0")', message="drop t_r0")
    return project


def behind(root: Path, url: str) -> Project:
    """An observe-only replica ([daemon] apply = false): it shows what it would apply."""
    return _config(_applied_one_then_two_more(root, url), "apply = false")


def destructive(root: Path, url: str) -> Project:
    """The guard refuses the plan: r0002 drops a table and nothing allows it."""
    return _config(_applied_one_then_two_more(root, url))


def blocked(root: Path, url: str) -> Project:
    """A revision that fails with the URL, password and all, in its error."""
    project = flask_project(root, url)
    project.chain(1)
    project.revision("bad", "r0000", upgrade=CANARY_ERROR, message="fails")
    return _config(project, "blocked_after = 2")


def dirty(root: Path, url: str) -> Project:
    """MariaDB: b1 creates a table, then fails; DDL committed as it went."""
    project = flask_project(root, url)
    project.chain(1)
    project.revision("b1", "r0000", upgrade=HALF_APPLIED, message="half applied")
    project.write_config()
    assert cli(project, "apply").returncode == 1
    return _config(project)


def drift(root: Path, url: str) -> Project:
    project = user_project(root, url)
    project.write_config()
    assert cli(project, "apply").returncode == 0
    run_sql(url, 'ALTER TABLE "user" ADD COLUMN legacy INTEGER')  # by hand, not in the models
    return _config(project, "\n[drift]\ninterval = 0.5")


def fleet(root: Path, url: str) -> Project:
    """Three tenants; tenant_x already has r0001's table, so r0001 fails there: wave 1 halts."""
    project = flask_project(root, url)
    project.chain(2)
    statements = [f"CREATE SCHEMA tenant_{n}" for n in ("a", "b")]
    statements += [
        "CREATE SCHEMA tenant_x",
        "CREATE TABLE tenant_x.t_r0 (id integer PRIMARY KEY)",
        "CREATE TABLE tenant_x.t_r1 (id integer PRIMARY KEY)",
        "CREATE TABLE tenant_x.alembic_version (version_num varchar(32) PRIMARY KEY)",
        "INSERT INTO tenant_x.alembic_version VALUES ('r0000')",
    ]
    run_sql(url, *statements)
    return _config(project, f'{FLEET}waves = ["1", "100%"]\n', interval=0.5)


def _failed_tenant(status: dict[str, Any]) -> bool:
    return bool((status.get("fleet") or {}).get("wave", {}).get("halted"))


SCENARIOS = {
    "in_sync": Scenario(
        "pg_canary_url",
        in_sync,
        lambda s: s["state"] == "in_sync",
        "in sync",
        "good",
        nodes={"r0000": "applied", "r0001": "applied", "r0002": "applied"},
    ),
    "behind": Scenario(
        "pg_canary_url",
        behind,
        lambda s: s["sync_state"] == "behind",
        "behind",
        "warn",
        shows=("2 revisions pending",),
        pending=("r0001", "r0002"),
        nodes={"r0000": "applied", "r0001": "pending", "r0002": "pending"},
    ),
    "destructive_pending": Scenario(
        "pg_canary_url",
        destructive,
        lambda s: "destructive_pending" in s["conditions"],
        "destructive pending",
        "warn",
        shows=("(sync state: behind)", "Guard findings", "drop table t_r0: all its rows are lost"),
        pending=("r0001", "r0002"),
        nodes={"r0000": "applied", "r0001": "pending", "r0002": "pending"},
    ),
    "blocked": Scenario(
        "pg_canary_url",
        blocked,
        lambda s: "blocked" in s["conditions"],
        "blocked",
        "bad",
        shows=("cannot use", "failed"),
        pending=("bad",),
        nodes={"r0000": "applied", "bad": "pending"},
    ),
    "dirty": Scenario(
        "mysql_canary_url",
        dirty,
        lambda s: s["state"] == "dirty",
        "dirty",
        "bad",
        shows=("resolve b1",),
        pending=("b1",),
        nodes={"r0000": "applied", "b1": "pending"},
    ),
    "drift": Scenario(
        "pg_canary_url",
        drift,
        lambda s: "drift" in s["conditions"],
        "drift",
        "warn",
        shows=("user.legacy",),
        nodes={"u1": "applied"},
    ),
    "fleet_halted": Scenario(
        "pg_canary_url",
        fleet,
        _failed_tenant,
        "behind",
        "warn",
        shows=("tenant_x", "halted", "Fleet (3 tenants)"),
        nodes={"r0000": "tenants", "r0001": "tenants"},  # no one database's heads: grey
    ),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_page_of_a_daemon_in_each_state(
    name: str, chromium: Browser, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    scenario = SCENARIOS[name]
    url = request.getfixturevalue(scenario.url_fixture)
    project = scenario.build(tmp_path / "p", url)
    with daemon(project) as d:
        d.wait_status(scenario.reached, 60, name)
        with chromium.page(f"http://127.0.0.1:{d.port}/") as (page, shot):
            headline = page.locator("#state")
            assert headline.inner_text() == scenario.state, shot.text[:400]
            assert scenario.tone in (headline.get_attribute("class") or "")
            for words in scenario.shows:
                assert words in shot.text, (words, shot.text)
            listed = page.locator("#pending li").all_inner_texts()
            assert [item.split(" ")[0] for item in listed] == list(scenario.pending), listed
            assert all(".py)" in item for item in listed)  # each with its file
            if scenario.nodes is not None:
                nodes = page.locator("svg g.node")
                drawn = {
                    nodes.nth(i).get_attribute("data-revision"): nodes.nth(i).get_attribute("class")
                    for i in range(nodes.count())
                }
                assert set(drawn) == set(scenario.nodes), drawn
                assert all(mark in (drawn[rev] or "") for rev, mark in scenario.nodes.items()), drawn
            assert page.locator("form, input, button, script").count() == 0
    assert not shot.is_blank()
    assert TONES[scenario.tone] in shot.colours()  # the state's colour is painted
    assert_secrets_absent(shot)
    shot.save(name)


def assert_secrets_absent(shot: Shot) -> None:
    assert_no_canary(shot.html, shot.text)
    assert "SECRETPATH" not in shot.html and "SECRETPATH" not in shot.text
    read = squashed(shot.ocr())
    assert read, "OCR read nothing off the screenshot"
    assert not [secret for secret in SECRETS_READ if secret in read], read


def test_the_screenshot_checks_would_see_a_leak(chromium: Browser) -> None:
    """The control: the same OCR reads the password and the alert URL's path off a page that shows
    them, and a page with nothing painted is blank."""
    leaked = chromium.shoot_html(
        f"<p style='font:14px monospace'>error: cannot use postgresql://canary:{CANARY_FORMS[0]}@db/app"
        f" (alert {SINK})</p>"
    )
    read = squashed(leaked.ocr())
    assert all(secret in read for secret in SECRETS_READ), read
    assert chromium.shoot_html("<body style='background:#fff'></body>").is_blank()
    assert not leaked.is_blank()
