"""MetricWriter: metrics.jsonl rows, TensorBoard mirroring, resume truncation, and a run on an
image without tensorboardX (the lent GPU's) that must still write every row."""

import glob
import json
import os
import sys

from absl import logging

from seqrec_jax import writers


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_rows_and_tensorboard_events(tmp_path):
  w = writers.MetricWriter(str(tmp_path))
  w.write(10, "train", {"loss": 1.5})
  w.write(20, "valid", {"NDCG@10": 0.25})
  w.close()
  assert _rows(tmp_path / writers.METRICS_FILE) == [
      {"step": 10, "split": "train", "loss": 1.5},
      {"step": 20, "split": "valid", "NDCG@10": 0.25}]
  assert glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))


def test_resume_drops_rows_after_the_restored_step(tmp_path):
  w = writers.MetricWriter(str(tmp_path))
  for step in (10, 20, 30):
    w.write(step, "train", {"loss": float(step)})
  w.close()
  w = writers.MetricWriter(str(tmp_path), resume_step=20)
  w.write(25, "train", {"loss": 0.0})
  w.close()
  assert [r["step"] for r in _rows(tmp_path / writers.METRICS_FILE)] == [10, 20, 25]


def test_without_tensorboardx_rows_are_still_written(tmp_path, monkeypatch):
  # A None entry in sys.modules makes `import tensorboardX` raise ImportError.
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
  w = writers.MetricWriter(str(tmp_path))
  w.write(5, "valid", {"HR@10": 0.5})
  w.close()
  assert _rows(tmp_path / writers.METRICS_FILE) == [{"step": 5, "split": "valid", "HR@10": 0.5}]
  assert not os.path.exists(tmp_path / "tensorboard")
  assert len(warnings) == 1 and "tensorboardX is not installed" in warnings[0]


def test_disabled_writer_writes_nothing(tmp_path):
  w = writers.MetricWriter(str(tmp_path), enabled=False)
  w.write(1, "train", {"loss": 1.0})
  w.close()
  assert os.listdir(tmp_path) == []
