r"""``crossmetric search``: the gallery images nearest to query images, from a saved index.

    crossmetric search --model MODEL --index INDEX query.jpg [more.jpg ...] [--top_k 5] [--json] [--rerank_top_k 20]
    crossmetric search --model MODEL --milvus gallery.db --collection NAME query.jpg  (a Milvus collection)
    crossmetric search --model MODEL --index INDEX query.jpg --filter label=cat,dog --filter color=red

``--filter COLUMN=VALUE[,VALUE...]`` (repeatable) keeps the items whose column holds one of the values: OR within a
flag, AND across flags, applied inside the index's search, so ``--top_k`` results come back however few items pass.
A comma inside a value is written ``\,`` (``--filter 'maker=Smith\, J.'``): :mod:`crossmetric.retrieval.filter_spec`.

``--rerank_top_k K`` re-scores each query's K nearest with the model's re-ranker (``reranker/``) on the head tokens
the index stores; items past K keep the embedding's order (``retrieval/reranking.py``). A model without a re-ranker,
and ``--backend onnx`` (whose graph outputs the embedding only), are refused before any model is loaded.

Exit codes: 0 success, 2 bad input (a clear message on stderr, before any model is loaded).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ..inference.loaded_model import LoadedModel
from ..inference.loading import resolve_model
from ..retrieval.filter_spec import parse_filter_specs, typed_filter
from ..retrieval.reranking import check_rerank_top_k
from .arguments import (
    add_backend_argument,
    add_device_argument,
    add_progress_argument,
    apply_progress,
    parse_and_run,
    report_error,
)
from .logging_setup import add_log_level_argument
from .milvus_arguments import add_milvus_arguments, check_target, open_milvus_index

DESCRIPTION = "Find the gallery images nearest to query images in a saved index."


def add_search_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``crossmetric search``."""
    parser.add_argument(
        "--model", required=True, help="exported model folder, training run folder (its model/), or Hub id"
    )
    parser.add_argument("--index", default=None, help="index folder or Hub repo id (default: the model's index/)")
    parser.add_argument("images", nargs="+", help="query image files")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object per query")
    parser.add_argument(
        "--filter", action="append", default=[], metavar="COLUMN=VALUE[,VALUE...]",
        help="keep items whose COLUMN (label, path or a metadata column) is one of the values; repeatable: OR within "
        r"a flag, AND across flags; a comma inside a value is written \,",
    )  # fmt: skip
    parser.add_argument(
        "--rerank_top_k", type=int, default=None,
        help="re-rank each query's K nearest with the model's re-ranker (a model trained with the head); the rest "
        "keep the embedding's order",
    )  # fmt: skip
    add_device_argument(parser)
    add_backend_argument(parser)
    add_progress_argument(parser)  # the bars of a model or index downloaded from the Hub
    add_milvus_arguments(parser)  # --milvus URI --collection NAME instead of --index
    return add_log_level_argument(parser)


def run_search(ns: argparse.Namespace) -> int:
    """Run ``crossmetric search``: the ``top_k`` nearest entries for each query image, as text or JSON lines."""
    from ..retrieval.search import open_index, search_images

    apply_progress(ns.progress)
    try:
        milvus = check_target(ns, "--index", required=False)  # the flags and the extra, before anything else
        kind, model = resolve_model(ns.model)
        if kind == "checkpoint":
            raise ValueError(
                f"--model {ns.model!r} is a training checkpoint without an export: run `crossmetric export` first."
            )
        if ns.top_k < 1:
            raise ValueError(f"--top_k must be >= 1, got {ns.top_k}.")
        wanted = parse_filter_specs(ns.filter)
        missing = [image for image in ns.images if not Path(image).is_file()]
        if missing:
            raise ValueError(f"query image(s) not found: {', '.join(missing)}.")
        rerank_top_k = None
        if ns.rerank_top_k is not None:
            rerank_top_k = check_rerank_top_k(ns.rerank_top_k, "--rerank_top_k")
            if ns.backend == "onnx":
                raise ValueError(
                    "--rerank_top_k needs --backend torch: the ONNX graph outputs the embedding, not the head's tokens."
                )
        device = ns.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() and ns.backend == "torch" else "cpu"
        index = open_milvus_index(ns) if milvus else ns.index
        # resolved, checked for a re-ranker and loaded once (the re-ranker's refusal comes before any weight is read)
        loaded = LoadedModel.load(
            ns.model, backend=ns.backend, rerank=rerank_top_k is not None, device=device, resolved=(kind, model)
        )
        index = open_index(index, loaded)
        results = search_images(
            loaded,
            index,
            list(ns.images),
            ns.top_k,
            backend=ns.backend,
            device=device,
            rerank_top_k=rerank_top_k,
            filter=typed_filter(wanted, index),  # a column the index lacks is refused before a query is embedded
        )
    except (ValueError, FileNotFoundError, ImportError) as error:
        return report_error("search", error)
    for image, hits in zip(ns.images, results):
        if ns.json:
            print(json.dumps({"query": image, "results": hits}, ensure_ascii=False))
            continue
        print(image)
        for rank, hit in enumerate(hits, 1):
            label = f"  [{hit['label']}]" if hit["label"] is not None else ""
            reranked = (
                f"  (re-ranked: head {hit['head_score']:.4f}, cosine {hit['cosine']:.4f})"
                if hit.get("reranked")
                else ""
            )
            print(f"  {rank:>3}. {hit['score']:.4f}  {hit['id']}{label}{reranked}")
    return 0


def main(argv: Sequence[str]) -> int:
    """Parse ``argv`` and run ``crossmetric search``."""
    return parse_and_run(argv, add_search_arguments, run_search, "crossmetric search", DESCRIPTION)
