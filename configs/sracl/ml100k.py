"""SRA-CL on MovieLens-100K with a SASRec backbone (offline: MiniLM embeddings of template text).

  python launch/embed.py --config configs/sracl/ml100k.py --workdir ~/runs/sracl_ml100k  # optional
  python launch/train.py --config configs/sracl/ml100k.py --workdir ~/runs/sracl_ml100k

The semantic stage runs inside train.py when <workdir>/semantic has no tables yet.
"""

from seqrec_jax.default_config import base_config, parse_arg, shrink_to_tiny
from sracl_jax.task import default_sracl_config


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
    shrink_to_tiny(c)
    # SRA-CL runs 2 + k + 2 encoder passes per example: shrink further for a 1-2 minute run.
    c.data.max_len = 20
    c.train.batch_size = 64
    c.train.num_steps = 40
    c.train.eval_every_steps = 20
    c.sracl.semantic.user_mode = "user"  # 943 user texts instead of ~97k prefix texts
    c.sracl.semantic.max_seq_length = 32
  return c


def get_sweep():
  """The loss weights, as the paper's sensitivity study."""
  return [{"sracl.alpha": a, "sracl.beta": b} for a in (0.05, 0.1, 0.2) for b in (0.05, 0.1, 0.2)]
