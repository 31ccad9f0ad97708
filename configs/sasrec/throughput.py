"""Speed sweeps of SASRec on Beauty (configs/sasrec/beauty.py): throughput vs batch size, and vs
device count. Run with `launch/sweep.py --mode benchmark` (each run is launch/benchmark.py):

  python launch/sweep.py --mode benchmark --config configs/sasrec/throughput.py --workdir W
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python launch/sweep.py --mode benchmark \
      --config configs/sasrec/throughput.py:devices --workdir W2

`:devices` sweeps `mesh.num_devices` over 1, 2, 4, 8 (data parallel, global batch 256): on a CPU
these are fake devices sharing the same cores, so the table shows partitioning overhead, not
scaling; on a GPU/TPU host they are real.  `:tiny` shrinks the model (for tests).
"""

import importlib.util
import os

from seqrec_jax.default_config import parse_arg, shrink_to_tiny

_spec = importlib.util.spec_from_file_location(
    "sasrec_beauty_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "beauty.py"))
_beauty = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_beauty)

BATCH_SIZES = (64, 128, 256, 512, 1024)
DEVICE_COUNTS = (1, 2, 4, 8)


def get_config(arg=None):
  flags = parse_arg(arg, known=("tiny", "devices"))
  c = _beauty.get_config()
  if "tiny" in flags:
    shrink_to_tiny(c)
  return c


def get_sweep(arg=None):
  flags = parse_arg(arg, known=("tiny", "devices"))
  if "devices" in flags:
    return [{"mesh.num_devices": n} for n in DEVICE_COUNTS]
  return [{"train.batch_size": b} for b in BATCH_SIZES]
