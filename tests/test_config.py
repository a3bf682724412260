from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest

from reconciler.config import load_settings, setting_defaults, setting_keys
from reconciler.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "migrations").mkdir(exist_ok=True)
    path = tmp_path / "reconciler.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _example() -> dict[str, object]:
    """config.example.toml, with its commented-out [[alerts]] block read as well."""
    text = (ROOT / "config.example.toml").read_text(encoding="utf-8")
    block = text[text.index("# [[alerts]]"):]
    uncommented = "\n".join(line[2:] for line in block.splitlines() if line.startswith("# "))
    example = tomllib.loads(text)
    example["alerts"] = tomllib.loads(uncommented)["alerts"][0]
    chains = text[text.index("# [[target.chains]]"):].split("\n\n", 1)[0]
    uncommented = "\n".join(line[2:] for line in chains.splitlines() if line.startswith("# "))
    example["target.chains"] = tomllib.loads(uncommented)["target"]["chains"][0]
    return example


def test_example_config_lists_every_key_with_its_default() -> None:
    example = _example()
    assert {s: sorted(v) for s, v in example.items()} == {
        s: sorted(v) for s, v in setting_keys().items()
    }
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
    (pkg / "models.py").write_text("raise SystemExit('must not be imported')\n")
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
    ['[apply]\nlock_acquire_timout = 3\n', '[target]\nmodels = "nosuch.mod:db"\n'],
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
        ("plugin_migrations", "plugin_migrations", "plugin_version"), ("b", "b", "b_version")]
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
