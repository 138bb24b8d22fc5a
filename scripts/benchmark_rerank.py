"""The cost of re-ranking at query time: ms per query on top of the search, and the bytes stored per gallery item.

The main job's architecture (``tf_efficientnet_lite0`` at 64 px, D = 128, the head's tokens from the stride-16 stage:
4×4 tokens × 112 channels, 2 levels of width 128, 4 attention heads) with the offline ImageNet backbone
(``pypi:efficientnet-lite0``) and a randomly initialised head (the cost does not depend on the head's values),
exported as the library exports it (``reranker/`` next to the embedder). A gallery of ``--gallery`` images is
indexed with ``crossmetric``'s own build (exact search, head tokens in float16); then, for ``--queries`` query images
already embedded (their single backbone pass gives the embedding and the tokens), one query at a time:

- ``search``: the index's ``--top_k`` nearest (``EmbeddingIndex.search_arrays``);
- ``search + re-rank``: the same search with its ``--rerank_top_k`` nearest re-scored by the re-ranker on their stored
  tokens (``retrieval.reranking.search_and_rerank``, what ``search --rerank_top_k`` and the pipeline run);
- ``head only``: ``CrossMetricReranker.query_scores`` on the K candidates' features, already gathered.

The three are interleaved query by query after a warm-up, and the re-ranking cost is the median of the per-query
differences (search + re-rank − search), in wall-clock time and in this process's CPU time (on a machine shared with
other jobs, the wall clock also counts the time the scheduler gave to them). Also measured: the backbone pass with
and without capturing the tokens (the forward hook must cost nothing). Writes JSON (``--output``, default
``scripts/benchmark_results/rerank_cpu/rerank_cost.json``) and prints a summary.

    python scripts/benchmark_rerank.py                  # 2 threads, 1000 gallery images, 200 queries, K = 20
    OMP_WAIT_POLICY=PASSIVE python scripts/benchmark_rerank.py --output .../rerank_cost_passive_wait.json
    python scripts/benchmark_rerank.py --threads 1 --output .../rerank_cost_1_thread.json

On a machine shared with other jobs, two threads that spin while waiting for each other (OpenMP's default policy) lose
most of their time to the other jobs; ``OMP_WAIT_POLICY=PASSIVE`` or one thread shows the cost itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from crossmetric import CrossMetricConfig, CrossMetricForMetricLearning, EmbeddingIndex  # noqa: E402
from crossmetric.inference.pretrained import load_pretrained_backbone  # noqa: E402
from crossmetric.modeling.reranker_inputs import RerankFeatures  # noqa: E402
from crossmetric.modeling.reranking_crossmetric import CrossMetricReranker, embed_with_tokens  # noqa: E402
from crossmetric.retrieval.reranking import search_and_rerank  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_MS = 5.0


def main_job_model() -> CrossMetricForMetricLearning:
    """The main job's architecture with the offline ImageNet backbone and a random head."""
    config = CrossMetricConfig(
        backbone="tf_efficientnet_lite0", image_size=64, embedding_dim=128, cia_levels=2, cia_dim=128, cia_heads=4,
        cia_token_stride=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CrossMetricForMetricLearning(config)
    load_pretrained_backbone(model, "pypi:efficientnet-lite0")
    return model.eval()


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` 72×72 images of smooth random colour blobs (varied enough for distinct embeddings)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((72, 72), Image.BICUBIC)
        paths.append(folder / f"{i:05d}.png")
        image.save(paths[-1])
    return paths


def per_query_times(
    index: EmbeddingIndex, reranker: CrossMetricReranker, queries: RerankFeatures, top_k: int, k: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per query of the search, the search with re-ranking, and the head alone, interleaved query by query;
    wall-clock (``*``) and this process's CPU time (``cpu_*``: what a quiet core would take, on a loaded machine)."""
    times: dict[str, list[float]] = {}
    embeddings, tokens = queries.embeddings.numpy(), queries.tokens.numpy()
    for q in range(-warmup, len(embeddings)):
        row = max(q, 0)
        clocks = [(time.perf_counter(), time.process_time())]
        _, rows = index.search_arrays(embeddings[row : row + 1], top_k)
        clocks.append((time.perf_counter(), time.process_time()))
        search_and_rerank(index, reranker, embeddings[row : row + 1], tokens[row : row + 1], top_k, k)
        clocks.append((time.perf_counter(), time.process_time()))
        head = rows[0][:k]
        candidates = torch.from_numpy(index.embeddings[head]), torch.from_numpy(index.head_tokens.tokens[head])
        clocks.append((time.perf_counter(), time.process_time()))
        reranker.query_scores(queries.embeddings[row], queries.tokens[row], *candidates)
        clocks.append((time.perf_counter(), time.process_time()))
        if q < 0:
            continue
        spans = {"search": (0, 1), "search_rerank": (1, 2), "head_only": (3, 4)}
        for name, (a, b) in spans.items():
            times.setdefault(name, []).append(clocks[b][0] - clocks[a][0])
            times.setdefault(f"cpu_{name}", []).append(clocks[b][1] - clocks[a][1])
    return times


@torch.no_grad()
def backbone_pass_times(embedder: Any, stage: str, rounds: int) -> dict[str, float]:
    """Median ms of one query's backbone pass, plain and capturing the head's tokens (interleaved)."""
    pixels = torch.randn(1, 3, 64, 64)
    plain, captured = [], []
    for round_index in range(rounds + 5):
        start = time.perf_counter()
        embedder(pixels)
        middle = time.perf_counter()
        embed_with_tokens(embedder, pixels, stage)
        end = time.perf_counter()
        if round_index >= 5:
            plain.append(middle - start)
            captured.append(end - middle)
    return {
        "plain_ms": round(1000 * statistics.median(plain), 2),
        "with_tokens_ms": round(1000 * statistics.median(captured), 2),
    }


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    model = main_job_model()
    reranker = model.to_reranker(alpha=1.0, reranks=True, validation={"reason": "benchmark: a random head"})
    export = folder / "export"
    model.save_embedder(export, write_extra=lambda staging: reranker.save_pretrained(staging / "reranker"))
    gallery = write_images(folder / "gallery", args.gallery, seed=0)
    start = time.perf_counter()
    index = EmbeddingIndex.from_folder(str(export), folder / "gallery", batch_size=64, progress=False)
    build_seconds = time.perf_counter() - start
    loaded = CrossMetricReranker.from_pretrained(export / "reranker")
    queries = loaded.encode(write_images(folder / "queries", args.queries, seed=1), batch_size=64)
    times = per_query_times(index, loaded, queries, args.top_k, args.rerank_top_k, args.warmup)
    embedder = loaded.embedder_and_processor()[0]
    differences = [r - s for r, s in zip(times["search_rerank"], times["search"])]  # the same query's two calls
    cpu_differences = [r - s for r, s in zip(times["cpu_search_rerank"], times["cpu_search"])]
    token_shape = list(index.head_tokens.tokens.shape[1:])
    medians = {name: 1000 * statistics.median(values) for name, values in times.items()}
    return {
        "gallery_items": len(gallery),
        "queries": args.queries,
        "top_k": args.top_k,
        "rerank_top_k": args.rerank_top_k,
        "index_build_seconds": round(build_seconds, 2),
        "token_stage": loaded.config.token_stage,
        "head_tokens_per_item": token_shape,
        "bytes_per_item_head_tokens": int(index.head_tokens.bytes_per_item),
        "bytes_per_item_embedding": int(index.embeddings.shape[1] * 4),
        "median_ms": {name: round(value, 3) for name, value in medians.items()},
        "rerank_ms_per_query_on_top_of_search": round(1000 * statistics.median(differences), 3),
        "rerank_ms_per_query_p90": round(1000 * float(np.percentile(differences, 90)), 3),
        "rerank_cpu_ms_per_query_on_top_of_search": round(1000 * statistics.median(cpu_differences), 3),
        "target_ms": TARGET_MS,
        "backbone_pass_one_query": backbone_pass_times(embedder, loaded.config.token_stage, args.rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the issue's figure: 2)")
    parser.add_argument("--gallery", type=int, default=1000, help="gallery images indexed")
    parser.add_argument("--queries", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--top_k", type=int, default=20, help="results per query")
    parser.add_argument("--rerank_top_k", type=int, default=20, help="candidates re-scored per query")
    parser.add_argument("--warmup", type=int, default=10, help="untimed queries first")
    parser.add_argument("--rounds", type=int, default=50, help="timed backbone passes")
    parser.add_argument(
        "--output", type=Path, default=REPO / "scripts" / "benchmark_results" / "rerank_cpu" / "rerank_cost.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="crossmetric-rerank-bench-") as folder:
        figures = run(args, Path(folder))
    report = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        **figures,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    median, tokens = report["median_ms"], " × ".join(map(str, report["head_tokens_per_item"]))
    print(
        f"re-ranking {args.rerank_top_k} candidates with stored tokens: "
        f"{report['rerank_ms_per_query_on_top_of_search']:.2f} ms per query on top of the search "
        f"({median['search']:.2f} ms; head alone {median['head_only']:.2f} ms; "
        f"p90 {report['rerank_ms_per_query_p90']:.2f} ms; target <= {TARGET_MS} ms) on {report['threads']} threads; "
        f"CPU time {report['rerank_cpu_ms_per_query_on_top_of_search']:.2f} ms per query\n"
        f"stored per gallery item: {report['bytes_per_item_head_tokens']} bytes of head tokens ({tokens} float16) + "
        f"{report['bytes_per_item_embedding']} bytes of embedding\n"
        f"backbone pass of one query: {report['backbone_pass_one_query']}\n"
        f"load average (1 min) before/after: {report['load_average_before_after']}; written to {args.output}"
    )


if __name__ == "__main__":
    main()
