from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path

import pytest

from reconciler.config.load import load_settings, setting_defaults, setting_keys
from reconciler.control.appurl import resolve_app_url
from reconciler.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "migrations").mkdir(exist_ok=True)
    path = tmp_path / "reconciler.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _example() -> dict[str, object]:
    """config.example.toml, with its commented-out [[alerts]] block read as well."""
    text = (ROOT / "config.example.toml").read_text(encoding="utf-8")
    block = text[text.index("# [[alerts]]") :]
    uncommented = "\n".join(line[2:] for line in block.splitlines() if line.startswith("# "))
    example = tomllib.loads(text)
    example["alerts"] = tomllib.loads(uncommented)["alerts"][0]
    chains = text[text.index("# [[target.chains]]") :].split("\n\n", 1)[0]
    uncommented = "\n".join(line[2:] for line in chains.splitlines() if line.startswith("# "))
    example["target.chains"] = tomllib.loads(uncommented)["target"]["chains"][0]
    return example


def test_example_config_lists_every_key_with_its_default() -> None:
    example = _example()
    assert {s: sorted(v) for s, v in example.items()} == {s: sorted(v) for s, v in setting_keys().items()}
    for section, values in setting_defaults().items():
        for key, default in values.items():
            assert example[section][key] == default, (section, key)  # type: ignore[index]


def test_unknown_key_names_file_line_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, '[target]\nurl = "sqlite:///a.db"\nmigratons = "m"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(str(path), environ={})
    message = str(err.value)
    assert f"{path}:3" in message
    assert "migratons" in message and "did you mean 'migrations'" in message


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, '[targte]\nurl = "sqlite:///a.db"\n')
    with pytest.raises(ConfigError, match=r"unknown section \[targte\].*did you mean 'target'"):
        load_settings(str(path), environ={})


def test_wrong_type_names_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[target]\nurl = "sqlite:///a.db"\n[apply]\nlock_acquire_timeout = "soon"\n')
    with pytest.raises(ConfigError, match=r":4: \[apply\] lock_acquire_timeout must be a number"):
        load_settings(str(path), environ={})


def test_fractional_durations_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, '[target]\nurl = "sqlite:///a.db"\n[apply]\nddl_lock_timeout = 0.25\n')
    assert load_settings(str(path), environ={}).apply.ddl_lock_timeout == 0.25


def test_missing_url(tmp_path: Path) -> None:
    path = write(tmp_path, "[target]\n")
    with pytest.raises(ConfigError, match="no database URL"):
        load_settings(str(path), environ={})


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("not a url", "is not a database URL"),
        ("nosuchdialect://u@h/db", "cannot use the database URL"),
        ("postgresql://u@h", "names no database"),
    ],
)
def test_malformed_urls(tmp_path: Path, url: str, fragment: str) -> None:
    write(tmp_path, "")
    with pytest.raises(ConfigError, match=fragment):
        load_settings(None, {"target": {"url": url}}, environ={}, cwd=tmp_path)


def test_bad_url_message_hides_password(tmp_path: Path) -> None:
    write(tmp_path, "")
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"target": {"url": "nosuch://u:s3cr%40t@h/db"}}, environ={}, cwd=tmp_path)
    assert "s3cr" not in str(err.value)


def test_missing_migrations_directory(tmp_path: Path) -> None:
    path = tmp_path / "reconciler.toml"
    path.write_text('[target]\nurl = "sqlite:///a.db"\nmigrations = "nope"\n')
    with pytest.raises(ConfigError, match=r"nope does not exist.*reconciler init"):
        load_settings(str(path), environ={})


def test_unimportable_models_path(tmp_path: Path) -> None:
    path = write(tmp_path, '[target]\nurl = "sqlite:///a.db"\nmodels = "nosuchpkg.models:db"\n')
    with pytest.raises(ConfigError, match=r":3: cannot find module 'nosuchpkg.models'"):
        load_settings(str(path), environ={})
    path.write_text('[target]\nurl = "sqlite:///a.db"\nmodels = "app.models"\n')
    with pytest.raises(ConfigError, match=r"package\.module:attribute"):
        load_settings(str(path), environ={})


