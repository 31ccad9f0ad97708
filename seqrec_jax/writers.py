"""Metric output: `metrics.jsonl` (one JSON row per log event) and TensorBoard event files.

Only process 0 writes.  On resume, rows logged after the restored step (by a run that died before
its next checkpoint) are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from typing import Dict

from absl import logging

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Appends {"step", "split", metrics...} rows and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if not enabled:
      return
    self._truncate_after(resume_step)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError:
      # An image without tensorboardX (the lent GPU's) still trains: metrics.jsonl holds every row.
      logging.warning("tensorboardX is not installed: metrics go to %s only, no TensorBoard "
                      "events (pip install tensorboardX)", self.path)
      return
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step or None)

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip()]
    kept = [r for r in rows if json.loads(r)["step"] <= step]
    if len(kept) != len(rows):
      logging.info("dropping %d metric rows logged after the restored step %d",
                   len(rows) - len(kept), step)
      with open(self.path, "w") as f:
        f.writelines(kept)

  def write(self, step: int, split: str, values: Dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is None:
      return
    for k, v in values.items():
      # TensorBoard tags allow [A-Za-z0-9_./-]: "NDCG@10" -> "NDCG_10".
      self._tb.add_scalar(f"{split}/{k.replace('@', '_')}", float(v), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
