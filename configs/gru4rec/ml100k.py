"""GRU4Rec on MovieLens-100K (RecBole-style: embedding 64, GRU 128, CE over all items).

  python launch/train.py --config configs/gru4rec/ml100k.py --workdir ~/runs/gru4rec_ml100k
"""

import ml_collections

from seqrec_jax.default_config import base_config, parse_arg, shrink_to_tiny


def gru4rec_model() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.name = "gru4rec"
  m.hidden = 64  # item embedding / representation width
  m.gru_hidden = 128  # GRU state width
  m.n_layers = 1
  m.dropout = 0.3  # embedding dropout
  m.init_std = 0.02
  m.vocab_pad_multiple = 64
  m.dtype = "float32"
  m.loss_positions = "last"
  return m


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
