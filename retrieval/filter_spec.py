"""Filters written as text, ``COLUMN=VALUE[,VALUE...]``: what ``crossmetric search --filter`` and the server's
``filter`` field take, turned into the ``{column: [values]}`` mapping every index engine searches with.

- One spec keeps the items whose ``COLUMN`` is one of the values (OR within a spec); several specs must all hold (AND
  across specs). Two specs on one column keep the values both allow.
- A comma inside a value is written ``\\,`` and a backslash ``\\\\`` (``--filter 'maker=Smith\\, J.'``); every other
  character, ``=`` included after the first one, is taken as it is. Surrounding spaces are kept: values match exactly.
- Values arrive as text; :func:`typed_filter` converts them to the column's type (a year stored as an integer is
  written ``year=2020``) where the index says its column types (a folder index's Arrow schema), and refuses a column
  the index does not have, before any query is embedded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

Filter = dict[str, list[Any]]


def split_values(text: str, spec: str, name: str = "--filter") -> list[str]:
    """``a,b\\,c`` -> ``["a", "b,c"]``: the values of one spec, ``\\,`` and ``\\\\`` unescaped."""
    values, current, chars = [], [], iter(text)
    for char in chars:
        if char == "\\":
            following = next(chars, None)
            if following not in (",", "\\"):
                raise ValueError(
                    f"{name} {spec!r}: a backslash escapes only a comma (\\,) or a backslash (\\\\) in a value."
                )
            current.append(following)
        elif char == ",":
            values.append("".join(current))
            current = []
        else:
            current.append(char)
    values.append("".join(current))
    if any(value == "" for value in values):
        raise ValueError(f"{name} {spec!r}: empty value; write COLUMN=VALUE[,VALUE...] (a comma in a value as \\,).")
    return values


def parse_filter_specs(specs: Sequence[str], name: str = "--filter") -> Filter | None:
    """``["label=a,b", "color=red"]`` -> ``{"label": ["a", "b"], "color": ["red"]}`` (None for no spec); specs on
    one column are intersected (AND). ``ValueError`` naming ``name`` and the spec at fault."""
    wanted: Filter = {}
    for spec in specs:
        if not isinstance(spec, str):
            raise ValueError(f"{name}: each filter is a string COLUMN=VALUE[,VALUE...], got {type(spec).__name__}.")
        column, equals, text = spec.partition("=")
        column = column.strip()
        if not equals or not column:
            raise ValueError(f"{name} {spec!r}: write COLUMN=VALUE[,VALUE...], e.g. label=cat,dog.")
        values = split_values(text, spec, name)
        if column in wanted:
            values = [value for value in wanted[column] if value in values]
        wanted[column] = list(dict.fromkeys(values))
    return wanted or None


def filter_from_request(value: Any, name: str = "filter") -> Filter | None:
    """A filter as a client sends it: a mapping ``{column: value or [values]}``, or specs in the text form (one
    string or a list of strings); None or empty: no filter. ``ValueError`` saying the accepted forms."""
    if value is None or value == "" or value == [] or value == {}:
        return None
    if isinstance(value, str):
        return parse_filter_specs([value], name)
    if isinstance(value, list):
        return parse_filter_specs(value, name)
    if isinstance(value, Mapping):
        wanted: Filter = {}
        for column, allowed in value.items():
            allowed = allowed if isinstance(allowed, list) else [allowed]
            if not allowed or any(isinstance(v, (dict, list)) for v in allowed):
                raise ValueError(f"{name} {column!r}: give a value or a non-empty list of values (strings, numbers).")
            wanted[str(column)] = allowed
        return wanted
    raise ValueError(
        f'{name} must be {{"column": ["value", ...]}}, or "COLUMN=VALUE[,VALUE...]" (or a list of them), got '
        f"{type(value).__name__}."
    )


def _columns(index: Any) -> list[str] | None:
    columns = getattr(index, "columns", None)
    columns = columns() if callable(columns) else columns
    return list(columns) if columns is not None else None


def typed_filter(wanted: Filter | None, index: Any, name: str = "--filter") -> Filter | None:
    """``wanted`` with each text value converted to its column's type, checked against ``index``: a column it does
    not have is refused, naming the columns it has. Engines that do not say their column types get the values as
    they are."""
    if not wanted:
        return None
    columns = _columns(index)
    schema = getattr(index, "schema", None)
    out: Filter = {}
    for column, values in wanted.items():
        if columns is not None and column not in columns:
            raise ValueError(f"{name} {column!r}: the index has no such column; its columns are {columns}.")
        kind = schema.field(column).type if isinstance(schema, pa.Schema) and column in schema.names else None
        if kind is None or pa.types.is_string(kind) or pa.types.is_large_string(kind):
            out[column] = [v if not isinstance(v, (int, float, bool)) or kind is None else str(v) for v in values]
            continue
        try:
            text = pa.array([str(v).lower() if isinstance(v, bool) else str(v) for v in values], pa.string())
            out[column] = text.cast(kind).to_pylist()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise ValueError(f"{name} {column}={values}: the column holds {kind} values ({error}).") from None
    return out
