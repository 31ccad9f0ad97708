"""BERT4Rec on MovieLens-100K, trained by the cloze task (mask 20%, the target always masked).

  python launch/train.py --config configs/bert4rec/ml100k.py --workdir ~/runs/bert4rec_ml100k
"""

from seqrec_jax.default_config import base_config, bert4rec_model, parse_arg, shrink_to_tiny


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
