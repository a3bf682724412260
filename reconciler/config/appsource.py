"""A Flask project's app module, read as source with `ast` (never imported): the control plane's
way to tell a Flask project (`init`'s template) and whether a Flask app is created at import
(whether a worker could report the app's database URL). Standard library only.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path


def find_flask_migrate(root: Path, flask_app: str = "") -> tuple[str, str] | None:
    """`(file:line, why that file)` of a `Migrate(...)` call in the Flask app's module or in a
    project module it imports (one level: `from .extensions import migrate`); read with ast."""
    for path, origin in _app_module_files(root, flask_app):
        for source in (path, *_imported_project_files(path, root)):
            line = call_line(source, "Migrate")
            if line is not None:
                return f"{_relative(source, root)}:{line}", origin
    return None


def _app_module_files(root: Path, flask_app: str) -> list[tuple[Path, str]]:
    """The files Flask would load the app from: FLASK_APP's module, else wsgi.py, then app.py."""
    if flask_app:
        module = flask_app.split(":", 1)[0].strip()
        module = module[:-3] if module.endswith(".py") else module
        path = _module_path(root, module.replace("/", ".").replace(os.sep, "."))
        return [(path, f"FLASK_APP={flask_app}")] if path else []
    out = []
    for name in ("wsgi", "app"):
        path = _module_path(root, name)
        if path is not None:
            out.append((path, "where Flask looks for the app when FLASK_APP is not set"))
    return out


def _module_path(root: Path, module: str) -> Path | None:
    base = root.joinpath(*[part for part in module.split(".") if part])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8", errors="replace"), str(path))
    except (OSError, SyntaxError, ValueError):
        return None


def call_line(path: Path, callee: str) -> int | None:
    """The line of the first call of `callee` (`Migrate(...)`, `flask_migrate.Migrate(...)`)."""
    tree = _parse(path)
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name == callee:
                return int(node.lineno)
    return None


def creates_app_at_import(root: Path, module: str) -> bool:
    """Whether importing `module` (its file, its parent packages, and the project modules it
    imports) may create a Flask app at module level: a `Flask(...)` call outside any function.
    An app factory's app is made only when called, and so is never there to ask."""
    path = _module_path(root, module)
    if path is None:
        return True  # not a plain file under root (installed, a namespace package): ask
    parents = [_module_path(root, ".".join(module.split(".")[:i])) for i in range(1, module.count(".") + 1)]
    files = [path, *(p for p in parents if p is not None), *_imported_project_files(path, root)]
    return any(_module_level_call(f, "Flask") for f in files)


def _module_level_call(path: Path, callee: str) -> bool:
    tree = _parse(path)
    if tree is None:
        return True  # unreadable here: let the worker say
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Call):
            func = node.func
            if (func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")) == callee:
                return True
        todo.extend(ast.iter_child_nodes(node))
    return False


def _imported_project_files(path: Path, root: Path) -> list[Path]:
    """The project files `path` imports (absolute or relative imports), that exist under root."""
    tree = _parse(path)
    package = path.parent  # what a relative import is relative to (a module's or __init__'s)
    out: list[Path] = []
    for node in ast.walk(tree) if tree is not None else ():
        names: list[str] = []
        base = root
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.parent
            prefix = node.module or ""
            names = [prefix] if prefix else []
            names += [f"{prefix}.{a.name}" if prefix else a.name for a in node.names]
        for name in names:
            found = _module_path(base, name)
            if found is not None and found != path and found not in out:
                out.append(found)
    return out


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def suggested_models(root: Path) -> str | None:
    """'module:name' of the Flask-SQLAlchemy db that the app module Flask finds (wsgi.py / app.py)
    assigns at module level (`db = SQLAlchemy(app)`), when that module also creates Migrate(...)."""
    found = find_flask_migrate(root)
    if found is None:
        return None
    for path, _origin in _app_module_files(root, ""):
        tree = _parse(path)
        for node in tree.body if tree is not None else ():
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                func = node.value.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
                if name == "SQLAlchemy" and targets:
                    return f"{path.stem}:{targets[0]}"
    return None


# Names whose use lets a module bind names no statement spells (`globals()["db"] = ...`).
_DYNAMIC_NAMES = frozenset({"globals", "locals", "vars", "exec", "eval", "setattr", "__import__"})


def top_level_names(path: Path) -> frozenset[str] | None:
    """The names a module binds at its top level, read from its source (never imported):
    assignments, imports, defs and class defs, also inside `if`/`try`/`for`/`with` blocks and
    `global` declarations in functions. None when that cannot be decided from the source: it does
    not parse, uses `from x import *`, defines a module `__getattr__`, or binds names dynamically
    (`globals()`, `setattr`, `exec`, `sys.modules[...]`)."""
    tree = _parse(path)
    if tree is None:
        return None
    names: set[str] = set()
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if _undecidable(node):
            return None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            declared = _global_names(node)
            if declared is None:
                return None
            names |= {node.name, *declared}
            todo.extend(node.decorator_list)
            continue
        if isinstance(node, ast.Lambda):
            continue
        names.update(_bound_here(node))
        todo.extend(ast.iter_child_nodes(node))
    return None if "__getattr__" in names else frozenset(names)


def _undecidable(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names):
        return True
    if isinstance(node, ast.Name) and node.id in _DYNAMIC_NAMES:
        return True
    return isinstance(node, ast.Attribute) and node.attr in ("modules", "__dict__")


def _global_names(scope: ast.AST) -> set[str] | None:
    """Names a function or class body declares `global` (they bind in the module); None when it
    binds names dynamically (`globals()[...]`, `setattr(sys.modules[...])`)."""
    found: set[str] = set()
    for node in ast.walk(scope):
        if isinstance(node, ast.Global):
            found.update(node.names)
        elif _undecidable(node):
            return None
    return found


def _bound_here(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        return {node.id}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, ast.ExceptHandler) and node.name:
        return {node.name}
    for kind, attr in (("MatchAs", "name"), ("MatchStar", "name"), ("MatchMapping", "rest")):
        cls = getattr(ast, kind, None)
        if cls is not None and isinstance(node, cls) and getattr(node, attr):
            return {str(getattr(node, attr))}
    return set()


def defines(path: Path, name: str) -> bool | None:
    """Whether the module file at `path` binds `name` at its top level; None when undecidable
    from the source. A package's `__init__.py` also has its submodules as attributes."""
    names = top_level_names(path)
    if names is None:
        return None
    if name in names:
        return True
    if path.name == "__init__.py" and _module_path(path.parent, name) is not None:
        return None  # `pkg:sub` is there once something imports pkg.sub
    if path.name == "__init__.py" and (path.parent / name).is_dir():
        return None  # a namespace subpackage
    return False
