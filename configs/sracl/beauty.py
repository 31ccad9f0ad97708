"""SRA-CL on Amazon Beauty (5-core, P5 item titles and categories), SRA-CL paper protocol.

The SRA-CL paper's Beauty.txt has no item text; `../shared/data/amazon-beauty-text` is the same
5-core (22,363 users, 12,101 items, 198,502 interactions) with titles and category paths.
Backbone and training as configs/sasrec/beauty.py (max_len 20, early stop on valid MRR@10).

  python launch/train.py --config configs/sracl/beauty.py --workdir ~/runs/sracl_beauty

Flags (`configs/sracl/beauty.py:items,gru4rec`): `items` = the cheap user mode (a prefix's vector
from its items' embeddings; minutes instead of hours of text encoding on a CPU); `gru4rec` /
`bert4rec` = that backbone instead of SASRec; `tiny`. Sweeps (launch/sweep.py): the default is the
k / loss-weight sensitivity; `:ablation` runs the paper's arms (sracl_jax/experiments.py) x 3
seeds, `:compare` SRA-CL vs the backbone alone x 3 seeds, `:seeds` SRA-CL x 3 seeds. Share one
semantic stage between the runs of a sweep:

  python launch/embed.py --config configs/sracl/beauty.py:items --workdir ~/runs/sracl_beauty_items
  python launch/sweep.py --config configs/sracl/beauty.py:items,ablation --workdir ~/runs/abl \
      --override=--config.sracl.semantic_dir=$HOME/runs/sracl_beauty_items/semantic
"""

import os

from sracl_jax import experiments

BEAUTY_TEXT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                            "..", "shared", "data", "amazon-beauty-text"))


def get_config(arg=None):
  return experiments.amazon_text_config(BEAUTY_TEXT, "beauty-text", "beauty product", arg)


def get_sweep(arg=None):
  """k and the loss weights (default), or the flags' arm x seed sweeps."""
  return experiments.sweep_for_flags(
      arg, [{"sracl.k": k} for k in (5, 10)] + experiments.LOSS_WEIGHT_SWEEP)
