"""SRA-CL on MovieLens-100K with a SASRec backbone (offline: MiniLM embeddings of template text).

  python launch/embed.py --config configs/sracl/ml100k.py --workdir ~/runs/sracl_ml100k  # optional
  python launch/train.py --config configs/sracl/ml100k.py --workdir ~/runs/sracl_ml100k

The semantic stage runs inside train.py when <workdir>/semantic has no tables yet.
"""

from seqrec_jax.default_config import base_config, parse_arg, shrink_to_tiny
from sracl_jax.task import default_sracl_config, shrink_sracl_to_tiny


def get_config(arg=None):
  flags = parse_arg(arg)
  c = base_config()
  c.task.name = "sracl"
  c.data.format = "atomic"
  c.data.path = ""  # ml-100k from the recbole wheel
  c.data.name = "ml-100k"
  c.data.max_len = 50
  c.sracl = default_sracl_config()
  c.sracl.semantic.domain = "movie"
  if "tiny" in flags:
    shrink_sracl_to_tiny(shrink_to_tiny(c))
  return c


def get_sweep():
  """The loss weights, as the paper's sensitivity study."""
  return [{"sracl.alpha": a, "sracl.beta": b} for a in (0.05, 0.1, 0.2) for b in (0.05, 0.1, 0.2)]
