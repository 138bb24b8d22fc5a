"""Load a model with ``trust_remote_code`` in a fresh process where crossmetric cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

_SCRIPT = """
import importlib.abc, sys
class BlockCrossmetric(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "crossmetric" or name.startswith("crossmetric."):
            raise ImportError("crossmetric is blocked in this process")
sys.meta_path.insert(0, BlockCrossmetric())
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "crossmetric" not in sys.modules
assert model.__class__.__module__.startswith("transformers_modules"), model.__class__.__module__
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).pooler_output, sys.argv[3])
"""


def embed_with_remote_code(model: str | Path, pixel_values: torch.Tensor, work_dir: Path) -> torch.Tensor:
    """``pooler_output`` of ``model`` (a folder or Hub id) on ``pixel_values``, computed by the remote code alone."""
    torch.save(pixel_values, work_dir / "pixels.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(work_dir / "modules")}
    command = [sys.executable, "-c", _SCRIPT, str(model), str(work_dir / "pixels.pt"), str(work_dir / "out.pt")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(work_dir / "out.pt")
