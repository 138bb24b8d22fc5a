"""The last step of an :class:`~.builder.IndexBuilder`: the faiss index of its kind over the streamed vectors, and
the manifest of the one-segment folder (the same manifest :mod:`.folder` writes for a saved index)."""

from __future__ import annotations

import json
import os
from typing import Any

import faiss
import numpy as np

from . import kinds
from .columns import read_table
from .queries import IndexQueries
from .segments import Segment
from .storage import TRAINED_FILE


def assemble(builder: Any, lookup: np.ndarray) -> str:
    """Write the builder's faiss index (and, for IVF kinds, its on-disk lists and trained template) into its
    staging folder; the manifest's text."""
    from .folder import manifest

    staging, names, kind, count = builder.staging, builder.names, builder.kind, builder.count
    options = dict(builder.options)
    target_recall = options.pop("target_recall", kinds.DEFAULT_TARGET_RECALL)
    params = kinds.initial_params(kind, count, **options)
    token_info = None
    if builder.tokens is not None:
        token_info = (list(builder.tokens.inner), builder.token_stage)
    index = IndexQueries()  # the per-index state the manifest and the kinds' builders read
    index._setup(kind, builder.dim, params, None, builder.model, token_info)
    files = [names["items"], names["index"], names["idhash"]] + ([names["tokens"]] if token_info else [])
    trained_name = None
    if kind != "exact":
        vectors = np.load(builder.vectors.path, mmap_mode="r")
        rows = np.arange(count, dtype=np.int64)
        if kind == "ivfpq":
            from .ivfpq_kind import build_ondisk

            index.calibration, index.trained = build_ondisk(index, vectors, staging, names, target_recall,
                                                            builder.progress)  # fmt: skip
        else:
            faiss_index, index.calibration = kinds.build(kind, vectors, rows, index.params, target_recall)
            if kind == "ivf":
                index.trained = faiss.IndexIVFFlat(faiss.clone_index(faiss_index.quantizer), builder.dim,
                                                   faiss_index.nlist, faiss.METRIC_INNER_PRODUCT)  # fmt: skip
                with kinds.quiet_stdout():
                    kinds.write_ivf_ondisk(faiss_index, index.trained, staging, names["index"].rsplit(".", 1)[0])
            else:
                faiss.write_index(faiss_index, str(staging / names["index"]))
            del faiss_index
            os.replace(builder.vectors.path, staging / names["embeddings"])
        del vectors
        files.append(names["embeddings"])
        if kind in ("ivf", "ivfpq"):
            files.append(names["ivfdata"])
            trained_name = TRAINED_FILE.format("000000")
            faiss.write_index(index.trained, str(staging / trained_name))
    table = read_table(staging / names["items"])
    segment = Segment(kind, 0, table, None, np.zeros((0, builder.dim)), None, lookup, "000001", files, staging)
    index.next_segment = 2
    return json.dumps(manifest(index, [segment], count, 0, None, trained_name, 0), ensure_ascii=False)
