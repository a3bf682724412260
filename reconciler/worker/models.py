"""Loading the project's models: MetaData, declarative Base, Flask-SQLAlchemy db, Flask app."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from reconciler.errors import ConfigError
from reconciler.worker.usercode import import_module, import_modules, user_error


@dataclass(frozen=True)
class ProjectSpec:
    """What the job says about the project's code."""

    root: Path
    url: str
    migrations_dir: Path
    models: str = ""
    app: str = ""
    migrate: str = ""
    imports: tuple[str, ...] = ()


@dataclass
class Project:
    """The loaded side of a project: metadata, and the Flask objects when env.py uses Flask."""

    metadata: Any = None
    models_obj: Any = None
    models_module: ModuleType | None = None
    db: Any = None
    app: Any = None
    migrate: Any = None
    contexts: list[Any] = field(default_factory=list)

    @property
    def is_flask_db(self) -> bool:
        return self.models_obj is not None and is_flask_db(self.models_obj)


def uses_flask(env_py: Path) -> bool:
    """True when env.py is Flask-Migrate style (it reads `current_app`)."""
    try:
        return "current_app" in env_py.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def is_flask_db(obj: Any) -> bool:
    """A Flask-SQLAlchemy `db` object (2.x or 3.x)."""
    if type(obj).__module__.split(".")[0] == "flask_sqlalchemy":
        return True
    return hasattr(obj, "Model") and hasattr(obj, "init_app") and hasattr(obj, "metadata")


