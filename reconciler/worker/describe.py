"""Differences between the models and the database, described as {kind, key, text} rows."""

from __future__ import annotations

from typing import Any, Optional

from reconciler.redact import redact

# --- differences -------------------------------------------------------------------------------

KnownDifferences = frozenset[tuple[str, Optional[str]]]  # (key, detail); detail None: key alone


def _table_name(table: Any) -> str:
    schema = getattr(table, "schema", None)
    return qualified(str(table.name), schema)


def _columns(constraint: Any) -> str:
    try:
        return ",".join(str(c.name) for c in constraint.columns)
    except Exception:  # an expression index
        return "?"


def render_type(type_: Any) -> str:
    try:
        return str(type_)
    except Exception:
        return type(type_).__name__


def _shown_type(type_: Any) -> str:
    """A column type as a difference shows it: an enum with its name and values (`str()` of an
    enum is the VARCHAR(n) of its longest value, the same on both sides of many differences)."""
    enums = getattr(type_, "enums", None)
    if enums is None or type_ is None:
        zone = " WITH TIME ZONE" if getattr(type_, "timezone", False) is True else ""
        return render_type(type_) + zone
    name = getattr(type_, "name", None)
    values = ", ".join(repr(str(v)) for v in enums)
    return f"ENUM {name}({values})" if name else f"ENUM({values})"


def _shown_value(kind: str, value: Any) -> str:
    if kind == "modify_type":
        return _shown_type(value)
    if kind == "modify_default":
        if value is None or value is False:
            return "none"
        arg = getattr(value, "arg", value)
        return str(getattr(arg, "text", arg))
    return str(value)


def _object_key(obj: Any) -> tuple[str, str]:
    """(table, stable one-line name) of an index, unique constraint or foreign key."""
    table = _table_name(obj.table)
    if type(obj).__name__ == "ForeignKeyConstraint":
        target = obj.elements[0].target_fullname.rsplit(".", 1)[0] if obj.elements else "?"
        referred = ",".join(e.target_fullname.rsplit(".", 1)[-1] for e in obj.elements)
        return table, f"{table}({_columns(obj)})->{target}({referred})"
    name = getattr(obj, "name", None)
    return table, f"{table}.{name}" if name else f"{table}({_columns(obj)})"


_FK_OPTIONS = ("ondelete", "onupdate", "deferrable", "initially")


def _fk_options(fk: Any) -> dict[str, str]:
    """What a foreign key does besides its columns; not its name (autogenerate does not compare
    it, and a database's generated names differ between copies of one schema)."""
    return {opt: str(getattr(fk, opt, None) or "none") for opt in _FK_OPTIONS}


def _object_detail(obj: Any) -> str:
    """What a difference of an index, constraint or foreign key holds besides its key."""
    kind = type(obj).__name__
    if kind == "ForeignKeyConstraint":
        return " ".join(f"{k}={v}" for k, v in _fk_options(obj).items())
    unique = " unique" if getattr(obj, "unique", False) else ""
    return f"{kind}{unique} ({_columns(obj)})"


def describe_one(diff: tuple[Any, ...]) -> tuple[str, str, str, str, str]:
    """(kind, table, key, detail, text) of one of autogenerate's difference tuples. `key` names
    the object, `detail` both sides' values: together they are the whole difference."""
    kind = str(diff[0])
    if kind in ("add_table", "remove_table"):
        table = _table_name(diff[1])
        where = "models" if kind == "add_table" else "database"
        return kind, table, f"{kind} {table}", "", f"table {table} is only in the {where}"
    if kind in ("add_column", "remove_column"):
        table, column = qualified(diff[2], diff[1]), diff[3]
        where = "models" if kind == "add_column" else "database"
        shown = _shown_type(column.type)
        detail = f"{shown}{'' if getattr(column, 'nullable', True) else ' NOT NULL'}"
        text = f"column {table}.{column.name} {shown} is only in the {where}"
        return kind, table, f"{kind} {table}.{column.name}", detail, text
    if kind.startswith("modify_"):
        table = qualified(diff[2], diff[1])
        old, new = _shown_value(kind, diff[5]), _shown_value(kind, diff[6])
        what = kind.split("_", 1)[1]
        text = f"column {table}.{diff[3]} {what}: database {old}, models {new}"
        return kind, table, f"{kind} {table}.{diff[3]}", f"database {old}; models {new}", text
    if kind in ("add_table_comment", "remove_table_comment"):
        table = _table_name(diff[1])
        comment = getattr(diff[1], "comment", None)
        return kind, table, f"{kind} {table}", f"comment {comment!r}", f"table {table} comment differs"
    obj = diff[1]
    if hasattr(obj, "table"):
        table, name = _object_key(obj)
        where = "models" if kind.startswith("add_") else "database"
        noun = kind.split("_", 1)[1].replace("fk", "foreign key")
        detail = _object_detail(obj)
        extra = _fk_extra(obj) if noun == "foreign key" else ""
        return kind, table, f"{kind} {name}", detail, f"{noun} {name}{extra} is only in the {where}"
    return kind, "", f"{kind} {' '.join(str(x) for x in diff[1:])}", "", f"{kind}: {diff[1:]!s}"


