"""GRU4Rec on MovieLens-100K (RecBole-style: embedding 64, GRU 128, CE over all items).

  python launch/train.py --config configs/gru4rec/ml100k.py --workdir ~/runs/gru4rec_ml100k
"""

from seqrec_jax.default_config import base_config, gru4rec_model, parse_arg, shrink_to_tiny


def get_config(arg=None):
  flags = parse_arg(arg)
  c = base_config()
  c.data.format = "atomic"
  c.data.path = ""
  c.data.name = "ml-100k"
  c.data.max_len = 50
  c.model = gru4rec_model()
  if "tiny" in flags:
    shrink_to_tiny(c)
  return c


def get_sweep():
  return [{"seed": s} for s in (2024, 2025, 2026)]
