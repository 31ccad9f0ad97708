"""CALRec on MovieLens-100K (embedded in the RecBole 1.2.1 wheel), small decoder from scratch.

Item text: "Title: ...; Year: ...; Genre: ..." (ml-100k has no brand or price). Leave-one-out;
Recall@1/5/10 and NDCG@10 over all 1,682 items, every user.

This is the CPU protocol named in BENCHMARKS.md: a 2-layer d=128 decoder (0.8M parameters) trained
from scratch for 800 steps of 32 sequences of 160 tokens (~0.26 epoch of the training prefixes),
validated by embedding retrieval every 400 steps; the final valid/test evaluation samples 8
texts per user. On an accelerator raise model.preset / train.num_steps.

  python launch/train.py --config configs/calrec/ml100k.py --workdir ~/runs/calrec_ml100k
  python launch/train.py --config configs/calrec/ml100k.py:tiny --workdir /tmp/calrec_tiny
"""

from calrec_jax.config import (cpu_decoder_budget, default_calrec_config, loss_ablation_sweep,
                               shrink_calrec_to_tiny)
from seqrec_jax.default_config import parse_arg


def get_config(arg=None):
  flags = parse_arg(arg)
  c = default_calrec_config()
  c.data.format = "atomic"
  c.data.path = ""  # "" = the ml-100k files inside the installed recbole wheel
  c.data.name = "ml-100k"
  c.data.max_len = 20
  c.calrec.fields = ("title", "year", "genre")
  c.calrec.max_tokens = 160
  c.calrec.max_item_tokens = 32
  c.calrec.max_new_tokens = 32
  c.calrec.tokenizer.vocab_size = 4096  # ml-100k's texts support ~2.2k BPE tokens
  cpu_decoder_budget(c)
  c.calrec.eval_users = 943  # every ml-100k user
  c.calrec.test_users = 0
  if "tiny" in flags:
    shrink_calrec_to_tiny(c)
  return c


def get_sweep():
  """The loss ablation (see calrec_jax.config.loss_ablation_sweep)."""
  return loss_ablation_sweep()
