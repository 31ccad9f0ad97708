"""BERT4Rec on MovieLens-100K, trained by the cloze task (mask 20%, the target always masked).

  python launch/train.py --config configs/bert4rec/ml100k.py --workdir ~/runs/bert4rec_ml100k
"""

import ml_collections

from seqrec_jax.default_config import base_config, parse_arg, shrink_to_tiny


def bert4rec_model() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.name = "bert4rec"
  m.hidden = 64
  m.n_layers = 2
  m.n_heads = 2
  m.inner = 256
  m.dropout = 0.2  # hidden dropout
  m.attn_dropout = 0.2  # attention-probability dropout
  m.act = "gelu"
  m.ln_eps = 1e-12
  m.init_std = 0.02
  m.vocab_pad_multiple = 64  # n_items + 2 rows (padding, items, [MASK]) rounded up
  m.dtype = "float32"
  m.mask_prob = 0.2  # cloze masking probability per item (the last one is always masked)
  m.loss_positions = "last"  # unused by the cloze task; kept for the config validator
  return m


def get_config(arg=None):
  flags = parse_arg(arg)
  c = base_config()
  c.task.name = "cloze"
  c.data.format = "atomic"
  c.data.path = ""
  c.data.name = "ml-100k"
  c.data.max_len = 50
  c.model = bert4rec_model()
  if "tiny" in flags:
    shrink_to_tiny(c)
  return c


def get_sweep():
  return [{"seed": s} for s in (2024, 2025, 2026)]