def test_models_found_under_root_without_import(tmp_path: Path) -> None:
    pkg = tmp_path / "myapp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise SystemExit('must not be imported')\n")
    (pkg / "models.py").write_text("raise SystemExit('must not be imported')\ndb = None\n")
    path = write(tmp_path, '[target]\nurl = "sqlite:///a.db"\nmodels = "myapp.models:db"\n')
    assert load_settings(str(path), environ={}).target.models == "myapp.models:db"


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[target]\nurl = "sqlite:///file.db"\nmigrations = "migrations"\n')
    (tmp_path / "envdir").mkdir()
    env = {"RECONCILER_URL": "sqlite:///env.db", "RECONCILER_MIGRATIONS": "envdir"}
    s = load_settings(str(path), environ=env)
    assert s.target.url.endswith("/env.db") and s.migrations_dir == tmp_path / "envdir"
    s = load_settings(str(path), {"target": {"url": "sqlite:///flag.db"}}, environ=env)
    assert s.target.url.endswith("/flag.db")
    s = load_settings(str(path), environ={})
    assert s.target.url.endswith("/file.db")


def test_config_from_env_and_default_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[target]\nurl = "sqlite:///x.db"\n')
    assert load_settings(None, environ={"RECONCILER_CONFIG": str(path)}).config_file == path
    assert load_settings(None, environ={}, cwd=tmp_path).config_file == path


def test_url_env_indirection(tmp_path: Path) -> None:
    path = write(tmp_path, '[target]\nurl_env = "APP_DB"\n')
    s = load_settings(str(path), environ={"APP_DB": "sqlite:///from_env.db"})
    assert s.target.url.endswith("from_env.db")
    with pytest.raises(ConfigError, match="APP_DB, which is not set"):
        load_settings(str(path), environ={})


def test_relative_sqlite_path_resolves_against_config_folder(tmp_path: Path) -> None:
    sub = tmp_path / "proj"
    sub.mkdir()
    path = write(sub, '[target]\nurl = "sqlite:///data/app.db"\n')
    s = load_settings(str(path), environ={}, cwd=tmp_path)
    assert s.target.url == f"sqlite:///{sub / 'data' / 'app.db'}"


def test_settings_are_frozen(tmp_path: Path) -> None:
    path = write(tmp_path, '[target]\nurl = "sqlite:///a.db"\n')
    s = load_settings(str(path), environ={})
    with pytest.raises(AttributeError):
        s.target.url = "other"  # type: ignore[misc]


