"""CALRec on MovieLens-100K (embedded in the RecBole 1.2.1 wheel), small decoder from scratch.

Item text: "Title: ...; Year: ...; Genre: ..." (ml-100k has no brand or price). Leave-one-out;
Recall@1/5/10 and NDCG@10 over all 1,682 items. The CPU protocol (named in every figure of
BENCHMARKS.md) trains a fixed number of steps; periodic validation ranks items by v_U . v_T on
1,000 users, the final test samples candidate texts for every user.

  python launch/train.py --config configs/calrec/ml100k.py --workdir ~/runs/calrec_ml100k
  python launch/train.py --config configs/calrec/ml100k.py:tiny --workdir /tmp/calrec_tiny
"""

from calrec_jax.config import default_calrec_config, shrink_calrec_to_tiny
from seqrec_jax.default_config import parse_arg


def get_config(arg=None):
  flags = parse_arg(arg)
  c = default_calrec_config()
  c.data.format = "atomic"
  c.data.path = ""  # "" = the ml-100k files inside the installed recbole wheel
  c.data.name = "ml-100k"
  c.data.max_len = 20
  c.calrec.fields = ("title", "year", "genre")
  c.calrec.max_tokens = 192
  c.calrec.max_item_tokens = 32
  c.calrec.max_new_tokens = 32
  c.calrec.tokenizer.vocab_size = 4096
  c.model.preset = "small"
  c.train.num_steps = 3000
  c.train.eval_every_steps = 500
  c.train.batch_size = 32
  c.calrec.eval_users = 943  # every ml-100k user
  c.calrec.test_users = 0
  if "tiny" in flags:
    shrink_calrec_to_tiny(c)
  return c


def get_sweep():
  """The loss ablation: L_NIG only, + L_TT, + L_UT, both, and the brief's negative beta."""
  return [{"calrec.alpha": a, "calrec.beta": b}
          for a, b in ((0.0, 0.0), (0.125, 0.0), (0.0, 0.025), (0.125, 0.025), (0.125, -0.025))]