def _fk_extra(fk: Any) -> str:
    shown = [
        f"ON {k[2:].upper()} {v}"
        for k, v in _fk_options(fk).items()
        if k in ("ondelete", "onupdate") and v != "none"
    ]
    return f" ({', '.join(shown)})" if shown else ""


def _fk_pair(removed: tuple[Any, ...], added: tuple[Any, ...], key: str) -> tuple[str, str, str]:
    """(key, detail, text) of a foreign key autogenerate drops and re-creates: one difference."""
    old, new = _fk_options(removed[1]), _fk_options(added[1])
    changed = [k for k in _FK_OPTIONS if old[k] != new[k]]
    detail = (
        f"database {' '.join(f'{k}={v}' for k, v in old.items())}; "
        f"models {' '.join(f'{k}={v}' for k, v in new.items())}"
    )
    how = " and ".join(f"{k} (database {old[k]}, models {new[k]})" for k in changed)
    only = "only " if len(changed) == 1 else ""
    text = (
        f"foreign key {key} differs {only}in {how}"
        if changed
        else (f"foreign key {key} is dropped and re-created ({detail})")
    )
    return f"modify_fk {key}", detail, text


def described(diffs: list[tuple[Any, ...]]) -> list[tuple[dict[str, str], str, list[int]]]:
    """Each difference as {kind, key, detail, text}, with its table and the indexes of the
    tuples it stands for: a foreign key removed and added again with the same key (another
    ondelete, say) is one `modify_fk` difference."""
    rows = [describe_one(d) for d in diffs]
    added = {row[2].split(" ", 1)[1]: i for i, row in enumerate(rows) if row[0] == "add_fk"}
    paired: dict[int, int] = {}
    for i, row in enumerate(rows):
        match = added.get(row[2].split(" ", 1)[1]) if row[0] == "remove_fk" else None
        if match is not None and match not in paired.values():
            paired[i] = match
    out: list[tuple[dict[str, str], str, list[int]]] = []
    for i, (kind, table, key, detail, text) in enumerate(rows):
        if i in paired.values():
            continue
        if i in paired:
            key, detail, text = _fk_pair(diffs[i], diffs[paired[i]], key.split(" ", 1)[1])
            kind = "modify_fk"
        found = {"kind": kind, "key": redact(key), "detail": redact(detail), "text": redact(text)}
        out.append((found, table, [i, paired[i]] if i in paired else [i]))
    return out


def describe_differences(diffs: list[Any], exclude_tables: frozenset[str]) -> list[dict[str, str]]:
    """Flatten autogenerate's differences into {kind, key, detail, text}, dropping excluded
    tables."""
    flat: list[tuple[Any, ...]] = []
    for diff in diffs:
        flat.extend(diff if isinstance(diff, list) else [diff])
    out = [row for row, table, _ in described(flat) if table.rsplit(".", 1)[-1] not in exclude_tables]
    return sorted(out, key=lambda d: (d["key"], d["detail"]))


def qualified(table: str, schema: str | None) -> str:
    return f"{schema}.{table}" if schema else table
