"""Milvus boolean expressions from crossmetric filters and id lists, with every value quoted so it stays a value.

A filter ``{"label": ["a", "b"], "source": ["web"]}`` becomes ``(label in ["a", "b"]) and (source in ["web"])``:
OR within a column, AND across columns, as the folder index applies it.

Why hand-written escaping: pymilvus 3's ``filter_params`` templating (``label in {labels}``) would pass the values
apart from the expression, but Milvus Lite 3.2 rejects templates (``unexpected character '{'``), and pymilvus's own
``query(ids=...)`` / ``delete(ids=...)`` paste ids between single quotes unescaped (an id ``it's`` breaks them, an id
``a"b]`` silently matches nothing). So every string here is written as a double-quoted literal with the only escapes
both Milvus Lite and Milvus' Go parser read the same way: ``\\\\``, ``\\"``, ``\\n``, ``\\r``, ``\\t``.
Other characters, quotes of the other kind and ``]`` included, stand for themselves inside the quotes, so no value
can close the literal or the list early. A NUL byte is refused (neither parser documents it inside a literal).

Column names are checked against the collection's schema before they reach an expression, so a name is never
user text either.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote_string(value: str) -> str:
    """``value`` as a double-quoted Milvus string literal (see the module docstring for the escapes)."""
    if "\x00" in value:
        raise ValueError(f"filter value {value[:40]!r} holds a NUL byte, which a Milvus expression cannot carry.")
    return '"' + "".join(_ESCAPES.get(character, character) for character in value) + '"'


def literal(value: Any, column: str) -> str:
    """One value as a Milvus literal: a string quoted, a bool ``true``/``false``, a finite number as written."""
    if isinstance(value, str):
        return quote_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float) and math.isfinite(value):
        return repr(float(value))
    if hasattr(value, "item") and not isinstance(value, (bytes, bytearray)):  # a numpy scalar
        return literal(value.item(), column)
    raise ValueError(
        f"filter value {value!r} for column {column!r} is not a string, a bool or a finite number: pass those only."
    )


def in_list(column: str, values: Iterable[Any]) -> str:
    """``column in [v1, v2, ...]`` with ``None`` among the values meaning "or the column is null"."""
    values = list(values)
    present = [value for value in values if value is not None]
    parts = []
    if present:
        parts.append(f"{column} in [{', '.join(literal(value, column) for value in present)}]")
    if len(present) != len(values):
        parts.append(f"{column} is null")
    if not parts:
        return "false"  # an empty list of allowed values lets nothing through, as in the folder index
    return parts[0] if len(parts) == 1 else "(" + " or ".join(parts) + ")"


def filter_expression(filter: Mapping[str, Sequence[Any]] | None, columns: Iterable[str]) -> str:
    """The Milvus expression of a crossmetric ``filter`` over the known ``columns`` ("" when there is no filter).

    A column the collection does not have, or values that are not a list, are a ``ValueError`` naming the column and
    the columns there are.
    """
    if not filter:
        return ""
    known = list(columns)
    if not isinstance(filter, Mapping):
        raise ValueError(f"filter must be a mapping {{column: [values]}}, got {type(filter).__name__}.")
    clauses = []
    for column, values in filter.items():
        if column not in known:
            raise ValueError(f"filter column {column!r} is not a column of the index; its columns: {known}.")
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise ValueError(f"filter[{column!r}] must be a list of allowed values, got {values!r}.")
        clauses.append(in_list(column, values))
    return " and ".join(f"({clause})" for clause in clauses)


def ids_expression(ids: Sequence[str], field: str = "id") -> str:
    """``id in ["...", ...]`` for a list of ids (each quoted: see the module docstring)."""
    return f"{field} in [{', '.join(quote_string(str(value)) for value in ids)}]"
