"""The Flask-Migrate tutorial's app (the seed text, verbatim) as a project, and the README's
quickstart as the steps a reader runs.

`fixtures/tutorial/app.py.txt` is the tutorial's `app.py` exactly (`sqlite:///site.db`,
`Migrate(app, db)`), `fixtures/tutorial/abcdef123456_create_user_table.py.txt` its first revision
as the tutorial prints it; `.txt` so that neither lint nor pytest reads them as our code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from tests.builders import worker_python

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tutorial"
README = Path(__file__).resolve().parent.parent / "README.md"
APP = (FIXTURES / "app.py.txt").read_text(encoding="utf-8")
FIRST_REVISION = "abcdef123456_create_user_table.py"
ENV_URI = "app.config['SQLALCHEMY_DATABASE_URI'] = os.environ['DATABASE_URL']"


def python() -> str:
    """The project's interpreter: the worker's (CI's oldest-versions run) or ours."""
    return worker_python() or sys.executable


def flask_tool() -> str:
    for folder in (Path(python()).parent, Path(sys.executable).parent):
        if (folder / "flask").exists():
            return str(folder / "flask")
    raise AssertionError(f"no flask next to {python()}")


def tutorial_app(root: Path, uri_from_env: bool = False, revision: bool = True) -> Path:
    """The tutorial's app.py in `root`; `uri_from_env`: the app reads DATABASE_URL instead (the
    same app on PostgreSQL). With `revision`, a real `flask db init` and the tutorial's first
    revision."""
    root.mkdir(parents=True, exist_ok=True)
    text = APP
    if uri_from_env:
        text = "import os\n" + text.replace(
            "app.config['SQLALCHEMY_DATABASE_URI'] = 'sqlite:///site.db'", ENV_URI
        )
        assert ENV_URI in text
    (root / "app.py").write_text(text, encoding="utf-8")
    if revision:
        flask(root, "db", "init")
        shutil.copy(FIXTURES / f"{FIRST_REVISION}.txt", root / "migrations" / "versions" / FIRST_REVISION)
    return root


def flask(root: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Run the project's own `flask` CLI (FLASK_APP=app, as Flask-Migrate 2.5's Flask needs)."""
    result = subprocess.run(
        [flask_tool(), *args],
        cwd=root,
        env={**os.environ, "FLASK_APP": "app", "DATABASE_URL": "sqlite://", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


APP_VIEW = """\
import json, sys
import sqlalchemy as sa
from app import app, db
with app.app_context():
    engine = db.engine
    print(json.dumps({"url": engine.url.database, "tables": sorted(sa.inspect(engine).get_table_names())}))
"""


def app_view(root: Path, env: Mapping[str, str] | None = None) -> dict[str, object]:
    """What the app itself sees: its engine's database and tables (imported in a subprocess)."""
    result = subprocess.run(
        [python(), "-c", APP_VIEW],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def quickstart() -> tuple[str, list[list[str]]]:
    """The README's quickstart: the reconciler.toml it writes and the `reconciler` commands it
    runs, verbatim (the sh block that writes reconciler.toml)."""
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL)
    block = next(b for b in blocks if "cat > reconciler.toml <<'TOML'" in b)
    toml = block.split("cat > reconciler.toml <<'TOML'\n", 1)[1].split("\nTOML\n", 1)[0] + "\n"
    commands = [
        line.split("#", 1)[0].split() for line in block.splitlines() if line.startswith("reconciler ")
    ]
    return toml, [command[1:] for command in commands]


def write_quickstart_config(root: Path, extra: str = "") -> Path:
    """The README's reconciler.toml; `extra` lines go into its [target] table."""
    toml, _ = quickstart()
    if worker_python():  # CI's oldest-versions run: the project's own interpreter
        extra += f'python = "{worker_python()}"\n'
    if extra:
        toml = toml.replace("[target]\n", f"[target]\n{extra}", 1)
    path = root / "reconciler.toml"
    path.write_text(toml, encoding="utf-8")
    return path