def load_object(spec: str, what: str, root: Path) -> tuple[ModuleType, Any]:
    """Import 'pkg.module:attr' (attr may be dotted) and return (module, object)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{what} must look like 'package.module:attribute', got {spec!r}")
    module = import_module(module_name, f"{what} {spec!r}", root)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in vars(module) if not n.startswith("_"))[:20]
            if not names:  # an empty file: one being written (truncated, then filled), or never was
                raise ConfigError(
                    f"{what} {spec!r}: module '{module_name}' ({getattr(module, '__file__', '?')}) "
                    "defines no names (an empty file, or one still being saved); save it whole"
                )
            # "has no attribute '<attr>'": dev mode stops at start on these words (runtime/dev.py)
            raise ConfigError(
                f"{what} {spec!r}: module '{module_name}' ({getattr(module, '__file__', '?')}) "
                f"has no attribute '{attr}'; names it defines: {', '.join(names) or 'none'}"
            )
        obj = getattr(obj, part)
    return module, obj


def metadata_of(obj: Any, spec: str) -> Any:
    """The MetaData of a MetaData, declarative base or Flask-SQLAlchemy db."""
    from sqlalchemy import MetaData  # deferred: worker start-up time: imported when a job needs it

    if isinstance(obj, MetaData):
        return obj
    metadatas = getattr(obj, "metadatas", None)  # Flask-SQLAlchemy 3: one per bind
    if isinstance(metadatas, dict) and isinstance(metadatas.get(None), MetaData):
        return metadatas[None]
    metadata = getattr(obj, "metadata", None)
    if isinstance(metadata, MetaData):
        return metadata
    raise ConfigError(
        f"[target] models {spec!r} is a {type(obj).__name__}, not a MetaData, a declarative base "
        "or a Flask-SQLAlchemy db; point it at one of those"
    )


def load_project(spec: ProjectSpec, flask_env: bool) -> Project:
    """Import `imports` and the models; build the Flask side when env.py is Flask-Migrate style."""
    import_modules(spec.imports, spec.root, spec.migrations_dir)
    project = Project()
    if spec.models:
        module, obj = load_object(spec.models, "[target] models", spec.root)
        project.models_module, project.models_obj = module, obj
        project.metadata = metadata_of(obj, spec.models)
        if is_flask_db(obj):
            project.db = obj
    if flask_env or spec.app:
        _flask_side(spec, project)
    return project


def tables_of_files(
    files: Iterable[str | Path], classes: Mapping[str, Iterable[str]] | None = None
) -> frozenset[str] | None:
    """The tables the model files `files` define, or None: compare every table then.

    Call it after the models were imported. Files and modules are matched by resolved real path
    (every name a file was imported under counts). A file defines the tables of its module-level
    mapped classes (declarative and Flask-SQLAlchemy models: their `__table__`), of the mapped
    subclasses of any class it defines (abstract bases, mixins), and of its module-level `Table`
    objects (imperative tables; best effort: an imported one counts too). None when `files` is
    empty or any file defines no table (a deleted model's file, a helper module, a file that is
    not imported): a narrower compare could then miss a drop.

    `classes` maps a file (as given in `files`) to the only top-level classes of it that changed:
    that file contributes just their tables. A named class that no longer exists contributes none
    (its table is an orphan the compare sees anyway); one that exists but maps no table (a type
    decorator, a helper) may change any model that uses it, so every table is compared.
    """
    wanted = {os.path.realpath(str(f)) for f in files}
    only = {os.path.realpath(str(f)): frozenset(names) for f, names in (classes or {}).items()}
    found: dict[str, set[str]] = {path: set() for path in wanted}
    basenames = {os.path.basename(path) for path in wanted}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str) or os.path.basename(path) not in basenames:
            continue  # cheap test first: realpath costs system calls
        real = os.path.realpath(path)
        tables = found.get(real)
        if tables is None:
            continue
        if real in only:
            scoped = _classes_tables(module, only[real])
            if scoped is None:
                return None
            tables.update(scoped)
        else:
            tables.update(_module_tables(module))
    if not found or not all(found[p] or p in only for p in found):
        return None
    return frozenset(name for tables in found.values() for name in tables)


def _classes_tables(module: ModuleType, names: frozenset[str]) -> set[str] | None:
    """The tables of the named classes of `module`; None when one of them maps no table."""
    from sqlalchemy import Table  # deferred: worker start-up time: imported when a job needs it

    out: set[str] = set()
    for name in names:
        value = vars(module).get(name)
        if not isinstance(value, type):
            continue  # gone (or no longer a class): nothing of it to compare
        tables = _class_tables(value, Table)
        if not tables:
            return None
        out |= tables
    return out


def _module_tables(module: ModuleType) -> set[str]:
    from sqlalchemy import Table  # deferred: worker start-up time: imported when a job needs it

    out: set[str] = set()
    for value in list(vars(module).values()):
        if isinstance(value, Table):
            out.add(str(value.fullname))
        elif isinstance(value, type) and getattr(value, "__module__", None) == module.__name__:
            out.update(_class_tables(value, Table))
    return out


def _class_tables(cls: type, table_type: type) -> set[str]:
    """The tables of `cls` and of every class that inherits from it."""
    out: set[str] = set()
    seen: set[type] = set()
    todo = [cls]
    while todo:
        one = todo.pop()
        if one in seen:
            continue
        seen.add(one)
        try:
            table = getattr(one, "__table__", None)
        except Exception:  # a user descriptor on an unmapped class
            table = None
        if isinstance(table, table_type):
            out.add(str(table.fullname))  # type: ignore[attr-defined]
        todo.extend(type.__subclasses__(one))
    return out


def _sqlite_absolute(url: str, root: Path) -> str:
    """Flask-SQLAlchemy 3 puts relative SQLite paths into the instance folder: never let it."""
    from sqlalchemy.engine.url import make_url  # deferred: worker start-up time: imported when a job needs it

    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return url
    if database.startswith("file:") or os.path.isabs(database):
        return url
    return _url_with_database(parsed, str(root / database))


def _url_with_database(parsed: Any, database: str) -> str:
    """`url.set(database=...)` rendered with its password: SQLAlchemy 1.4+, and 1.3's mutable
    URL (no `set`, no `render_as_string`)."""
    if hasattr(parsed, "set"):
        return str(parsed.set(database=database).render_as_string(hide_password=False))
    import copy  # only SQLAlchemy 1.3 gets here

    changed = copy.copy(parsed)
    changed.database = database
    return str(changed.__to_string__(hide_password=False))


def app_database_url(spec: ProjectSpec, project: Project) -> dict[str, str] | None:
    """The URL of the Flask app's engine (`db.engine.url`), resolved as the app resolves it, or
    None when there is no Flask app to ask.

    Flask-SQLAlchemy resolves `SQLALCHEMY_DATABASE_URI` itself: a relative SQLite path goes into
    the app's instance folder (3.x) or under the app's root path (2.5). Asking the engine gives
    exactly the database the app uses. Creating an engine does not connect. The app is the one
    `[target] app` names (a factory is called, as for any job with `app`), else a module-level
    Flask app of the project whose Flask-SQLAlchemy extension is the models' db.
    """
    try:
        from flask import Flask  # deferred: Flask only when the project uses it
    except ImportError:
        return None
    found = _named_app(spec) if spec.app else _module_app(spec, project, Flask)
    if found is None:
        return None
    app, where = found
    db = _app_db(app)
    if db is None:
        return None
    with app.app_context():
        url = db.engine.url
    return {"url": _render_url(url), "where": where}


def _named_app(spec: ProjectSpec) -> tuple[Any, str]:
    return _load_app(spec), f"{spec.app} ([target] app)"


def _module_app(spec: ProjectSpec, project: Project, flask_type: type) -> tuple[Any, str] | None:
    """The project's module-level Flask app holding the models' db (the models' module first)."""
    candidates: list[tuple[Any, str]] = []
    modules = [project.models_module] if project.models_module is not None else []
    modules += [m for m in list(sys.modules.values()) if _in_project(m, spec.root)]
    seen: set[int] = set()
    for module in modules:
        for name, value in list(vars(module).items()):
            if not isinstance(value, flask_type) or id(value) in seen:
                continue
            seen.add(id(value))
            db = _app_db(value)
            if db is None or (project.db is not None and db is not project.db):
                continue
            where = f"{module.__name__}:{name} ({getattr(module, '__file__', '?')})"
            candidates.append((value, where))
    return candidates[0] if candidates else None


def _in_project(module: Any, root: Path) -> bool:
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or "site-packages" in path or "dist-packages" in path:
        return False
    return os.path.realpath(path).startswith(os.path.join(os.path.realpath(str(root)), ""))


def _render_url(url: Any) -> str:
    """A URL object as text with its password (SQLAlchemy 1.4+, and 1.3's `__to_string__`)."""
    if hasattr(url, "render_as_string"):
        return str(url.render_as_string(hide_password=False))
    return str(url.__to_string__(hide_password=False))


def _flask_side(spec: ProjectSpec, project: Project) -> None:
    try:
        import flask  # noqa: F401
        import flask_migrate  # noqa: F401
        import flask_sqlalchemy  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"env.py in {spec.migrations_dir} uses Flask-Migrate (current_app), but {exc.name} "
            f"is not installed in {sys.executable}; install it or set [target] python"
        ) from None
    app = _load_app(spec) if spec.app else _minimal_app(spec)
    db = _app_db(app) if spec.app else None
    db = db or project.db or _fresh_db()
    if not spec.app:
        db.init_app(app)
    project.app, project.db = app, db
    if project.metadata is None:
        project.metadata = metadata_of(db, spec.models or "db")
    extension = app.extensions.get("migrate")
    if extension is None:
        migrate = _project_migrate(spec, project)
        migrate.init_app(app, db, directory=str(spec.migrations_dir))
        extension = app.extensions["migrate"]
    project.migrate = getattr(extension, "migrate", None)
    context = app.app_context()
    context.push()
    project.contexts.append(context)


