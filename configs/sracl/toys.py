"""SRA-CL on Amazon Toys and Games (5-core, P5 item titles and categories), the Beauty protocol.

`../shared/data/amazon-toys-text`: 19,412 users, 11,924 items, 167,597 interactions. Same
hyper-parameters, flags and sweeps as configs/sracl/beauty.py (max_len 20, early stop on valid
MRR@10; `:items`, `:gru4rec`, `:bert4rec`, `:tiny`; sweeps `:ablation`, `:compare`, `:seeds`).

  python launch/train.py --config configs/sracl/toys.py:items --workdir ~/runs/sracl_toys
"""

import os

from sracl_jax import experiments

TOYS_TEXT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                          "..", "shared", "data", "amazon-toys-text"))


def get_config(arg=None):
  return experiments.amazon_text_config(TOYS_TEXT, "toys-text", "toy", arg)


def get_sweep(arg=None):
  """The loss weights (default), or the flags' arm x seed sweeps."""
  return experiments.sweep_for_flags(arg, experiments.LOSS_WEIGHT_SWEEP)
