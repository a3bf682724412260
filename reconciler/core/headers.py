"""A revision file's headers, read with `ast` (nothing is executed), and its normalised-AST hash.

The control plane never imports Alembic, Flask or the user's code, so this module uses only the
standard library. A revision file declares its place in the graph with module-level literal
assignments (`revision`, `down_revision`, `branch_labels`, `depends_on`, plain or annotated, as
Alembic's and Flask-Migrate's templates write them). A file whose headers are not literals is
handed back to the caller, which asks the worker to execute it.

Parsing one file (`parse_revision_source`) has four outcomes:

- a `Revision`;
- `None`: a header (or `allow_destructive` / `draft`) is bound to something other than a literal,
  or bound in the module's namespace anywhere else than a top-level assignment (inside `if`,
  `try`, `for`..., by an import, or through `global`): the worker must execute the file. A class
  attribute or a function's local of the same name is no header and changes nothing;
- `NotARevisionFile`: the file binds no `revision` at all (Alembic refuses such a file too);
- `RevisionSyntaxError`: the file does not parse; it carries the line and the raw-bytes hash.

`file_hash` is a sha256 of a normalised dump of the AST (no line numbers, no comments, no
formatting), so CRLF checkouts and reformatting keep it. Docstrings count with their text, but
not with the whitespace at the start and end of their lines: formatters (black, ruff format)
re-indent docstrings and strip trailing spaces (Alembic's template writes `Revises: ` with one
on base revisions), and no migration's behaviour depends on that whitespace. Every other string
counts byte for byte. The dump is our own rather than
`ast.dump`, whose text changes between Python versions (3.12 added empty fields, 3.13 omits empty
fields); ours skips empty fields so an interpreter upgrade does not alarm every checksum.
"""

from __future__ import annotations

import ast
import hashlib
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from reconciler.core.graph import Revision
from reconciler.errors import ConfigError

HEADER_NAMES = ("revision", "down_revision", "branch_labels", "depends_on")
FLAG_NAMES = ("allow_destructive", "draft")
READ_NAMES = HEADER_NAMES + FLAG_NAMES
_ILLEGAL_ID_CHARS = frozenset("@-+:")
_HASH_PREFIX = b"reconciler-ast-v2\n"  # v2: docstring whitespace normalised


