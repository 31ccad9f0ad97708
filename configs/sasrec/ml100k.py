"""SASRec on MovieLens-100K (RecBole's ml-100k, embedded in the RecBole 1.2.1 wheel).

SRA-CL reference hyper-parameters with max_len 50; leave-one-out, full ranking.

  python launch/train.py --config configs/sasrec/ml100k.py --workdir ~/runs/sasrec_ml100k
  python launch/train.py --config configs/sasrec/ml100k.py:tiny --workdir /tmp/tiny
"""

from seqrec_jax.default_config import base_config, parse_arg, shrink_to_tiny


def get_config(arg=None):
  flags = parse_arg(arg)
  c = base_config()
  c.data.format = "atomic"
  c.data.path = ""  # "" = the ml-100k files inside the installed recbole wheel
  c.data.name = "ml-100k"
  c.data.max_len = 50
  if "tiny" in flags:
    shrink_to_tiny(c)
  return c


def get_sweep():
  """Three seeds of the quality protocol."""
  return [{"seed": s} for s in (2024, 2025, 2026)]
