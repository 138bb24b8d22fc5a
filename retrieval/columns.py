"""The per-item columns of an index (id, label, path, user metadata) as Arrow tables, and filters over them.

Arrow because a table written as an IPC file and opened with ``pa.memory_map`` is read in place: a loaded index keeps
no Python object per item (clip-retrieval keeps LAION-5B's metadata the same way), and ``pyarrow.compute`` evaluates
a filter over millions of rows in C. Ids are strings and unique among live items; labels and paths are strings or
null; a user column holds any Arrow scalar type (strings, numbers, booleans; nulls allowed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BASE_COLUMNS = ("id", "label", "path")
RESERVED = (*BASE_COLUMNS, "score", "cosine", "head_score", "reranked")


def _strings(values: Sequence[Any] | None, count: int, name: str, allow_none: bool) -> list[str | None] | None:
    """Check and copy a per-row column (ids, labels, paths): ``count`` entries, each a str (or None)."""
    if values is None:
        return None
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} embeddings.")
    out: list[str | None] = []
    for i, value in enumerate(values):
        if value is None and allow_none:
            out.append(None)
        elif isinstance(value, (str, int, np.integer)) and not isinstance(value, bool):
            out.append(str(value))
        else:
            raise ValueError(f"{name}[{i}] = {value!r}: expected a string.")
    return out


def item_table(
    ids: Sequence[Any],
    labels: Sequence[Any] | None,
    paths: Sequence[Any] | None,
    metadata: Mapping[str, Sequence[Any]] | None,
    count: int,
    schema: pa.Schema | None = None,
) -> pa.Table:
    """The Arrow table of ``count`` new items (ids checked unique); ``schema``: the index's, which new rows must fit."""
    id_list = _strings(ids, count, "ids", allow_none=False)
    assert id_list is not None
    if len(set(id_list)) != count:
        seen: set[str | None] = set()
        duplicate = next(i for i in id_list if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise ValueError(f"ids must be unique; {duplicate!r} appears {id_list.count(duplicate)} times.")
    columns: dict[str, Any] = {
        "id": pa.array(id_list, pa.string()),
        "label": pa.array(_strings(labels, count, "labels", True) or [None] * count, pa.string()),
        "path": pa.array(_strings(paths, count, "paths", True) or [None] * count, pa.string()),
    }
    for name, values in (metadata or {}).items():
        if not isinstance(name, str) or name in RESERVED:
            raise ValueError(f"metadata column {name!r} is not allowed: the names {RESERVED} are taken by results.")
        values = list(values)
        if len(values) != count:
            raise ValueError(f"metadata column {name!r} has {len(values)} entries for {count} embeddings.")
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise ValueError(f"metadata column {name!r}: its values are not one scalar type ({error}).") from error
    table = pa.table(columns)
    return table if schema is None else conform(table, schema)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with the columns and types of ``schema`` (missing user columns filled with nulls)."""
    extra = sorted(set(table.column_names) - set(schema.names))
    if extra:
        raise ValueError(
            f"metadata column(s) {extra} are not in this index (it has {list(schema.names[3:])}): new items carry "
            "the columns the index was built with."
        )
    arrays = []
    for field in schema:
        if field.name not in table.column_names:
            arrays.append(pa.nulls(len(table), field.type))
            continue
        column = table.column(field.name)
        if column.type == pa.null():
            arrays.append(pa.nulls(len(table), field.type))
            continue
        try:
            arrays.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise ValueError(
                f"metadata column {field.name!r}: {column.type} values for a {field.type} column."
            ) from error
    return pa.Table.from_arrays(arrays, schema=schema)


def write_table(table: pa.Table, path: Path) -> None:
    """Write ``table`` as an uncompressed Arrow IPC file (so that it can be memory-mapped and read in place)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1 << 16)


def read_table(path: Path) -> pa.Table:
    """The table of an Arrow IPC file, memory-mapped: its values stay in the page cache, not on the heap."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def filter_mask(table: pa.Table, filter: Mapping[str, Sequence[Any]]) -> np.ndarray:
    """Bool per row of ``table``: for every column of ``filter``, the row's value is one of the allowed ones."""
    mask = None
    for name, allowed in filter.items():
        if name not in table.column_names:
            raise ValueError(f"filter column {name!r} is not in the index; its columns are {table.column_names}.")
        if isinstance(allowed, (str, bytes)) or not isinstance(allowed, Sequence | set | frozenset | np.ndarray):
            raise ValueError(f"filter {name!r}: give a list of allowed values, e.g. {{{name!r}: [{allowed!r}]}}.")
        column = table.column(name)
        try:
            values = pa.array(list(allowed), type=column.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise ValueError(f"filter {name!r}: its values are not {column.type} like the column ({error}).") from error
        keep = pc.is_in(column, value_set=values, skip_nulls=False)
        mask = keep if mask is None else pc.and_(mask, keep)
    if mask is None:
        return np.ones(len(table), dtype=bool)
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)


def check_filter(filter: Any) -> dict[str, list[Any]] | None:
    """A filter argument as ``{column: [values]}`` (None or empty: no filter), or ``ValueError`` saying its form."""
    if not filter:
        return None
    if not isinstance(filter, Mapping):
        raise ValueError(f"filter must be a mapping {{column: [allowed values]}}, got {type(filter).__name__}.")
    return {str(name): list(values) if not isinstance(values, str) else values for name, values in filter.items()}