class _Listener:
    """A TCP server that only counts connection attempts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.mark.parametrize(
    "extra",
    ["[apply]\nlock_acquire_timout = 3\n", '[target]\nmodels = "nosuch.mod:db"\n'],
    ids=["unknown-key", "bad-models"],
)
def test_cli_config_error_exit_2_without_connecting(tmp_path: Path, extra: str) -> None:
    from tests.cli import run_cli

    listener = _Listener()
    try:
        url = f"postgresql://u:pw@127.0.0.1:{listener.port}/db"
        text = f'[target]\nurl = "{url}"\n' if "[target]" not in extra else ""
        if "[target]" in extra:
            extra = extra.replace("[target]\n", f'[target]\nurl = "{url}"\n')
        path = write(tmp_path, text + extra)
        result = run_cli(["--config", str(path), "status"], cwd=tmp_path)
    finally:
        listener.close()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr
    assert listener.accepted == 0


# --------------------------------------------------------------------------- [[target.chains]]
CHAIN = '[[target.chains]]\nmigrations = "{dir}"\nversion_table = "{table}"\n'


def chains_config(tmp_path: Path, *chains: tuple[str, str], extra: str = "") -> Path:
    body = '[target]\nurl = "sqlite:///a.db"\n' + extra
    for directory, table in chains:
        (tmp_path / directory).mkdir(exist_ok=True)
        body += CHAIN.format(dir=directory, table=table)
    return write(tmp_path, body)


def test_chains_are_read_in_order_with_their_names(tmp_path: Path) -> None:
    path = chains_config(tmp_path, ("plugin_migrations", "plugin_version"), ("b", "b_version"))
    settings = load_settings(str(path), environ={})
    assert [(c.name, c.migrations, c.version_table) for c in settings.chains] == [
        ("plugin_migrations", "plugin_migrations", "plugin_version"),
        ("b", "b", "b_version"),
    ]
    assert load_settings(str(write(tmp_path, '[target]\nurl = "sqlite:///a.db"\n')), environ={}).chains == ()


def test_a_chain_key_is_checked_like_any_other(tmp_path: Path) -> None:
    path = chains_config(tmp_path, ("p", "p_version"))
    path.write_text(path.read_text() + 'version_tabel = "x"\n')
    expected = r"\[\[target.chains\]\] #1.*unknown key 'version_tabel'.*did you mean 'version_table'"
    with pytest.raises(ConfigError, match=expected):
        load_settings(str(path), environ={})


@pytest.mark.parametrize(
    ("chains", "message"),
    [
        ([("p", "alembic_version")], r"version_table 'alembic_version', like \[target\] version_table"),
        ([("p", "v1"), ("q", "v1")], r"chain 'q' has version_table 'v1', like chain 'p'"),
        ([("p", "")], r"a chain needs version_table"),
        ([("migrations", "v1")], r"uses the migrations directory .* which chain 'main' uses"),
        ([("main", "v1")], r"chain name 'main' must be"),
    ],
)
def test_chains_that_would_mix_up_are_refused(
    tmp_path: Path, chains: list[tuple[str, str]], message: str
) -> None:
    path = chains_config(tmp_path, *chains)
    with pytest.raises(ConfigError, match=message):
        load_settings(str(path), environ={})


def test_a_chain_directory_must_exist(tmp_path: Path) -> None:
    path = write(tmp_path, '[target]\nurl = "sqlite:///a.db"\n' + CHAIN.format(dir="gone", table="g_v"))
    with pytest.raises(ConfigError, match=r"chain 'gone': migrations directory .*gone does not exist"):
        load_settings(str(path), environ={})


def test_chains_must_be_tables(tmp_path: Path) -> None:
    path = write(tmp_path, '[target]\nurl = "sqlite:///a.db"\nchains = "plugin"\n')
    with pytest.raises(ConfigError, match=r"\[\[target.chains\]\] tables"):
        load_settings(str(path), environ={})


# --------------------------------------------------------------------------- RECONCILER_<SECTION>_<KEY>
# A non-default value per key, valid under each key's own checks. Keys absent here get one by type.
ENV_SAMPLES: dict[tuple[str, str], object] = {
    ("target", "url"): "sqlite:///from_env.db",
    ("target", "models"): "myapp.models:db",
    ("target", "app"): "myapp.models:app",
    ("target", "migrate"): "myapp.models:migrate",
    ("target", "python"): sys.executable,
    ("target", "lock_url"): "sqlite:///lock.db",
    ("target", "lock_url_env"): "LOCK_DB_URL",
    ("target", "imports"): ["myapp", "myapp.models"],
    ("apply", "role"): "app_owner",
    ("journal", "table"): "my_journal",
    ("journal", "placement"): "default",
    ("logging", "level"): "debug",
    ("logging", "format"): "json",
    ("daemon", "mode"): "dev",
    ("daemon", "http"): "0.0.0.0:9000",
    ("daemon", "ready_when"): "in_sync",
    ("drift", "ignore"): ["table:audit_*", "index:*"],
    ("safety", "on_unanalysable"): "warn",
    ("safety", "squawk"): "off",
    ("fleet", "source"): "schemas",
    ("fleet", "kind"): "databases",
    ("fleet", "waves"): ["1", "50%"],
    ("fleet", "match"): "tenant_*",
}
BY_TYPE: dict[type, object] = {
    str: "sample_value",
    float: 7.5,
    int: 7,
    list: ["a", "b"],
    dict: {"tenant": "acme"},
}
OTHER_ENV = {"LOCK_DB_URL": "sqlite:///lock_from_env.db"}


def _sample(section: str, key: str, default: object) -> object:
    if (section, key) in ENV_SAMPLES:
        return ENV_SAMPLES[(section, key)]
    if isinstance(default, bool):
        return not default
    return BY_TYPE[type(default)]


def _as_env(value: object) -> str:
    """How a person writes the value in a variable: strings bare, lists and tables as literals."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + "}"
    return str(value)