class RevisionFileError(ConfigError):
    """A file in a versions directory cannot be used as a revision."""

    def __init__(self, message: str, path: Path, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line


class NotARevisionFile(RevisionFileError):
    """The file binds no `revision` name: it is not a revision (Alembic refuses it as well)."""


class RevisionSyntaxError(RevisionFileError):
    """The file does not parse. `file_hash` is the sha256 of its raw bytes."""

    def __init__(self, message: str, path: Path, line: int | None, file_hash: str) -> None:
        super().__init__(message, path, line)
        self.file_hash = file_hash


def combined_error(problems: list[RevisionFileError]) -> RevisionFileError:
    """One error naming every problem (the first's path and line), or the only one."""
    if len(problems) == 1:
        return problems[0]
    first = problems[0]
    text = "; ".join(str(p) for p in problems)
    message = f"{len(problems)} revision files cannot be used: {text}"
    return RevisionFileError(message, first.path, first.line)


# --- hashing ---------------------------------------------------------------------------------


def _dump(node: ast.AST, out: list[str], docstrings: frozenset[int] = frozenset()) -> None:
    """Append a version-stable text form of `node`: fields that are None or empty are skipped;
    docstrings (their Constant nodes' ids in `docstrings`) without line-edge whitespace."""
    out.append(type(node).__name__)
    out.append("(")
    for name in node._fields:
        value = getattr(node, name, None)
        if value is None or value == []:
            continue
        if name == "value" and id(node) in docstrings:
            value = _doc_text(str(value))
        out.append(name)
        if isinstance(value, ast.AST):
            _dump(value, out, docstrings)
        elif isinstance(value, list):
            out.append("[")
            for item in value:
                if isinstance(item, ast.AST):
                    _dump(item, out, docstrings)
                else:
                    out.append(repr(item))
                out.append(",")
            out.append("]")
        else:
            out.append(repr(value))
        out.append(",")
    out.append(")")


_DOC_OWNERS = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _docstring_nodes(tree: ast.AST) -> frozenset[int]:
    """The ids of the Constant nodes that are docstrings (module, function, class)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None) if isinstance(node, _DOC_OWNERS) else None
        first = body[0] if body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            found.update([id(first.value)] if isinstance(first.value.value, str) else [])
    return frozenset(found)


def _doc_text(doc: str) -> str:
    return "\n".join(line.strip() for line in doc.strip().splitlines())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _normalised(tree: ast.AST) -> str | None:
    out: list[str] = []
    try:
        _dump(tree, out, _docstring_nodes(tree))
    except RecursionError:
        return None
    return "".join(out)


def _dump_hash(dump: str) -> str:
    return _sha256(_HASH_PREFIX + dump.encode("utf-8", "backslashreplace"))


def node_hash(node: ast.AST) -> str | None:
    """The normalised-AST hash of one node (None when it nests too deep to dump)."""
    dump = _normalised(node)
    return None if dump is None else _dump_hash(dump)


def source_hash(source: bytes) -> str:
    """The checksum of a revision file's content: normalised AST, or raw bytes if it won't parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return _sha256(source)
    dump = _normalised(tree)
    return _sha256(source) if dump is None else _dump_hash(dump)


# --- header values ----------------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:`: a body that never runs."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


class _ModuleBindings(ast.NodeVisitor):
    """Counts the bindings of the names we read that land in the module's namespace.

    Module scope is the module's statements and every block nested in them that opens no scope
    (`if`, `try`, `for`, `with`, `while`, `match`), so a header bound there is conditional and
    needs the worker. A function, class or lambda body is a scope of its own: a `revision`
    attribute of a class, or a local of a function, is no header; only a `global` declaration of
    a header name inside one reaches the module (counted, so the file goes to the worker). The body
    of `if TYPE_CHECKING:` never runs. A comprehension's targets are its own; a walrus in it binds
    in the module. `from x import *` is not followed (as Alembic's own templates never do).
    """

    def __init__(self) -> None:
        self.counts = dict.fromkeys(READ_NAMES, 0)

    def _bind(self, name: str | None) -> None:
        if name in self.counts:
            self.counts[name] += 1

    def _nested_scope(self, body: Iterable[ast.AST]) -> None:
        for stmt in body:
            for node in ast.walk(stmt):
                if isinstance(node, ast.Global):
                    for name in node.names:
                        self._bind(name)

    def _visit_all(self, nodes: Iterable[ast.AST | None]) -> None:
        for node in nodes:
            if node is not None:
                self.visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self._bind(node.id)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:  # `revision: str` alone binds nothing
            self._visit_all([node.target, node.value])
        self.visit(node.annotation)

    def visit_alias(self, node: ast.alias) -> None:
        if node.name != "*":
            self._bind((node.asname or node.name).split(".")[0])

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._bind(node.name)
        self._visit_all([*node.decorator_list, node.args, node.returns])
        self._nested_scope(node.body)

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_arguments(self, node: ast.arguments) -> None:  # defaults and annotations only
        self._visit_all([*node.defaults, *node.kw_defaults])
        for arg in (*node.posonlyargs, *node.args, *node.kwonlyargs, node.vararg, node.kwarg):
            if arg is not None and arg.annotation is not None:
                self.visit(arg.annotation)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._bind(node.name)
        self._visit_all([*node.decorator_list, *node.bases, *node.keywords])
        self._nested_scope(node.body)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.visit(node.args)

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self._visit_all([node.iter, *node.ifs])

    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        if not _is_type_checking(node.test):
            self._visit_all(node.body)
        self._visit_all(node.orelse)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        self._bind(node.name)
        self.generic_visit(node)

    if sys.version_info >= (3, 10):  # `match` patterns bind names; 3.9 has no such nodes

        def visit_MatchAs(self, node: ast.MatchAs) -> None:
            self._bind(node.name)
            self.generic_visit(node)

        def visit_MatchStar(self, node: ast.MatchStar) -> None:
            self._bind(node.name)
            self.generic_visit(node)

        def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
            self._bind(node.rest)
            self.generic_visit(node)


def _module_bindings(tree: ast.Module) -> dict[str, int]:
    """How often each name we read is bound in the module's namespace (see `_ModuleBindings`)."""
    visitor = _ModuleBindings()
    visitor.visit(tree)
    return visitor.counts


def _header_values(tree: ast.Module) -> dict[str, tuple[object, int]] | None:
    """name -> (literal value, line) for the names we read; None when any is not a literal, or
    is bound in the module's namespace anywhere else than a top-level assignment."""
    values: dict[str, tuple[object, int]] = {}
    accepted = dict.fromkeys(READ_NAMES, 0)
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign):
            targets, node = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, node = [stmt.target], stmt.value
        else:
            continue
        names = [t.id for t in targets if isinstance(t, ast.Name) and t.id in accepted]
        if not names:
            continue
        try:
            value = ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
        for name in names:
            values[name] = (value, stmt.lineno)
            accepted[name] += 1
    try:
        bound = _module_bindings(tree)
    except RecursionError:  # absurdly deep nesting: let the worker deal with it
        return None
    if any(bound[name] > accepted[name] for name in READ_NAMES):
        return None
    return values


