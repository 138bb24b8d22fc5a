"""The settings of a crossmetric collection in Milvus and the conversions of values into it: field sizes, index types
and their build parameters, the pymilvus import that names the extra, metadata column types, vectors as Milvus takes
them.

Kept apart from :mod:`.milvus_index` (the engine's calls) so that each file reads as one concept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

INSTALL_HINT = 'Milvus needs the milvus extra: pip install "crossmetric[milvus]" (pymilvus and milvus-lite).'
INDEX_TYPES = ("HNSW", "FLAT", "IVF_PQ", "DISKANN")
DEFAULT_INDEX_TYPE = "HNSW"
FORMAT_VERSION = "1"
PROPERTY = "crossmetric.{}"  # collection property keys: crossmetric.format, .model, .head_tokens, .index_type
ID_LENGTH, LABEL_LENGTH, PATH_LENGTH, TEXT_LENGTH = 1024, 1024, 4096, 4096
MAX_VECTOR_DIM = 32768  # Milvus' default maximum dimension of a vector field
MAX_LIMIT = 16384  # Milvus' largest topk / query limit
HNSW_PARAMS = {"M": 32, "efConstruction": 200}  # the folder index's HNSW settings
DEFAULT_EF, DEFAULT_NPROBE, DEFAULT_SEARCH_LIST = 64, 32, 100
BATCH_BYTES = 16 * 1024 * 1024  # per upsert request (gRPC's limit is 64 MB)
ID_CHUNK = 1000  # ids per query / delete expression
BASE_FIELDS = ("id", "embedding", "label", "path", "tokens")
# pymilvus pings every 10 s even on an idle connection; gRPC's Python server (Milvus Lite, in the process or as
# `milvus-lite server`) allows that once per 5 min, then answers GOAWAY "too_many_pings", after which pymilvus 3.0.2's
# reconnect fails with "Too many pings" (seen here after a minute idle). So: no pings without a call in flight, one a
# minute during long calls. An idle connection that died is found (and redialled) by the next call instead. Each
# MilvusIndex dials its own channel (``dedicated``): pymilvus otherwise shares one per address, with the options of
# whichever client dialled first, and never closes it.
GRPC_OPTIONS = {"grpc.keepalive_permit_without_calls": False, "grpc.keepalive_time_ms": 60_000}


def require_pymilvus() -> Any:
    """The ``pymilvus`` module, or an ``ImportError`` that names the extra to install."""
    try:
        import pymilvus
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return pymilvus


def check_index_type(value: str, flag: str = "index_type") -> str:
    """``value`` upper-cased if it is one of :data:`INDEX_TYPES`, else ``ValueError`` naming ``flag``."""
    upper = str(value).upper()
    if upper not in INDEX_TYPES:
        raise ValueError(f"{flag} {value!r} is not one of {', '.join(INDEX_TYPES)}.")
    return upper


def normalised(array: Any, dim: int, name: str) -> np.ndarray:
    matrix = np.array(array, dtype=np.float32, copy=True)
    matrix = matrix[None, :] if matrix.ndim == 1 else matrix
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise ValueError(f"{name} must be N × {dim} (the index's embedding size), got shape {matrix.shape}.")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if not np.isfinite(matrix).all() or (norms == 0).any():
        raise ValueError(f"{name} holds a row that is all zeros, NaN or infinite: it has no direction.")
    return matrix / norms


def column_type(values: Sequence[Any], name: str) -> str:
    """The Milvus type of a metadata column, from its values: VARCHAR, INT64, DOUBLE or BOOL."""
    present = [value for value in values if value is not None]
    if all(isinstance(value, (bool, np.bool_)) for value in present) and present:
        return "BOOL"
    if all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in present) and present:
        return "INT64"
    if all(isinstance(value, (int, float, np.number)) and not isinstance(value, bool) for value in present) and present:
        return "DOUBLE"
    if all(isinstance(value, str) for value in present):
        return "VARCHAR"
    raise ValueError(f"metadata column {name!r} mixes types: pass strings, ints, floats or bools, one kind a column.")


def plain_value(value: Any) -> Any:
    """A numpy scalar as the Python value pymilvus serialises."""
    return value.item() if hasattr(value, "item") else value


def build_params(index_type: str, dim: int) -> dict[str, Any]:
    """The build parameters of ``index_type``: HNSW as the folder index's; IVF_PQ with 8-bit codes of dim/4 values
    (the largest divisor of ``dim`` at most dim/4, PQ needing one) over 1024 lists."""
    if index_type == "HNSW":
        return dict(HNSW_PARAMS)
    if index_type == "IVF_PQ":
        m = max(d for d in range(1, max(1, dim // 4) + 1) if dim % d == 0)
        return {"nlist": 1024, "m": m, "nbits": 8}
    return {}


def search_params(index_type: str, k: int, ef_search: int | None, nprobe: int | None) -> dict[str, Any]:
    """The search parameters of ``index_type`` for ``k`` results: the HNSW beam (at least ``k``), IVF_PQ's probed
    lists, DISKANN's search list; the metric is always inner product."""
    params: dict[str, Any] = {}
    if index_type == "HNSW":
        params["ef"] = max(int(ef_search or DEFAULT_EF), k)
    elif index_type == "IVF_PQ":
        params["nprobe"] = int(nprobe or DEFAULT_NPROBE)
    elif index_type == "DISKANN":
        params["search_list"] = max(int(ef_search or DEFAULT_SEARCH_LIST), k)
    return {"metric_type": "IP", "params": params}
