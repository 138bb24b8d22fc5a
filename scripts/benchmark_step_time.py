"""Training-step time with the cross-image-attention head on versus off, on synthetic batches (no data loading).

Default: the paper's protocol on a GPU — ResNet-50, 224 px, batch 112 (56 classes × 2), D = 512, bf16, frozen
BatchNorm, Adam — for a few head widths; target ratio ≤ 1.10. Measurements of the head-on and head-off models are
interleaved (ABAB…) and compared by their medians, so machine noise hits both alike.

    python scripts/benchmark_step_time.py                         # GPU, the R50 protocol
    python scripts/benchmark_step_time.py --backbone tf_efficientnet_lite0 --image_size 64 --batch_size 64 \
        --samples_per_class 4 --embedding_dim 128 --cia_dims 128 --precision fp32   # the CPU glyph recipe
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from crossmetric import CrossMetricConfig, CrossMetricForMetricLearning
from crossmetric.training.losses.registry import build_objective


def build(args: argparse.Namespace, levels: int, width: int, device: torch.device):
    config = CrossMetricConfig(
        backbone=args.backbone,
        embedding_dim=args.embedding_dim,
        image_size=args.image_size,
        cia_levels=levels,
        cia_dim=width,
        cia_heads=args.cia_heads,
    )
    model = CrossMetricForMetricLearning(config).to(device).train()
    for module in model.modules():  # frozen BatchNorm, as the R50 recipe
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            for parameter in module.parameters():
                parameter.requires_grad_(False)
    objective = build_objective().to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=4e-4)
    return model, objective, optimizer


def step(model, objective, optimizer, pixels, labels, device, dtype) -> None:
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        output = model(pixels)
    similarities = tuple(s.float() for s in output.conditional_similarities or ())
    loss = objective(output.embeddings.float(), labels, similarities).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=112)
    parser.add_argument("--samples_per_class", type=int, default=2)
    parser.add_argument("--embedding_dim", type=int, default=512)
    parser.add_argument("--cia_levels", type=int, default=2)
    parser.add_argument("--cia_heads", type=int, default=8)
    parser.add_argument("--cia_dims", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmarks/step_time.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    torch.manual_seed(0)
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.arange(args.batch_size // args.samples_per_class, device=device).repeat_interleave(
        args.samples_per_class
    )

    def timed(setup) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step(*setup, pixels, labels, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    settings = {**vars(args), "output": str(args.output)}
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "settings": settings}
    baseline = build(args, 0, args.cia_dims[0], device)
    rows = []
    for width in args.cia_dims:
        head_on = build(args, args.cia_levels, width, device)
        for _ in range(args.warmup):
            timed(baseline), timed(head_on)
        off, on = [], []
        for _ in range(args.steps):
            off.append(timed(baseline))
            on.append(timed(head_on))
        row = {
            "cia_dim": width,
            "cia_levels": args.cia_levels,
            "head_off_seconds": statistics.median(off),
            "head_on_seconds": statistics.median(on),
        }
        row["ratio"] = row["head_on_seconds"] / row["head_off_seconds"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del head_on
    results["rows"] = rows
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
