"""SRA-CL on Amazon Beauty (5-core, P5 item titles and categories), SRA-CL paper protocol.

The SRA-CL paper's Beauty.txt has no item text; `../shared/data/amazon-beauty-text` is the same
5-core (22,363 users, 12,101 items, 198,502 interactions) with titles and category paths.
Backbone and training as configs/sasrec/beauty.py (max_len 20, early stop on valid MRR@10).
"""

import os

from seqrec_jax.default_config import base_config, parse_arg, shrink_to_tiny
from sracl_jax.task import default_sracl_config, shrink_sracl_to_tiny

BEAUTY_TEXT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                            "..", "shared", "data", "amazon-beauty-text"))


def get_config(arg=None):
  flags = parse_arg(arg)
  c = base_config()
  c.task.name = "sracl"
  c.data.format = "p5"
  c.data.path = BEAUTY_TEXT
  c.data.name = "beauty-text"
  c.data.max_len = 20
  c.train.num_epochs = 100
  c.train.early_stop_metric = "MRR@10"
  c.sracl = default_sracl_config()
  c.sracl.semantic.domain = "beauty product"
  if "tiny" in flags:
    shrink_sracl_to_tiny(shrink_to_tiny(c))
  return c


def get_sweep():
  """k and the loss weights."""
  return ([{"sracl.k": k} for k in (5, 10)] +
          [{"sracl.alpha": a, "sracl.beta": b} for a in (0.05, 0.1, 0.2) for b in (0.05, 0.1, 0.2)])