def _as_toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, list)):
        return json.dumps(value)
    return _as_env(value)


def _env_project(tmp_path: Path) -> Path:
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "models.py").write_text("db = app = migrate = None\n")
    return write(tmp_path, '[target]\nurl = "sqlite:///from_file.db"\n')


def _every_key() -> list[tuple[str, str]]:
    from reconciler.settings import SECTIONS

    return [(s, k) for s in SECTIONS for k in setting_keys()[s]]


@pytest.mark.parametrize(("section", "key"), _every_key(), ids=lambda v: str(v))
def test_every_key_reads_from_its_variable_as_from_the_file(tmp_path: Path, section: str, key: str) -> None:
    """RECONCILER_<SECTION>_<KEY> gives the key the value the file's line would give it."""
    base = _env_project(tmp_path)
    default = setting_defaults()[section][key]
    value = _sample(section, key, default)
    variable = f"RECONCILER_{section.upper()}_{key.upper()}"
    from_env = load_settings(
        str(base),
        environ={variable: _as_env(value), **OTHER_ENV},
        require_migrations=False,
        app_url=resolve_app_url,  # [target] app set: its app's URL is compared with [target] url
    )
    text = base.read_text()
    line = f"{key} = {_as_toml(value)}\n"
    text = (
        text.replace("[target]\n", f"[target]\n{line}")
        if section == "target"
        else (f"{text}[{section}]\n{line}")
    )
    if (section, key) == ("target", "url"):
        text = text.replace('url = "sqlite:///from_file.db"\n', "")
    with_line = tmp_path / "with_line.toml"
    with_line.write_text(text, encoding="utf-8")
    from_file = load_settings(
        str(with_line), environ=OTHER_ENV, require_migrations=False, app_url=resolve_app_url
    )
    got = getattr(getattr(from_env, section), key)
    assert got == getattr(getattr(from_file, section), key)
    assert got != getattr(
        getattr(load_settings(str(base), environ=OTHER_ENV, require_migrations=False), section), key
    )