def _where(path: Path, line: int | None) -> str:
    return f"{path}: line {line}" if line else str(path)


def _ids(value: object, name: str, path: Path, line: int | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items: tuple[object, ...]
    if isinstance(value, str):
        items = (value,)
    elif isinstance(value, (tuple, list)):
        items = tuple(value)
    elif isinstance(value, (set, frozenset)):
        items = tuple(sorted(value, key=str))
    else:
        items = (value,)
    if all(isinstance(item, str) and item for item in items):
        return tuple(str(item) for item in items)
    raise RevisionFileError(
        f"{_where(path, line)}: {name} = {value!r} must be None, a string or a tuple of "
        "non-empty strings; fix the header",
        path,
        line,
    )


def _revision_id(value: object, path: Path, line: int | None) -> str:
    if not isinstance(value, str) or not value:
        raise RevisionFileError(
            f"{_where(path, line)}: revision = {value!r} must be a non-empty string; fix the header",
            path,
            line,
        )
    illegal = sorted(_ILLEGAL_ID_CHARS.intersection(value))
    if illegal:
        raise RevisionFileError(
            f"{_where(path, line)}: revision {value!r} contains {', '.join(illegal)!r}, which "
            "Alembic does not allow in a revision id; rename the revision",
            path,
            line,
        )
    return value


def check_id_lengths(revisions: Iterable[Revision], limit: int) -> None:
    """Refuse revision ids longer than `limit`, the version table's `version_num` width (Alembic
    creates it as VARCHAR(32)): the database would refuse to record them only after the revision
    ran. Every offending file is named."""
    long = sorted((r for r in revisions if len(r.revision) > limit), key=lambda r: str(r.path))
    if not long:
        return
    problems = [
        RevisionFileError(
            f"{r.path}: revision id {r.revision!r} is {len(r.revision)} characters, longer than "
            f"the {limit} of the version table's version_num column; rename the revision (its id "
            "and the down_revision that names it), or set [target] revision_id_length to the "
            "column's width if you widened it",
            r.path,
        )
        for r in long
    ]
    raise problems[0] if len(problems) == 1 else combined_error(problems)


def _flag(values: Mapping[str, tuple[object, int | None]], name: str, path: Path) -> bool:
    value, line = values.get(name, (False, None))
    if isinstance(value, bool):
        return value
    raise RevisionFileError(
        f"{_where(path, line)}: {name} = {value!r} must be True or False; fix the file", path, line
    )


def _first_line(doc: str | None) -> str:
    return doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""


def _message(tree: ast.Module) -> str:
    return _first_line(ast.get_docstring(tree, clean=True))


def parse_revision_source(source: bytes, path: Path) -> Revision | None:
    """Like `parse_revision_file`, for bytes already read (`path` is used in messages)."""
    try:
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError) as exc:
        line = exc.lineno if isinstance(exc, SyntaxError) else None
        reason = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        where = f"line {line}" if line else "unknown line"
        raise RevisionSyntaxError(
            f"revision file {path} has a syntax error at {where}: {reason}; fix the file "
            "(nothing is applied from this directory until it parses)",
            path,
            line,
            _sha256(source),
        ) from None
    dump = _normalised(tree)
    if dump is None:  # absurdly deep nesting: let the worker deal with it
        return None
    values = _header_values(tree)
    if values is None:
        return None
    if "revision" not in values:
        raise NotARevisionFile(
            f"{path} is in a versions directory but assigns no `revision`; Alembic refuses it "
            "too: move it out of the versions directory or give it a revision header",
            path,
        )
    rev_value, rev_line = values["revision"]

    def ids(name: str) -> tuple[str, ...]:
        value, line = values.get(name, (None, rev_line))
        return _ids(value, name, path, line)

    revision = Revision(
        revision=_revision_id(rev_value, path, rev_line),
        down_revisions=ids("down_revision"),
        branch_labels=ids("branch_labels"),
        depends_on=ids("depends_on"),
        path=path,
        message=_message(tree),
        file_hash=_dump_hash(dump),
        allow_destructive=_flag(values, "allow_destructive", path),
        draft=_flag(values, "draft", path),
    )
    if "down_revision" not in values:  # Alembic reads module.down_revision: AttributeError
        raise _no_down_revision(path, rev_line)
    return revision


