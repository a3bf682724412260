"""The revision graph, read from the revision files' headers with `ast`; nothing is executed.

The control plane never imports Alembic, Flask or the user's code, so this module uses only the
standard library. A revision file declares its place in the graph with module-level literal
assignments (`revision`, `down_revision`, `branch_labels`, `depends_on`, plain or annotated, as
Alembic's and Flask-Migrate's templates write them). A file whose headers are not literals is
handed back to the caller, which asks the worker to execute it.

Parsing one file (`parse_revision_file`) has four outcomes:

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

File selection follows Alembic: every `*.py` in the versions directories except names starting
with `__init__` or `.#`; `__pycache__` is skipped; sourceless `.pyc` files are ignored; with
`recursive`, subdirectories are walked too.
"""

from __future__ import annotations

import ast
import configparser
import hashlib
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from reconciler.errors import ConfigError

HEADER_NAMES = ("revision", "down_revision", "branch_labels", "depends_on")
FLAG_NAMES = ("allow_destructive", "draft")
_READ_NAMES = HEADER_NAMES + FLAG_NAMES
_REVISION_FILE = re.compile(r"(?!\.\#|__init__)(.*\.py)$")
_LEGACY_NAME = re.compile(r"[a-f0-9]+\.py$")  # Alembic 0.1 files: the id is the file name
_ILLEGAL_ID_CHARS = frozenset("@-+:")
_HASH_PREFIX = b"reconciler-ast-v2\n"  # v2: docstring whitespace normalised
_SEPARATORS = {"space": " ", "newline": "\n", "os": os.pathsep, ":": ":", ";": ";"}
_LEGACY_SPLIT = re.compile(r", *|(?: +)")


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


class GraphError(ConfigError):
    """The revisions do not form a valid graph: duplicate ids or labels, a cycle."""


class MissingRevision(GraphError):
    """A down_revision / depends_on names a revision that is not there (maybe not written yet)."""

    def __init__(self, message: str, path: Path, revision: str, missing: str) -> None:
        super().__init__(message)
        self.path = path
        self.revision = revision
        self.missing = missing


@dataclass(frozen=True)
class Revision:
    revision: str
    down_revisions: tuple[str, ...]
    branch_labels: tuple[str, ...]
    depends_on: tuple[str, ...]  # as written: revision ids or branch labels
    path: Path
    message: str
    file_hash: str
    allow_destructive: bool = False
    draft: bool = False


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


# --- one file ---------------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    """The file's bytes; FileNotFoundError passes through (a file removed while we list)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"cannot read revision file {path}: {exc.strerror}; check its permissions") from exc


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
        self.counts = dict.fromkeys(_READ_NAMES, 0)

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
    accepted = dict.fromkeys(_READ_NAMES, 0)
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
    if any(bound[name] > accepted[name] for name in _READ_NAMES):
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
    raise problems[0] if len(problems) == 1 else _combined(problems)


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


def parse_revision_file(path: Path) -> Revision | None:
    """Read one revision file's headers without executing it.

    Returns the `Revision`, or None when a header is not a literal (execute it in the worker).
    Raises `NotARevisionFile` when the file assigns no `revision`, `RevisionSyntaxError` when it
    does not parse, `RevisionFileError` when a header literal has the wrong type, `ConfigError`
    when it cannot be read.
    """
    return parse_revision_source(_read(path), path)


def revision_from_headers(headers: Mapping[str, object]) -> Revision:
    """A `Revision` from the header values the worker read by executing a file.

    Keys: `path` (required), `revision`, `down_revision`, `branch_labels`, `depends_on` (None, a
    string or a list of strings, as JSON gives them), optional `message` (or the module `doc`),
    `allow_destructive`, `draft`. The file hash is always computed here from the file, so it
    does not depend on the worker's interpreter.
    """
    path = Path(str(headers["path"]))
    values: dict[str, tuple[object, int | None]] = {
        name: (headers.get(name), None) for name in _READ_NAMES if name in headers
    }
    message = headers.get("message")
    if not isinstance(message, str):
        doc = headers.get("doc")
        message = _first_line(doc if isinstance(doc, str) else None)
    try:
        file_hash = source_hash(_read(path))
    except FileNotFoundError as exc:
        raise MissingRevision(
            f"revision file {path} disappeared while it was being read; it is read again on the next change",
            path,
            str(headers.get("revision", "")),
            str(headers.get("revision", "")),
        ) from exc

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


