"""SRA-CL on MovieLens-100K (offline: MiniLM embeddings of template text).

  python launch/embed.py --config configs/sracl/ml100k.py --workdir ~/runs/sracl_ml100k  # optional
  python launch/train.py --config configs/sracl/ml100k.py --workdir ~/runs/sracl_ml100k

The semantic stage runs inside train.py when <workdir>/semantic has no tables yet. Flags and
sweeps as configs/sracl/beauty.py: `:items`, `:gru4rec`, `:bert4rec`, `:tiny`; sweeps
`:ablation`, `:compare`, `:seeds` (default: the loss weights, as the paper's sensitivity study).
"""

from seqrec_jax.default_config import base_config
from sracl_jax import experiments


def get_config(arg=None):
  c = base_config()
  c.task.name = "sracl"
  c.data.format = "atomic"
  c.data.path = ""  # ml-100k from the recbole wheel
  c.data.name = "ml-100k"
  c.data.max_len = 50
  c.sracl = experiments.sracl_section("movie")
  return experiments.apply_flags(c, arg)


def get_sweep(arg=None):
  """The loss weights (default), or the flags' arm x seed sweeps."""
  return experiments.sweep_for_flags(arg, experiments.LOSS_WEIGHT_SWEEP)