def _env_error(tmp_path: Path, environ: dict[str, str]) -> str:
    path = write(tmp_path, '[target]\nurl = "sqlite:///a.db"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(str(path), environ=environ)
    return str(err.value)


@pytest.mark.parametrize(
    ("environ", "fragments"),
    [
        (
            {"RECONCILER_DAEMON_INTERVAL": "abc"},
            ["RECONCILER_DAEMON_INTERVAL", "interval must be a number", "'abc'"],
        ),
        ({"RECONCILER_DAEMON_BLOCKED_AFTER": "2.5"}, ["RECONCILER_DAEMON_BLOCKED_AFTER", "whole number"]),
        (
            {"RECONCILER_SAFETY_ALLOW_DESTRUCTIVE": "maybe"},
            ["RECONCILER_SAFETY_ALLOW_DESTRUCTIVE", "true or false", "'maybe'"],
        ),
        ({"RECONCILER_DEV_WATCH": "[1, 2]"}, ["RECONCILER_DEV_WATCH", "list of strings"]),
        ({"RECONCILER_DEV_WATCH": '["app", '}, ["RECONCILER_DEV_WATCH", "neither JSON nor TOML"]),
        ({"RECONCILER_TARGET_X_ARGS": "tenant=acme"}, ["RECONCILER_TARGET_X_ARGS", '{tenant = "acme"}']),
        ({"RECONCILER_DAEMON_MODE": "fast"}, ["RECONCILER_DAEMON_MODE", "prod or dev", "'fast'"]),
        ({"RECONCILER_DAEMON_HTTP": "8089"}, ["RECONCILER_DAEMON_HTTP", "HOST:PORT"]),
    ],
    ids=["number", "whole", "bool", "list-type", "list-syntax", "table", "choice", "http"],
)
def test_a_wrong_variable_is_refused_naming_it(
    tmp_path: Path, environ: dict[str, str], fragments: list[str]
) -> None:
    message = _env_error(tmp_path, environ)
    assert message.startswith("environment variable ")
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("RECONCILER_DAEMON_INTERVALL", "RECONCILER_DAEMON_INTERVAL"),  # a key's typo, in its section
        ("RECONCILER_SAFETY_ALLOW_DESTRUCTIV", "RECONCILER_SAFETY_ALLOW_DESTRUCTIVE"),
        ("RECONCILER_DEAMON_INTERVAL", "RECONCILER_DAEMON_INTERVAL"),  # the section's typo
        ("RECONCILER_CONFG", "RECONCILER_CONFIG"),  # the tool's own variable, misspelt
        ("RECONCILER_TARGET_NOSUCHKEY", None),  # under a section: an error even with no suggestion
        ("RECONCILER_ALERTS_URL", None),  # the sinks are one variable
    ],
)
def test_an_unknown_variable_is_refused_with_a_suggestion(
    tmp_path: Path, name: str, suggestion: str | None
) -> None:
    message = _env_error(tmp_path, {name: "5"})
    assert message.startswith(f"environment variable {name}:"), message
    assert "reconciler config --example" in message
    if suggestion:
        assert f"did you mean {suggestion}?" in message
    else:
        assert "did you mean" not in message


def test_the_tools_own_and_unrelated_variables_are_left_alone(tmp_path: Path) -> None:
    """Negative control of the unknown-variable check: names it must not take for settings."""
    path = write(tmp_path, '[target]\nurl = "sqlite:///a.db"\n')
    environ = {
        "RECONCILER_CONFIG": str(path),
        "RECONCILER_UNSAFE_DISABLE": "lock",
        "RECONCILER_PYTHON": "python3",
        "RECONCILER_TEST_WORKER_PYTHON": "/usr/bin/python3",
        "RECONCILER_TEST_JOBS": "0",
        "RECONCILER_BUILD_ID": "1234",  # someone else's: far from every known name
        "RECONCILER_DAEMON_INTERVAL": "",  # empty: unset
    }
    settings = load_settings(None, environ=environ)
    assert settings.config_file == path and settings.unsafe == frozenset({"lock"})
    assert settings.daemon.interval == 30.0


def test_short_and_long_names_agree_or_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[target]\nurl = "sqlite:///a.db"\n')
    same = {"RECONCILER_INTERVAL": "12", "RECONCILER_DAEMON_INTERVAL": "12"}
    assert load_settings(str(path), environ=same).daemon.interval == 12.0
    assert load_settings(str(path), environ={"RECONCILER_MODE": "dev"}).daemon.mode == "dev"
    message = _env_error(
        tmp_path, {"RECONCILER_URL": "sqlite:///one.db", "RECONCILER_TARGET_URL": "sqlite:///two.db"}
    )
    assert "RECONCILER_TARGET_URL and RECONCILER_URL" in message and "unset the other" in message


def test_precedence_file_then_variable_then_flag_for_every_name(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[target]\nurl = "sqlite:///a.db"\n[daemon]\ninterval = 10\n[dev]\nwatch = ["f"]\n'
    )
    env = {"RECONCILER_DAEMON_INTERVAL": "20", "RECONCILER_DEV_WATCH": "app, lib"}
    assert load_settings(str(path), environ={}).daemon.interval == 10.0
    from_env = load_settings(str(path), environ=env)
    assert (from_env.daemon.interval, from_env.dev.watch) == (20.0, ["app", "lib"])
    assert load_settings(str(path), {"daemon": {"interval": 30.0}}, environ=env).daemon.interval == 30.0