class ParseCache:
    """Parsed files keyed by path, reused while (size, mtime_ns, inode) stay the same."""

    def __init__(self) -> None:
        self._entries: dict[Path, tuple[tuple[int, int, int], Revision | None]] = {}

    def parse(self, path: Path) -> Revision | None:
        stat = path.stat()
        key = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        hit = self._entries.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        revision = parse_revision_file(path)
        self._entries[path] = (key, revision)
        return revision

    def keep_only(self, paths: Iterable[Path]) -> None:
        wanted = set(paths)
        for path in [p for p in self._entries if p not in wanted]:
            del self._entries[path]


# --- the graph --------------------------------------------------------------------------------


class RevisionGraph:
    """An immutable revision graph. Build it with `build_graph` (which validates it).

    Edges run from a revision to its parents: its down_revisions and its depends_on (resolved to
    revision ids), so ancestry includes dependencies and they are ordered first.
    """

    __slots__ = (
        "_ancestors",
        "_bases",
        "_complete",
        "_depth",
        "_fingerprint",
        "_heads",
        "_labels",
        "_order",
        "_parents",
        "_revisions",
        "_version_heads",
    )

    def __init__(
        self,
        revisions: Mapping[str, Revision],
        parents: Mapping[str, tuple[str, ...]],
        labels: Mapping[str, str],
        complete: bool = True,
    ) -> None:
        self._revisions = MappingProxyType(dict(revisions))
        self._parents = dict(parents)
        self._labels = dict(labels)
        self._complete = complete
        named = {d for rev in self._revisions.values() for d in rev.down_revisions}
        reached = {p for ps in self._parents.values() for p in ps}
        self._heads = tuple(sorted(r for r in self._revisions if r not in named))
        self._version_heads = tuple(sorted(r for r in self._revisions if r not in reached))
        self._bases = tuple(sorted(r for r, v in self._revisions.items() if not v.down_revisions))
        self._depth = _depths(self._parents)
        self._order = sorted(self._revisions, key=lambda r: (self._depth[r], r))
        self._ancestors: dict[str, frozenset[str]] = {}
        self._fingerprint = _graph_fingerprint(self._revisions.values())

    @property
    def revisions(self) -> Mapping[str, Revision]:
        return self._revisions

    @property
    def complete(self) -> bool:
        """False when built `partial`: files awaiting the worker may hold referenced revisions."""
        return self._complete

    @property
    def heads(self) -> tuple[str, ...]:
        """Alembic's heads: revisions no other revision names as down_revision (sorted)."""
        return self._heads

    @property
    def version_heads(self) -> tuple[str, ...]:
        """The rows a fully upgraded version table holds: heads no other revision depends on.

        Alembic never keeps a row for a revision that another row reaches through depends_on, so
        this, not `heads`, is what "in sync" compares against.
        """
        return self._version_heads

    @property
    def bases(self) -> tuple[str, ...]:
        """Revisions without a down_revision (sorted)."""
        return self._bases

    @property
    def fingerprint(self) -> str:
        """A stable hash of every revision's header and file hash."""
        return self._fingerprint

    def __contains__(self, rev: object) -> bool:
        return rev in self._revisions

    def __len__(self) -> int:
        return len(self._revisions)

    def depth(self, rev: str) -> int:
        """Length of the longest ancestor chain below `rev` (a base has 0)."""
        self._known(rev)
        return self._depth[rev]

    def ancestors(self, rev: str) -> frozenset[str]:
        """`rev` and everything below it, through down_revisions and depends_on."""
        cached = self._ancestors.get(rev)
        if cached is None:
            cached = self.closure([rev])
            self._ancestors[rev] = cached
        return cached

    def closure(self, revs: Iterable[str]) -> frozenset[str]:
        """The union of the ancestors of `revs`."""
        seen: set[str] = set()
        stack = [self._known(r) for r in revs]
        while stack:
            rev = stack.pop()
            if rev not in seen:
                seen.add(rev)
                stack.extend(self._parents[rev])
        return frozenset(seen)

    def topological(self, revs: Iterable[str]) -> list[str]:
        """`revs` ordered ancestors (and dependencies) first; ties by depth, then id."""
        wanted = {self._known(r) for r in revs}
        return [r for r in self._order if r in wanted]

    def newest_first(self) -> list[str]:
        """Every revision, descendants before their ancestors (for `history`)."""
        return self._order[::-1]

    def branch_labels_of(self, rev: str) -> tuple[str, ...]:
        """Labels declared by `rev` or by a revision below it along down_revisions (sorted)."""
        labels: set[str] = set()
        seen: set[str] = set()
        stack = [self._known(rev)]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            revision = self._revisions[current]
            labels.update(revision.branch_labels)
            stack.extend(d for d in revision.down_revisions if d in self._revisions)
        return tuple(sorted(labels))

    def resolve(self, ident: str) -> str:
        """The full id for a revision id, a branch label or an unambiguous id prefix.

        `head`, `heads` and `base` are the caller's to handle.
        """
        if ident in self._revisions:
            return ident
        if ident in self._labels:
            return self._labels[ident]
        candidates = sorted(r for r in self._revisions if len(r) > 3 and r.startswith(ident))
        if len(candidates) == 1 and ident:
            return candidates[0]
        if len(candidates) > 1 and ident:
            raise ConfigError(
                f"revision prefix {ident!r} is ambiguous: {', '.join(candidates[:5])}"
                f"{' ...' if len(candidates) > 5 else ''}; give more characters"
            )
        hint = " (give at least 4 characters of an id)" if len(ident) < 4 else ""
        raise ConfigError(
            f"no revision or branch label {ident!r} among {len(self._revisions)} revisions"
            f"{hint}; `reconciler history` lists them"
        )

    def _known(self, rev: str) -> str:
        if rev not in self._revisions:
            raise ConfigError(
                f"revision {rev!r} is not in the migrations directory; `reconciler history` "
                "lists the known revisions"
            )
        return rev


