"""What a training step costs with the head on detached tokens and a transfer term, against a head-off step.

Issue 20's budget: a step with the transfer at most 1.25x a head-off step at the default recipe on CPU. The steps are
the trainer's own: ``CrossMetricForMetricLearning`` forward, the run's objective (``objective_from_config`` of a
``TrainingConfig``: multi-similarity, the head's per-level losses, the transfer), backward, per-group gradient
clipping as the trainer does it, an AdamW step. ``tf_efficientnet_lite0`` at 64 px from the offline ImageNet weights,
batch 64 (16 classes x 4), BatchNorm in eval mode (frozen, as the recipe). Interleaved rounds (A B C ..., one of each
per round, after warm-up) on random pixels; medians and the ratio of medians to the head-off step.

    python scripts/benchmark_transfer_step.py --threads 1 --rounds 15
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from crossmetric.inference.pretrained import load_pretrained_backbone
from crossmetric.modeling.modeling_crossmetric import CrossMetricForMetricLearning
from crossmetric.training.config import TrainingConfig
from crossmetric.training.losses.registry import objective_from_config
from crossmetric.training.optimization import batchnorm_layers, clip_groups

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, Any]] = {
    "head_off": {"cia_levels": 0},
    "head_detached": {"cia_detach": True},  # the head as a re-ranker, no transfer
    "head_detached_listwise": {  # the ranking-form transfer (the costliest: top-k gather and softmax)
        "cia_detach": True,
        "cia_distill_weight": 50.0,
        "cia_distill_form": "listwise",
        "cia_distill_temperature": 0.1,
    },  # fmt: skip
    "head_detached_kl": {"cia_detach": True, "cia_distill_weight": 50.0},
    "head_with_backbone_gradient": {"cia_detach": False},  # the head as it trained before (issue 20's "today")
}


def make_step(fields: dict[str, Any], pixels: torch.Tensor, labels: torch.Tensor, image_size: int = 64):
    config = TrainingConfig(image_size=image_size, embedding_dim=128, **fields)
    model = CrossMetricForMetricLearning(config.model_config())
    load_pretrained_backbone(model, "pypi:efficientnet-lite0")
    model = model.train().to(memory_format=torch.channels_last)
    for module in batchnorm_layers(model):
        module.eval()
    objective = objective_from_config(config, num_classes=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        output = model(pixels)
        similarities = tuple(s.float() for s in output.conditional_similarities or ())
        loss = objective(output.embeddings.float(), labels, similarities, step=100).loss
        loss.backward()
        for parameters in clip_groups(model, model, config.cia_detach):
            torch.nn.utils.clip_grad_norm_(parameters, 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPO / "outputs" / "benchmarks" / "transfer_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pixels = torch.randn(64, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(16).repeat_interleave(4)
    steps = {name: make_step(fields, pixels, labels) for name, fields in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.warmup + args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - started)
        print(f"round {round_index + 1}/{args.warmup + args.rounds}", file=sys.stderr, flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "threads": args.threads,
        "rounds": args.rounds,
        "median_ms": {name: round(1000 * value, 1) for name, value in medians.items()},
        "ratio_to_head_off": {name: round(value / medians["head_off"], 3) for name, value in medians.items()},
        "median_of_round_ratios": {
            name: round(statistics.median(a / b for a, b in zip(times[name], times["head_off"])), 3) for name in times
        },
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
