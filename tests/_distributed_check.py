"""Run under ``accelerate launch --num_processes 2``: the gathered base loss equals the single-process loss.

Every process builds the same global batch, takes its rank's half, gathers embeddings with gradients and computes
the objective; the mean over processes must equal the loss of one process on the whole batch, and each process's
gradient must be that of the whole-batch loss (up to the factor DDP's averaging removes).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from crossmetric.training.config import TrainingConfig
from crossmetric.training.distributed import all_gather_labels, all_gather_with_gradient
from crossmetric.training.losses.registry import objective_from_config

accelerator = Accelerator()
rank, world = accelerator.process_index, accelerator.num_processes
generator = torch.Generator().manual_seed(0)
full = F.normalize(torch.randn(16, 8, generator=generator), dim=-1)
labels = torch.arange(8).repeat_interleave(2)
objective = objective_from_config(TrainingConfig(cia_levels=0, embedding_dim=8), num_classes=8)

whole = full.clone().requires_grad_(True)
expected = objective(whole, labels, ()).loss
expected.backward()

local = full[rank * 8 : (rank + 1) * 8].clone().requires_grad_(True)
local_labels = labels[rank * 8 : (rank + 1) * 8]
gathered = all_gather_with_gradient(local)
query_index = torch.arange(rank * 8, (rank + 1) * 8)
loss = objective(
    local,
    local_labels,
    (),
    gathered_embeddings=gathered,
    gathered_labels=all_gather_labels(local_labels),
    query_index=query_index,
).loss
loss.backward()
mean_loss = accelerator.reduce(loss.detach(), reduction="mean")
grad_error = (local.grad / world - whole.grad[rank * 8 : (rank + 1) * 8]).abs().max().item()
result = {"rank": rank, "expected": expected.item(), "gathered_mean": mean_loss.item(), "grad_error": grad_error}
print(json.dumps(result), flush=True)
# leave the process group before the interpreter exits: gloo's threads abort the process otherwise (seen in CI)
accelerator.wait_for_everyone()
accelerator.end_training()
if abs(result["expected"] - result["gathered_mean"]) > 1e-5 or grad_error > 1e-6:
    sys.exit(1)