def test_alert_sinks_and_chains_from_one_variable_each_replace_the_files(tmp_path: Path) -> None:
    (tmp_path / "plugin").mkdir()
    path = write(
        tmp_path,
        '[target]\nurl = "sqlite:///a.db"\n[[alerts]]\nkind = "webhook"\nurl = "https://file.example/hook"\n',
    )
    env = {
        "RECONCILER_ALERTS": '[{"kind": "slack", "url_env": "SLACK_URL", "name": "ops"}]',
        "RECONCILER_TARGET_CHAINS": '[{migrations = "plugin", version_table = "plugin_version"}]',
        "SLACK_URL": "https://hooks.example/T000/B000/s3cr3t",
    }
    settings = load_settings(str(path), environ=env, resolve_alerts=True)
    assert [(s.kind, s.name, s.url) for s in settings.alerts] == [("slack", "ops", env["SLACK_URL"])]
    assert [(c.name, c.version_table) for c in settings.chains] == [("plugin", "plugin_version")]

    bad = {"RECONCILER_ALERTS": '[{kind = "slack", ur = "https://hooks.example/T000/B000/s3cr3t"}]'}
    message = _env_error(tmp_path, bad)
    assert "RECONCILER_ALERTS #1" in message and "did you mean 'url'" in message
    message = _env_error(tmp_path, {"RECONCILER_ALERTS": '{url = "https://hooks.example/s3cr3t"}'})
    assert "RECONCILER_ALERTS" in message and "array of tables" in message and "s3cr3t" not in message


def test_example_config_documents_the_variables() -> None:
    text = (ROOT / "config.example.toml").read_text(encoding="utf-8")
    assert "RECONCILER_<SECTION>_<KEY>" in text and "RECONCILER_ALERTS" in text
    assert "RECONCILER_TARGET_CHAINS" in text and "reconciler config --example" in text


def test_unknown_key_points_at_the_config_example_command(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nintervall = 3\n")
    message = _env_error_from_file(path)
    assert "did you mean 'interval'" in message and "`reconciler config --example`" in message
    assert "config.example.toml" not in message  # a pip user has no such file


def _env_error_from_file(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_settings(str(path), environ={"RECONCILER_URL": "sqlite:///a.db"})
    return str(err.value)


def test_cli_reads_the_real_environment_and_refuses_a_misspelt_variable(tmp_path: Path) -> None:
    """Through a real process and its real environment: a sidecar configured by variables only."""
    from tests.cli import run_cli

    (tmp_path / "migrations" / "versions").mkdir(parents=True)
    env = {
        "RECONCILER_TARGET_URL": f"sqlite:///{tmp_path / 'app.db'}",
        "RECONCILER_TARGET_MIGRATIONS": str(tmp_path / "migrations"),
    }
    misspelt = run_cli(["status"], cwd=tmp_path, env={**env, "RECONCILER_DAEMON_INTERVALL": "5"})
    assert misspelt.returncode == 2, misspelt.stderr
    assert "RECONCILER_DAEMON_INTERVALL" in misspelt.stderr
    assert "did you mean RECONCILER_DAEMON_INTERVAL?" in misspelt.stderr
    wrong = run_cli(["status"], cwd=tmp_path, env={**env, "RECONCILER_DAEMON_INTERVAL": "abc"})
    assert wrong.returncode == 2 and "RECONCILER_DAEMON_INTERVAL" in wrong.stderr and "'abc'" in wrong.stderr
    fine = run_cli(["status", "--json"], cwd=tmp_path, env={**env, "RECONCILER_DAEMON_INTERVAL": "5"})
    assert fine.returncode == 0, fine.stderr
    assert json.loads(fine.stdout)["url"] == f"sqlite:///{tmp_path / 'app.db'}"