def _minimal_app(spec: ProjectSpec) -> Any:
    from flask import Flask  # deferred: Flask only when the project uses it

    app = Flask("reconciler")
    app.config["SQLALCHEMY_DATABASE_URI"] = _sqlite_absolute(spec.url, spec.root)
    app.config["SQLALCHEMY_TRACK_MODIFICATIONS"] = False
    return app


def _fresh_db() -> Any:
    from flask_sqlalchemy import SQLAlchemy  # deferred: Flask only when the project uses it

    return SQLAlchemy()


def _app_db(app: Any) -> Any:
    state = app.extensions.get("sqlalchemy")
    if state is None:
        return None
    return getattr(state, "db", state)  # Flask-SQLAlchemy 2 keeps a state object with .db


def _load_app(spec: ProjectSpec) -> Any:
    from flask import Flask  # deferred: Flask only when the project uses it

    _, obj = load_object(spec.app, "[target] app", spec.root)
    if isinstance(obj, Flask):
        return obj
    if not callable(obj):
        raise ConfigError(
            f"[target] app {spec.app!r} is a {type(obj).__name__}, neither a Flask app nor a "
            "factory; point it at one"
        )
    try:
        app = obj()
    except (Exception, SystemExit) as exc:
        raise user_error(exc, f"calling the app factory {spec.app!r}", spec.root) from None
    if not isinstance(app, Flask):
        raise ConfigError(f"[target] app {spec.app!r} returned a {type(app).__name__}, not a Flask app")
    return app


def _project_migrate(spec: ProjectSpec, project: Project) -> Any:
    """The project's own Migrate object (configured or the one in the models module), else a new one."""
    from flask_migrate import Migrate  # deferred: Flask only when the project uses it

    if spec.migrate:
        _, obj = load_object(spec.migrate, "[target] migrate", spec.root)
        if not isinstance(obj, Migrate):
            raise ConfigError(
                f"[target] migrate {spec.migrate!r} is a {type(obj).__name__}, "
                "not a flask_migrate.Migrate object"
            )
        return obj
    module = project.models_module
    found = {n: v for n, v in vars(module).items() if isinstance(v, Migrate)} if module else {}
    if len(found) > 1:
        raise ConfigError(
            f"module {module.__name__ if module else '?'} has several Migrate objects "
            f"({', '.join(sorted(found))}); name the one to use with [target] migrate"
        )
    if found:
        return next(iter(found.values()))
    return Migrate()


def configure_callbacks(project: Project, config: Any) -> Any:
    """Apply the project's `@migrate.configure` callbacks to an Alembic Config."""
    migrate = project.migrate
    if migrate is None or not hasattr(migrate, "call_configure_callbacks"):
        return config
    result = migrate.call_configure_callbacks(config)
    return config if result is None else result
