"""Writes an index folder in format version 1 exactly as ``EmbeddingIndex.save`` did before format 2, so that the
tests can check that such folders still load (and that their checks still name the file at fault)."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
from safetensors.numpy import save_file

from crossmetric.retrieval.index import EmbeddingIndex


def save_v1(index: EmbeddingIndex, folder: Path) -> Path:
    """``metadata.json`` (with the per-row ids, labels, paths), ``embeddings.safetensors``, ``index.faiss`` and, with
    head tokens, ``head_tokens.safetensors``: the version-1 layout. ``index`` must be fresh (one segment, nothing
    removed), as every version-1 index was."""
    assert len(index.segments) == 1 and index.removed_count == 0
    folder.mkdir(parents=True)
    faiss.write_index(index.faiss_index, str(folder / "index.faiss"))
    save_file({"embeddings": np.ascontiguousarray(index.embeddings)}, str(folder / "embeddings.safetensors"),
              metadata={"format": "np"})  # fmt: skip
    tokens = index.head_tokens
    meta = {
        "format_version": 1, "library": "crossmetric 0.1.0", "kind": index.kind, "metric": "inner_product",
        "dim": index.dim, "count": len(index), "params": index.params, "calibration": index.calibration,
        "model": index.model, "ids": index.ids, "labels": index.labels, "paths": index.paths,
        "head_tokens": None if tokens is None else {
            "file": "head_tokens.safetensors", "shape": list(tokens.tokens.shape[1:]), "dtype": "float16",
            "token_stage": tokens.token_stage, "bytes_per_item": tokens.bytes_per_item,
        },
    }  # fmt: skip
    if tokens is not None:
        save_file({"tokens": np.ascontiguousarray(tokens.tokens)}, str(folder / "head_tokens.safetensors"),
                  metadata={"format": "np"})  # fmt: skip
    (folder / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder
