"""A gallery in a Milvus collection: the :class:`~.protocol.GalleryIndex` past one machine (``crossmetric[milvus]``).

``MilvusIndex(uri, collection)`` talks to Milvus through ``pymilvus.MilvusClient``; only the URI says which Milvus:

- a local file ending in ``.db`` (``gallery.db``) is **Milvus Lite**, an engine that pip installs and that runs inside
  the process (for trying and for tests; one process per file, or ``milvus-lite server`` for several);
- ``http://host:19530`` is Milvus Standalone or Distributed, or Zilliz Cloud (with ``token``).

The collection (made by :meth:`MilvusIndex.create` or ``crossmetric index build --milvus``):

- ``id`` VARCHAR primary key (upserts replace an item by id), ``embedding`` FLOAT_VECTOR (L2-normalised rows; metric
  IP = cosine, as the folder index), ``label`` and ``path`` VARCHAR, one nullable field per metadata column;
- ``tokens``: each item's head tokens for re-ranking, T·C flattened, when the model has a re-ranker. Milvus Lite 3.2
  refuses FLOAT16_VECTOR ("MilvusLite does not support Float16Vector"), so they are a FLOAT_VECTOR (with the FLAT index
  every vector field needs) that holds the float16 values exactly: twice the folder's bytes, but the same field on
  Lite and on a cluster, so a gallery built on several machines carries its tokens with it and re-ranking reads the
  same numbers as from a folder;
- the collection's properties record the model reference (a query or an add from another model is refused naming
  both), the head tokens' shape and stage, and the format version.

``index_type`` (``--milvus_index``): ``HNSW`` (default), ``FLAT`` (exact; what the tests compare with the folder's
``exact``), ``IVF_PQ`` or ``DISKANN`` (for a cluster). Collections are created with Strong consistency, so a search
sees every add and remove made before it. Filters become Milvus boolean expressions (:mod:`.milvus_expressions`)
evaluated inside the engine's search.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .compatibility import describe_model, same_model
from .milvus_expressions import filter_expression, ids_expression
from .milvus_schema import (
    BASE_FIELDS,
    BATCH_BYTES,
    DEFAULT_INDEX_TYPE,
    FORMAT_VERSION,
    GRPC_OPTIONS,
    ID_CHUNK,
    ID_LENGTH,
    LABEL_LENGTH,
    MAX_LIMIT,
    MAX_VECTOR_DIM,
    PATH_LENGTH,
    PROPERTY,
    TEXT_LENGTH,
    build_params,
    check_index_type,
    normalised,
    plain_value,
    require_pymilvus,
    search_params,
)  # fmt: skip
from .protocol import Filter, Results

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MilvusLocation:
    """Where a collection is (``uri``, ``collection``, ``token``), to open later or again (``crossmetric serve``
    opens it when its model has loaded); the token never appears in its repr."""

    uri: str
    collection: str
    token: str | None = field(default=None, repr=False)

    def open(self) -> MilvusIndex:
        return MilvusIndex(self.uri, self.collection, token=self.token)

    def __str__(self) -> str:
        return f"Milvus collection {self.collection!r} at {self.uri}"


class MilvusIndex:
    """A crossmetric gallery in the Milvus collection ``collection`` at ``uri`` (see the module docstring).

    Opening needs the collection to exist: make it with :meth:`create` (or ``crossmetric index build --milvus``).
    """

    kind = "milvus"

    def __init__(self, uri: str, collection: str, *, token: str | None = None, _client: Any = None) -> None:
        pymilvus = require_pymilvus()
        self.uri, self.collection = str(uri), collection
        self.client = _client or pymilvus.MilvusClient(
            uri=self.uri, token=token or "", grpc_options=GRPC_OPTIONS, dedicated=True
        )
        if not self.client.has_collection(collection):
            raise ValueError(
                f"Milvus collection {collection!r} does not exist at {self.uri}: build it with "
                f"`crossmetric index build --milvus {self.uri} --collection {collection}` (or MilvusIndex.create)."
            )
        described = self.client.describe_collection(collection)
        properties = described.get("properties") or {}
        if PROPERTY.format("format") not in properties:
            raise ValueError(
                f"Milvus collection {collection!r} at {self.uri} was not made by crossmetric (no "
                f"{PROPERTY.format('format')} property): pick another --collection name."
            )
        self.model: dict[str, Any] = json.loads(properties.get(PROPERTY.format("model")) or "{}")
        self._head_tokens: dict[str, Any] | None = json.loads(properties.get(PROPERTY.format("head_tokens")) or "null")
        self.index_type = properties.get(PROPERTY.format("index_type"), DEFAULT_INDEX_TYPE)
        fields = {field["name"]: field for field in described["fields"]}
        self.dim = int(fields["embedding"]["params"]["dim"])
        self.columns = ["label", "path"] + [name for name in fields if name not in BASE_FIELDS]
        self._types = {name: getattr(fields[name]["type"], "name", str(fields[name]["type"])) for name in self.columns}
        self.metadata_columns = self.columns[2:]
        self.client.load_collection(collection)

    # -- creating ------------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        uri: str,
        collection: str,
        *,
        dim: int,
        model: Mapping[str, Any] | None = None,
        token: str | None = None,
        index_type: str = DEFAULT_INDEX_TYPE,
        metadata_columns: Mapping[str, str] | None = None,
        head_tokens: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
    ) -> MilvusIndex:
        """Create the collection (or, with ``exist_ok``, open it after checking that it fits) and return it.

        Args:
            dim: the embedding size.
            model: the reference of the model that embeds the gallery (``inference.embedding.model_reference``).
            index_type: one of :data:`INDEX_TYPES` (metric IP on L2-normalised vectors).
            metadata_columns: ``{name: "VARCHAR" | "INT64" | "DOUBLE" | "BOOL"}``, nullable fields filters can name.
            head_tokens: ``{"shape": [T, C], "token_stage": ...}`` when items carry tokens for re-ranking.
            exist_ok: open an existing collection (an index build into it then upserts by id); it must hold the same
                model's embeddings, of the same size, with the same head tokens (else ``ValueError`` naming both).
        """
        pymilvus = require_pymilvus()
        index_type = check_index_type(index_type)
        client = pymilvus.MilvusClient(uri=str(uri), token=token or "", grpc_options=GRPC_OPTIONS, dedicated=True)
        if client.has_collection(collection):
            if not exist_ok:
                raise ValueError(f"Milvus collection {collection!r} already exists at {uri}.")
            existing = cls(uri, collection, token=token, _client=client)
            existing._check_fits(dim, model, head_tokens)
            return existing
        columns = dict(metadata_columns or {})
        clash = sorted(set(columns) & set(BASE_FIELDS))
        if clash:
            raise ValueError(f"metadata columns {clash} clash with the collection's own fields {list(BASE_FIELDS)}.")
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        data_type = pymilvus.DataType
        schema.add_field("id", data_type.VARCHAR, is_primary=True, max_length=ID_LENGTH)
        schema.add_field("embedding", data_type.FLOAT_VECTOR, dim=int(dim))
        schema.add_field("label", data_type.VARCHAR, max_length=LABEL_LENGTH, nullable=True)
        schema.add_field("path", data_type.VARCHAR, max_length=PATH_LENGTH, nullable=True)
        for name, kind in columns.items():
            if not name.isidentifier():
                raise ValueError(f"metadata column {name!r} must be a name of letters, digits and underscores.")
            options = {"max_length": TEXT_LENGTH} if kind == "VARCHAR" else {}
            schema.add_field(name, getattr(data_type, kind), nullable=True, **options)
        index_params = client.prepare_index_params()
        index_params.add_index(
            "embedding", index_type=index_type, metric_type="IP", params=build_params(index_type, dim)
        )
        if head_tokens is not None:
            width = int(np.prod(head_tokens["shape"]))
            if width > MAX_VECTOR_DIM:
                raise ValueError(
                    f"head tokens of {head_tokens['shape']} ({width} values) exceed Milvus' {MAX_VECTOR_DIM}."
                )
            schema.add_field("tokens", data_type.FLOAT_VECTOR, dim=width)
            index_params.add_index("tokens", index_type="FLAT", metric_type="IP")
        properties = {
            PROPERTY.format("format"): FORMAT_VERSION,
            PROPERTY.format("model"): json.dumps(dict(model or {}), sort_keys=True),
            PROPERTY.format("head_tokens"): json.dumps(dict(head_tokens) if head_tokens is not None else None),
            PROPERTY.format("index_type"): index_type,
        }
        client.create_collection(
            collection, schema=schema, index_params=index_params, consistency_level="Strong", properties=properties
        )
        logger.info("Created Milvus collection %r at %s (%s, dim %d).", collection, uri, index_type, dim)
        return cls(uri, collection, token=token, _client=client)

    def _check_fits(self, dim: int, model: Mapping[str, Any] | None, head_tokens: Mapping[str, Any] | None) -> None:
        self._check_model(model, "the gallery to add comes")
        if int(dim) != self.dim:
            raise ValueError(
                f"Milvus collection {self.collection!r} holds {self.dim}-dimensional embeddings, the model makes "
                f"{dim}-dimensional ones: use another --collection."
            )
        mine = self.head_tokens_info()
        if (mine or {}).get("shape") != (list(head_tokens["shape"]) if head_tokens else None):
            raise ValueError(
                f"Milvus collection {self.collection!r} stores head tokens {mine}, the gallery brings {head_tokens}: "
                "use another --collection."
            )

    def _check_model(self, model: Mapping[str, Any] | None, what: str) -> None:
        if not same_model(self.model, model):
            raise ValueError(
                f"Milvus collection {self.collection!r} was built with {describe_model(self.model)}, but {what} "
                f"from {describe_model(model)}: use that model, or build another collection with this one."
            )

    # -- the protocol --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def __repr__(self) -> str:
        return f"MilvusIndex({self.uri!r}, {self.collection!r}, {self.index_type}, dim={self.dim})"

    def search(
        self,
        query_embeddings: Any,
        k: int = 10,
        *,
        filter: Filter | None = None,
        ef_search: int | None = None,
        nprobe: int | None = None,
    ) -> Results:
        """Each query row's ``k`` nearest items that pass ``filter``, ``{"id", "label", "score", "path"}`` best first.

        ``ef_search`` (HNSW ``ef``; DISKANN ``search_list``) and ``nprobe`` (IVF_PQ) trade speed for recall.
        """
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_LIMIT:
            raise ValueError(f"k must be an integer from 1 to {MAX_LIMIT} (Milvus' largest topk), got {k!r}.")
        queries = normalised(query_embeddings, self.dim, "query embeddings")
        expression = filter_expression(filter, self.columns)
        hits = self.client.search(
            self.collection, data=queries.tolist(), filter=expression, limit=k, anns_field="embedding",
            output_fields=["label", "path"], search_params=search_params(self.index_type, k, ef_search, nprobe),
        )  # fmt: skip
        return [
            [
                {
                    "id": hit["id"],
                    "label": hit["entity"].get("label"),
                    "score": float(hit["distance"]),
                    "path": hit["entity"].get("path"),
                }
                for hit in row
            ]
            for row in hits
        ]

    def add(
        self,
        embeddings: Any,
        ids: Sequence[Any],
        labels: Sequence[str | None] | None = None,
        paths: Sequence[str | None] | None = None,
        metadata: Mapping[str, Sequence[Any]] | None = None,
        *,
        head_tokens: Any = None,
        model: Mapping[str, Any] | None = None,
    ) -> None:
        """Upsert items by id (an existing id is replaced); ``head_tokens``: N×T×C, required when the collection
        stores tokens; ``model``: the embedding model's reference, refused when it is not the collection's."""
        self._check_model(model, "the items to add come")
        vectors = normalised(embeddings, self.dim, "embeddings")
        count = len(vectors)
        keys = [str(value) for value in ids]
        if len(keys) != count:
            raise ValueError(f"ids has {len(keys)} entries for {count} embeddings.")
        if len(set(keys)) != count:
            raise ValueError("ids must be unique within one add; an id that is already in the index is replaced.")
        columns = {"label": labels, "path": paths, **dict(metadata or {})}
        unknown = sorted(set(columns) - set(self.columns))
        if unknown:
            raise ValueError(f"metadata columns {unknown} are not in the collection; its columns: {self.columns}.")
        for name, values in columns.items():
            if values is not None and len(values) != count:
                raise ValueError(f"{name} has {len(values)} entries for {count} embeddings.")
        tokens = self._flat_tokens(head_tokens, count)
        rows = []
        for i in range(count):
            row: dict[str, Any] = {"id": keys[i], "embedding": vectors[i]}
            for name in self.columns:
                values = columns.get(name)
                row[name] = plain_value(values[i]) if values is not None else None
            if tokens is not None:
                row["tokens"] = tokens[i]
            rows.append(row)
        per_row = 4 * (self.dim + (tokens.shape[1] if tokens is not None else 0)) + 512
        step = max(1, BATCH_BYTES // per_row)
        for start in range(0, count, step):
            self.client.upsert(self.collection, rows[start : start + step])

    def _flat_tokens(self, head_tokens: Any, count: int) -> np.ndarray | None:
        info = self.head_tokens_info()
        if head_tokens is None:
            if info is not None:
                raise ValueError(
                    f"Milvus collection {self.collection!r} stores head tokens {info['shape']} for re-ranking: pass "
                    "head_tokens (embed with the model's re-ranker tokens)."
                )
            return None
        array = np.asarray(getattr(head_tokens, "tokens", head_tokens))
        if info is None:
            logger.info("Milvus collection %r stores no head tokens: those given are not kept.", self.collection)
            return None
        if array.shape != (count, *info["shape"]):
            raise ValueError(f"head_tokens must be {count} × {info['shape']}, got shape {array.shape}.")
        return np.ascontiguousarray(array, dtype=np.float16).astype(np.float32).reshape(count, -1)

    def remove(self, ids: Sequence[Any]) -> int:
        """Delete items by id; returns how many were present (unknown ids are ignored)."""
        keys = list(dict.fromkeys(str(value) for value in ids))
        removed = 0
        for start in range(0, len(keys), ID_CHUNK):
            expression = ids_expression(keys[start : start + ID_CHUNK])
            present = self.client.query(self.collection, filter=expression, output_fields=["count(*)"])
            removed += int(present[0]["count(*)"])
            self.client.delete(self.collection, filter=expression)
        return removed

    def _fetch(self, ids: Sequence[str], fields: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        keys = list(dict.fromkeys(str(value) for value in ids))
        for start in range(0, len(keys), ID_CHUNK):
            chunk = keys[start : start + ID_CHUNK]
            rows = self.client.query(
                self.collection, filter=ids_expression(chunk), output_fields=fields, limit=len(chunk)
            )
            found.update((row["id"], row) for row in rows)
        return found

    def records(self, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """``{"id", "label", "path", **metadata}`` of each id, None for an id not in the collection."""
        found = self._fetch(ids, ["id", *self.columns])
        return [
            {"id": key, **{name: found[key].get(name) for name in self.columns}} if key in found else None
            for key in (str(value) for value in ids)
        ]

    def rerank_features(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings N×D float32, head tokens N×T×C float16)`` of ``ids``, in that order."""
        info = self.head_tokens_info()
        if info is None:
            raise ValueError(f"Milvus collection {self.collection!r} stores no head tokens to re-rank with.")
        keys = [str(value) for value in ids]
        found = self._fetch(keys, ["id", "embedding", "tokens"])
        missing = [key for key in keys if key not in found]
        if missing:
            raise KeyError(f"ids not in Milvus collection {self.collection!r}: {missing[:5]}")
        embeddings = np.asarray([found[key]["embedding"] for key in keys], dtype=np.float32).reshape(-1, self.dim)
        tokens = np.asarray([found[key]["tokens"] for key in keys], dtype=np.float32).astype(np.float16)
        return embeddings, tokens.reshape(len(keys), *info["shape"])

    def head_tokens_info(self) -> dict[str, Any] | None:
        """``{"shape": [T, C], "token_stage": ...}`` of the stored re-ranking tokens, or None."""
        if self._head_tokens is None:
            return None
        return {"shape": list(self._head_tokens["shape"]), "token_stage": self._head_tokens.get("token_stage")}

    def info(self) -> dict[str, Any]:
        """``kind``, ``count``, ``dim``, ``model`` and the collection's facts (engine, URI, index type, columns)."""
        lite = self.uri.endswith(".db")
        return {
            "kind": self.kind, "count": len(self), "dim": self.dim, "model": self.model,
            "engine": "Milvus Lite" if lite else "Milvus", "uri": self.uri, "collection": self.collection,
            "index_type": self.index_type, "metric": "IP", "columns": self.columns,
            "head_tokens": self.head_tokens_info(),
        }  # fmt: skip

    @property
    def schema(self) -> Any:
        """The columns as an Arrow schema (as the folder index's items), so that filter values given as text
        (``--filter year=2020``) are converted to the column's type before they reach an expression."""
        import pyarrow as pa

        arrow = {"VARCHAR": pa.string(), "INT64": pa.int64(), "DOUBLE": pa.float64(), "BOOL": pa.bool_()}
        return pa.schema([(name, arrow.get(self._types[name], pa.string())) for name in self.columns])

    def flush(self) -> None:
        """Seal what was added into indexed segments. Milvus seals on its own over time; until then fresh rows sit in
        a growing segment that every search scans (in Milvus Lite: 3,000 fresh rows made a query 140 ms, 6 ms once
        flushed), so a build flushes once at its end rather than after every add."""
        self.client.flush(self.collection)

    def close(self) -> None:
        """Release the client's connection."""
        self.client.close()