def _depths(parents: Mapping[str, tuple[str, ...]]) -> dict[str, int]:
    depth: dict[str, int] = {}
    for rev in _kahn(parents):
        depth[rev] = 1 + max((depth[p] for p in parents[rev]), default=-1)
    return depth


def _kahn(parents: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Parents-first order; the revisions left over (on or above a cycle) are missing from it."""
    waiting = {rev: len(ps) for rev, ps in parents.items()}
    children: dict[str, list[str]] = {rev: [] for rev in parents}
    for rev, ps in parents.items():
        for parent in ps:
            children[parent].append(rev)
    ready = deque(sorted(rev for rev, n in waiting.items() if n == 0))
    order: list[str] = []
    while ready:
        rev = ready.popleft()
        order.append(rev)
        for child in children[rev]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    return order


def _graph_fingerprint(revisions: Iterable[Revision]) -> str:
    lines = sorted(
        "|".join(
            (
                rev.revision,
                ",".join(rev.down_revisions),
                ",".join(rev.depends_on),
                ",".join(rev.branch_labels),
                rev.file_hash,
                str(int(rev.allow_destructive)),
                str(int(rev.draft)),
            )
        )
        for rev in revisions
    )
    return _sha256("\n".join(lines).encode("utf-8"))


def _cycle_error(
    parents: Mapping[str, tuple[str, ...]], left: set[str], revisions: Mapping[str, Revision]
) -> GraphError:
    path: list[str] = []
    rev = min(left)
    while rev not in path:
        path.append(rev)
        rev = min(p for p in parents[rev] if p in left)
    cycle = [*path[path.index(rev) :], rev]
    files = ", ".join(str(revisions[r].path) for r in cycle[:-1])
    return GraphError(
        f"revision cycle {' -> '.join(cycle)} (each names the next as down_revision or "
        f"depends_on; files: {files}); fix the down_revision of one of them"
    )


def _index(revisions: Iterable[Revision]) -> dict[str, Revision]:
    by_id: dict[str, Revision] = {}
    for rev in sorted(revisions, key=lambda r: (r.revision, str(r.path))):
        other = by_id.get(rev.revision)
        if other is not None:
            raise GraphError(
                f"revision id {rev.revision!r} is declared twice: in {other.path} and in "
                f"{rev.path}; give one of them a new id (and fix the down_revision pointing at it)"
            )
        by_id[rev.revision] = rev
    return by_id


def _label_owners(by_id: Mapping[str, Revision]) -> dict[str, str]:
    owners: dict[str, str] = {}
    for rev in by_id.values():
        for label in rev.branch_labels:
            if label in owners or label in by_id:
                other = owners.get(label, label)
                raise GraphError(
                    f"branch label {label!r} of revision {rev.revision} ({rev.path}) is already "
                    f"used by revision {other} ({by_id[other].path}); rename the label"
                )
            owners[label] = rev.revision
    return owners


def build_graph(revisions: Iterable[Revision], partial: bool = False) -> RevisionGraph:
    """Validate the revisions and build their graph.

    Raises `GraphError` for duplicate ids, clashing branch labels and cycles, and
    `MissingRevision` when a down_revision / depends_on names a revision that is not there.
    With `partial` (some files still await the worker), references to absent revisions are
    dropped instead and the graph's `complete` is False.
    """
    by_id = _index(revisions)
    labels = _label_owners(by_id)
    parents: dict[str, tuple[str, ...]] = {}
    for rev in sorted(by_id.values(), key=lambda r: str(r.path)):
        found: list[str] = []
        refs = [("down_revision", d, d) for d in rev.down_revisions]
        refs += [("depends_on", d, labels.get(d, d)) for d in rev.depends_on]
        for field_name, written, target in refs:
            if target in by_id:
                if target not in found:
                    found.append(target)
            elif not partial:
                raise MissingRevision(
                    f"revision file {rev.path} ({rev.revision}) names {field_name} {written!r}, "
                    "which is not in the versions directories; if that file is still being "
                    "written this clears itself, otherwise add the file or fix the header",
                    rev.path,
                    rev.revision,
                    written,
                )
        parents[rev.revision] = tuple(found)
    ordered = _kahn(parents)
    if len(ordered) != len(parents):
        raise _cycle_error(parents, set(parents) - set(ordered), by_id)
    return RevisionGraph(by_id, parents, labels, complete=not partial)


# --- files and directories --------------------------------------------------------------------


def _symlink_loop(path: Path) -> ConfigError:
    return ConfigError(
        f"{path} is a loop of symbolic links; replace it with the real file or directory (or a link to it)"
    )


def _walk(directory: Path, recursive: bool) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return
    subdirs: list[Path] = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
            is_file = not is_dir and bool(_REVISION_FILE.match(entry.name)) and entry.is_file()
        except OSError:  # ELOOP: a symbolic link that leads back to itself
            raise _symlink_loop(Path(entry.path)) from None
        if is_dir:  # like os.walk, symlinked directories are not descended into
            if not entry.name.endswith("__pycache__") and not entry.is_symlink():
                subdirs.append(Path(entry.path))
        elif is_file:
            yield Path(entry.path)
    if recursive:
        for sub in subdirs:
            yield from _walk(sub, recursive)


def revision_files(version_dirs: Sequence[Path], recursive: bool = False) -> list[Path]:
    """The candidate revision files, in directory order; missing directories are skipped."""
    seen: set[Path] = set()
    files: list[Path] = []
    for directory in version_dirs:
        try:
            real = directory.resolve()
        except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13)
            raise _symlink_loop(directory) from None
        if real in seen or not real.is_dir():
            continue
        seen.add(real)
        files.extend(_walk(directory, recursive))
    return files


def graph_fingerprint_of_dir(version_dirs: Sequence[Path], recursive: bool = True) -> str:
    """A cheap stat fingerprint (names, sizes, mtimes, inodes): reload the graph when it changes.

    Subdirectories count by default, which can only cause an extra reload; pass the same
    `recursive` as `load_graph` to be exact.
    """
    parts: list[str] = [repr([str(d) for d in version_dirs])]
    for path in revision_files(version_dirs, recursive):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        parts.append(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}")
    return _sha256("\n".join(parts).encode("utf-8", "surrogateescape"))


def _combined(problems: list[RevisionFileError]) -> RevisionFileError:
    if len(problems) == 1:
        return problems[0]
    first = problems[0]
    text = "; ".join(str(p) for p in problems)
    message = f"{len(problems)} revision files cannot be used: {text}"
    return RevisionFileError(message, first.path, first.line)


def load_graph(
    version_dirs: Sequence[Path], recursive: bool = False, cache: ParseCache | None = None
) -> tuple[RevisionGraph, list[Path]]:
    """The graph of the literal revisions, and the files the worker must execute.

    When that list is not empty the graph is `partial` (not `complete`): build the full one with
    `build_graph([*graph.revisions.values(), *worker_revisions])`. Files that cannot be used
    (syntax errors, no `revision`, bad header types) are all reported in one `RevisionFileError`.
    """
    revisions: list[Revision] = []
    fallback: list[Path] = []
    problems: list[RevisionFileError] = []
    paths = revision_files(version_dirs, recursive)
    for path in paths:
        try:
            revision = cache.parse(path) if cache is not None else parse_revision_file(path)
        except FileNotFoundError:
            continue  # removed while we listed: it is not there
        except NotARevisionFile as exc:
            if _LEGACY_NAME.match(path.name):
                fallback.append(path)
            else:
                problems.append(exc)
            continue
        except RevisionFileError as exc:
            problems.append(exc)
            continue
        if revision is None:
            fallback.append(path)
        else:
            revisions.append(revision)
    if cache is not None:
        cache.keep_only(paths)
    if problems:
        raise _combined(problems)
    return build_graph(revisions, partial=bool(fallback)), fallback


# --- where the revision files are -------------------------------------------------------------


def _read_ini(alembic_ini: Path) -> configparser.ConfigParser:
    here = str(alembic_ini.resolve().parent).replace("%", "%%")
    parser = configparser.ConfigParser(defaults={"here": here})
    try:
        with alembic_ini.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read {alembic_ini}: {exc.strerror}; fix [target] alembic_ini") from exc
    except configparser.Error as exc:
        raise ConfigError(f"{alembic_ini} is not a valid ini file: {exc}; fix it") from exc
    return parser


def _option(parser: configparser.ConfigParser, name: str, ini: Path) -> str | None:
    if not parser.has_section("alembic") or not parser.has_option("alembic", name):
        return None
    try:
        return parser.get("alembic", name)
    except configparser.Error as exc:
        raise ConfigError(f"{ini}: [alembic] {name}: {exc}; fix the value") from exc


def _split_locations(value: str, parser: configparser.ConfigParser, ini: Path) -> list[str]:
    for key in ("path_separator", "version_path_separator"):
        sep_name = _option(parser, key, ini)
        if sep_name is not None:
            break
    else:
        return [part for part in _LEGACY_SPLIT.split(value.strip()) if part]
    if sep_name not in _SEPARATORS:
        raise ConfigError(
            f"{ini}: [alembic] {key} = {sep_name!r} is not one of "
            f"{', '.join(sorted(_SEPARATORS))}; fix the value"
        )
    return [part.strip() for part in value.split(_SEPARATORS[sep_name]) if part.strip()]


def versions_dirs(migrations_dir: Path, alembic_ini: Path | None, root: Path) -> tuple[list[Path], bool]:
    """The directories holding the revision files, and whether to walk them recursively.

    Default: `<migrations_dir>/versions`. alembic.ini's `[alembic]` section may set
    `version_locations` (split on `path_separator` / `version_path_separator`, else on spaces
    and commas, as Alembic does; `%(here)s` is the ini's folder) and
    `recursive_version_locations = true`. A relative location is taken from `root` (the project
    root, where `alembic` / `flask db` are run from). Package-resource locations are not
    supported.
    """
    default = [migrations_dir / "versions"]
    if alembic_ini is None:
        return default, False
    parser = _read_ini(alembic_ini)
    recursive = _option(parser, "recursive_version_locations", alembic_ini) == "true"
    value = _option(parser, "version_locations", alembic_ini)
    if not value or not value.strip():
        return default, recursive
    dirs: list[Path] = []
    for location in _split_locations(value, parser, alembic_ini):
        if not os.path.isabs(location) and ":" in location:
            raise ConfigError(
                f"{alembic_ini}: version location {location!r} is a package resource, which "
                "reconciler cannot read without importing; use a directory path"
            )
        path = Path(location).expanduser()
        dirs.append(path if path.is_absolute() else root / path)
    return dirs, recursive
