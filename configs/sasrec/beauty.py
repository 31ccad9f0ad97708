"""SASRec on Amazon Beauty (the SRA-CL paper's own Beauty.txt), SRA-CL paper protocol.

max_len 20, hidden 64, 2 layers, 2 heads, inner 256, GELU, dropout 0.5, Adam 1e-3, batch 256, CE
over all items at the last position; early stopping on valid MRR@10 with patience 10 epochs and at
most 100 epochs, as the reference code does.

  python launch/train.py --config configs/sasrec/beauty.py --workdir ~/runs/sasrec_beauty
"""

import os

from seqrec_jax.default_config import base_config, parse_arg, shrink_to_tiny

# ../shared beside the checkout, wherever the command is run from.
BEAUTY_TXT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                                           "shared", "data", "beauty", "Beauty.txt"))


def get_config(arg=None):
  flags = parse_arg(arg)
  c = base_config()
  c.data.format = "pairs"
  c.data.path = BEAUTY_TXT
  c.data.name = "beauty"
  c.data.max_len = 20
  c.train.num_epochs = 100
  c.train.early_stop_metric = "MRR@10"
  if "tiny" in flags:
    shrink_to_tiny(c)
  return c


def get_sweep():
  """Three seeds of the quality protocol."""
  return [{"seed": s} for s in (2024, 2025, 2026)]
