"""What a training step costs when the head gets 7×7 tokens instead of 4×4 (issue 29, item 1).

``tf_efficientnet_lite0`` gives the head 4×4 tokens at 64 px from its stride-16 stage. Two ways to reach the paper's
7×7 = 49 tokens per image: 112 px with the same stride-16 stage, or 224 px with the stride-32 stage (the last map,
the one the embedding pools). Each setting is timed with the head off and with the default head (detached, top-16
list-wise transfer), in the trainer's own step (``scripts/benchmark_transfer_step.py``'s ``make_step``: forward, the
run's objective, backward, per-group clipping, AdamW; BatchNorm frozen; batch 64 = 16 classes × 4; offline ImageNet
weights; random pixels). Rounds are interleaved (one step of every setting per round, after warm-up rounds), so that
machine noise hits all alike; the report gives medians and their ratios to the 64 px step of the same head.

    OMP_NUM_THREADS=1 python scripts/benchmark_token_count_step.py --rounds 7 \
        --output scripts/benchmark_results/emoji_cpu/token_count/step_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_transfer_step import make_step  # noqa: E402  (the trainer's step, shared with that benchmark)

REPO = Path(__file__).resolve().parents[1]
# (name, image size, the head's token stride, tokens per side): stride 32 reaches lite0's last map (conv_head)
SETTINGS: list[tuple[str, int, int, int]] = [
    ("64px_stride16_4x4", 64, 16, 4),
    ("112px_stride16_7x7", 112, 16, 7),
    ("224px_stride32_7x7", 224, 32, 7),
]
HEADS: dict[str, dict[str, Any]] = {
    "head_off": {"cia_levels": 0},
    "default_head": {},  # TrainingConfig's defaults: detached head, top-16 list-wise transfer (weight set below)
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    names = [name for name, *_ in SETTINGS]
    parser.add_argument("--settings", nargs="+", default=names, choices=names, help="the first is the baseline")
    parser.add_argument("--output", type=Path, default=REPO / "outputs" / "benchmarks" / "token_count_step.json")
    args = parser.parse_args()
    settings = [s for s in SETTINGS if s[0] in args.settings]
    settings.sort(key=lambda s: args.settings.index(s[0]))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    labels = torch.arange(16).repeat_interleave(4)
    load_before = os.getloadavg()[0]
    steps, tokens = {}, {}
    for name, size, stride, side in settings:
        pixels = torch.randn(64, 3, size, size).contiguous(memory_format=torch.channels_last)
        for head, fields in HEADS.items():
            fields = {**fields, "cia_token_stride": stride}
            if head == "default_head":
                fields["cia_distill_weight"] = 50.0  # the recipes' TRANSFER_WEIGHT (None in a bare config)
            steps[f"{name}/{head}"] = make_step(fields, pixels, labels, image_size=size)
        tokens[name] = side * side
    times: dict[str, list[float]] = {key: [] for key in steps}
    for round_index in range(args.warmup + args.rounds):
        for key, step in steps.items():
            started = time.perf_counter()
            step()
            if round_index >= args.warmup:
                times[key].append(time.perf_counter() - started)
        print(f"round {round_index + 1}/{args.warmup + args.rounds}", file=sys.stderr, flush=True)
    medians = {key: statistics.median(values) for key, values in times.items()}
    rows = {}
    for name, size, stride, _ in settings:
        row: dict[str, Any] = {"image_size": size, "cia_token_stride": stride, "tokens_per_image": tokens[name]}
        for head in HEADS:
            key = f"{name}/{head}"
            base = f"{settings[0][0]}/{head}"
            row[f"{head}_ms"] = round(1000 * medians[key], 1)
            row[f"{head}_ratio_to_64px"] = round(medians[key] / medians[base], 3)
            row[f"{head}_median_of_round_ratios_to_64px"] = round(
                statistics.median(a / b for a, b in zip(times[key], times[base])), 3
            )
        row["head_on_over_head_off"] = round(medians[f"{name}/default_head"] / medians[f"{name}/head_off"], 3)
        rows[name] = row
    result = {
        "threads": args.threads,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "batch": "64 = 16 classes x 4",
        "rows": rows,
        "times_ms": {key: [round(1000 * t, 1) for t in values] for key, values in times.items()},
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
