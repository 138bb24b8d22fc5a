"""Test-only pause points, so that fault-injection tests can kill a run at an exact moment.

Set ``CROSSMETRIC_TEST_PAUSE=POINT:N:SECONDS`` (e.g. ``checkpoint_write:2:60``) and the N-th time this process
reaches :func:`fault_point` ``POINT`` it prints ``CROSSMETRIC_TEST_PAUSE POINT #N`` to stdout and sleeps SECONDS;
a test that reads the output kills the process with SIGKILL when the line appears. Points in the code:

- ``checkpoint_write``: a checkpoint's contents are in ``.checkpoint-STEP.partial``, not yet marked complete
  (:func:`crossmetric.training.checkpointing.write_checkpoint`);
- ``train_step``: an optimizer step is done (and its ``save_steps`` checkpoint written), the next batch not yet
  drawn (:meth:`crossmetric.training.trainer.CrossMetricTrainer._train_epoch`);
- ``index_change``: an index change (add, remove, compact) has written its new files, not yet swapped the index's
  manifest (:func:`crossmetric.retrieval.folder.change`);
- ``embedding``: a batch of images is embedded (an evaluation split's, say: the metrics are not computed yet)
  (:func:`crossmetric.inference.embedding.embed_images`).

Without the variable (every normal run) a point costs one dictionary lookup. Used by ``tests/test_faults.py``.
"""

from __future__ import annotations

import os
import time
from collections import Counter

ENVIRONMENT_VARIABLE = "CROSSMETRIC_TEST_PAUSE"
MARKER = "CROSSMETRIC_TEST_PAUSE"
_reached: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Pause here if ``CROSSMETRIC_TEST_PAUSE`` asks for this point and occurrence (see the module docstring)."""
    setting = os.environ.get(ENVIRONMENT_VARIABLE)
    if not setting:
        return
    point, occurrence, seconds = setting.split(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(occurrence):
        print(f"{MARKER} {name} #{_reached[name]}", flush=True)
        time.sleep(float(seconds))
