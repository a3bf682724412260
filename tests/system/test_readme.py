"""The README as a reader follows it: the two commands at the top, links that lead somewhere, and
the first-day walk, run command by command on the Flask-Migrate tutorial's app (SQLite, and
PostgreSQL with the app reading DATABASE_URL), its printed output checked against what the
README shows."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests import dbs
from tests.cli import cli_command, cli_env, run_cli
from tests.pgcluster import wait_until
from tests.tutorial import app_view, tutorial_app

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
WALK_HEADING = "## Your first day"
SHOWN_ROOT = "/tmp/walk"  # the folder the README's transcript was taken in
NEW_COLUMN = "    password_hash = db.Column(db.String(128)) # New column\n"  # the tutorial's edit
EMAIL_LINE = "    email = db.Column(db.String(120), unique=True, nullable=False)\n"
REVISION_ID = re.compile(r"(?<![0-9a-z])[0-9a-f]{12}(?![0-9a-z])")


def readme() -> str:
    return README.read_text(encoding="utf-8")


def walk_section() -> str:
    text = readme()
    start = text.index(WALK_HEADING)
    end = text.index("\n## ", start + len(WALK_HEADING))
    return text[start:end]


def test_the_readme_opens_with_the_two_commands() -> None:
    first_block = re.findall(r"```sh\n(.*?)```", readme(), flags=re.DOTALL)[0]
    commands = [line.split("#", 1)[0].strip() for line in first_block.splitlines()]
    assert commands == ["./scripts/demo.sh", "./scripts/test.sh"], first_block


def github_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {github_anchor(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
)
def test_every_relative_link_leads_to_a_page_and_heading_that_exist(page: str) -> None:
    source = ROOT / page
    links = re.findall(r"\]\(([^)#:]+\.md)(?:#([^)]+))?\)", source.read_text(encoding="utf-8"))
    assert links or page.startswith("docs/developing"), f"{page} links nowhere"
    for target, anchor in links:
        path = (source.parent / target).resolve()
        assert path.is_file(), f"{page}: {target} does not exist"
        if anchor:
            assert anchor in anchors(path), f"{page}: {target}#{anchor} is no heading there"


def test_the_readme_links_every_reference_page() -> None:
    text = readme()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in text, page.name


# --------------------------------------------------------------------------- the first-day walk
def walk_config() -> str:
    block = walk_section().split("cat > reconciler.toml <<'EOF'\n", 1)[1]
    return block.split("\nEOF\n", 1)[0] + "\n"


def walk_steps() -> list[tuple[list[str], list[str]]]:
    """Each `$ reconciler ...` of the walk's transcripts, in order, with the lines shown after
    it; dev mode's `reconciler run --mode dev` (a sh block) in its place, with nothing shown."""
    steps: list[tuple[list[str], list[str]]] = []
    for kind, body in re.findall(r"```(console|sh)\n(.*?)```", walk_section(), flags=re.DOTALL):
        for line in body.splitlines():
            if kind == "sh" and line.startswith("reconciler "):
                steps.append((line.split()[1:], []))
            elif kind == "console" and line.startswith("$ reconciler "):
                steps.append((split_command(line[len("$ reconciler ") :]), []))
            elif kind == "console" and steps:
                steps[-1][1].append(line)
    return steps


def split_command(text: str) -> list[str]:
    return shlex.split(text)


def normalised(text: str, root: Path) -> str:
    return REVISION_ID.sub("<id>", text.replace(str(root), SHOWN_ROOT))


@contextmanager
def dev_mode(root: Path, env: Mapping[str, str]) -> Iterator[Path]:
    """`reconciler run --mode dev` in the app's folder, as the README starts it; Ctrl-C at the end."""
    log = root / "dev.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            cli_command(["run", "--mode", "dev"], log_format="json"),
            cwd=root,
            env=cli_env(env),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: "dev_started" in log.read_text(), 60, "dev mode started")
            yield log
        except BaseException:
            print(f"the dev process's log, at the failure:\n{log.read_text()[-6000:]}")
            raise
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError("dev mode did not stop on Ctrl-C within 60 s") from None


def save_the_tutorials_new_column(root: Path) -> None:
    assert NEW_COLUMN.split(" #")[0].strip() in walk_section()  # the edit the README describes
    app = root / "app.py"
    text = app.read_text(encoding="utf-8")
    assert EMAIL_LINE in text
    app.write_text(text.replace(EMAIL_LINE, EMAIL_LINE + NEW_COLUMN), encoding="utf-8")


def run_step(root: Path, args: list[str], shown: list[str], env: Mapping[str, str]) -> None:
    if args[0] == "downgrade":
        args = [*args, "--yes"]  # not a terminal here; the README shows the prompt answered
    result = run_cli(args, cwd=root, env=env, log_format=None)
    output = normalised(result.stdout + result.stderr, root)
    assert result.returncode == 0, f"reconciler {' '.join(args)}:\n{output}"
    for line in shown:
        if line.startswith("Proceed?") or ("sqlite:" in line and "DATABASE_URL" in env):
            continue  # the answer typed at the prompt; the SQLite URL on the PostgreSQL walk
        assert normalised(line, root) in output, f"reconciler {' '.join(args)}: {line!r} not in\n{output}"


def walk(root: Path, env: Mapping[str, str]) -> None:
    (root / "reconciler.toml").write_text(walk_config(), encoding="utf-8")
    steps = walk_steps()
    names = [args[0] for args, _ in steps]
    assert names == [
        "init",
        "revision",
        "upgrade",
        "current",
        "run",
        "seal",
        "history",
        "downgrade",
        "upgrade",
    ]
    with ExitStack() as stack:
        for args, shown in steps:
            if args[:3] == ["run", "--mode", "dev"]:
                log = stack.enter_context(dev_mode(root, env))
                save_the_tutorials_new_column(root)
                wait_until(
                    lambda log=log: "dev_applied" in log.read_text(), 120, "the draft generated and applied"
                )
                continue
            run_step(root, args, shown, env)
            if args[0] == "seal":
                stack.close()  # "Stop dev mode (Ctrl-C) when you are done for the day."


def test_the_first_day_walk_on_the_tutorial_app_sqlite(tmp_path: Path) -> None:
    root = tutorial_app(tmp_path / "walk", revision=False)
    walk(root, {})
    seen = app_view(root)
    assert "user" in seen["tables"] and str(seen["url"]).endswith("instance/site.db"), seen
    sealed = sorted((root / "migrations" / "versions").glob("*_add_password_hash_to_user_table.py"))
    assert len(sealed) == 1 and "draft = True" not in sealed[0].read_text()


@pytest.mark.postgres
def test_the_first_day_walk_on_the_tutorial_app_postgresql(tmp_path: Path) -> None:
    root = tutorial_app(tmp_path / "walk", uri_from_env=True, revision=False)
    with dbs.pg_database(canary=True) as url:
        env = {"DATABASE_URL": url}
        walk(root, env)
        assert "user" in app_view(root, env)["tables"]