def _no_down_revision(path: Path, line: int | None) -> RevisionFileError:
    return RevisionFileError(
        f"{path} assigns no `down_revision`, which Alembic requires of every revision file: "
        "add `down_revision = None` to a first revision, or the id of the revision it follows",
        path,
        line,
    )


def revision_from_values(headers: Mapping[str, object], file_hash: str) -> Revision:
    """A `Revision` from the header values the worker read by executing a file.

    Keys: `path` (required), `revision`, `down_revision`, `branch_labels`, `depends_on` (None, a
    string or a list of strings, as JSON gives them), optional `message` (or the module `doc`),
    `allow_destructive`, `draft`. `file_hash` is the caller's `source_hash` of the file, so it
    does not depend on the worker's interpreter.
    """
    path = Path(str(headers["path"]))
    values: dict[str, tuple[object, int | None]] = {
        name: (headers.get(name), None) for name in READ_NAMES if name in headers
    }
    message = headers.get("message")
    if not isinstance(message, str):
        doc = headers.get("doc")
        message = _first_line(doc if isinstance(doc, str) else None)

    def ids(name: str) -> tuple[str, ...]:
        return _ids(values.get(name, (None, None))[0], name, path, None)

    revision = Revision(
        revision=_revision_id(values.get("revision", (None, None))[0], path, None),
        down_revisions=ids("down_revision"),
        branch_labels=ids("branch_labels"),
        depends_on=ids("depends_on"),
        path=path,
        message=message,
        file_hash=file_hash,
        allow_destructive=_flag(values, "allow_destructive", path),
        draft=_flag(values, "draft", path),
    )
    if "down_revision" not in headers:
        raise _no_down_revision(path, None)
    return revision
