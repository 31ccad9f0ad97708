"""CALRec on Amazon categories with item text: Stage I on their mixture, Stage II per category.

Default categories: Beauty and Toys (5-core, P5 format with titles and category paths, from
`../shared/data/amazon-{beauty,toys}-text`). Any list works: `--config.calrec.categories` takes
"name|format|path" strings (format p5, pairs, atomic or amazon, e.g. the Amazon 2018 files).

The tokenizer is trained on every listed category's item texts in every arm, so the Stage I,
Stage II and Stage I + II runs share one vocabulary. Evaluation always covers every category.

  # Stage I (mixture, category sampled with probability ~ #users^0.3)
  python launch/train.py --config configs/calrec/amazon.py --workdir ~/runs/calrec_stage1
  # Stage II from Stage I, one category
  python launch/train.py --config configs/calrec/amazon.py --workdir ~/runs/calrec_beauty_s12 \
      --config.calrec.train_on=beauty --config.calrec.init_from=$HOME/runs/calrec_stage1
  # Stage II only (from scratch, one category)
  python launch/train.py --config configs/calrec/amazon.py --workdir ~/runs/calrec_beauty_s2 \
      --config.calrec.train_on=beauty

Flags (comma-separated after the path):
  cpu     the CPU protocol of BENCHMARKS.md §5 (the ml-100k protocol's 2-layer d=128 decoder,
          800 steps of 32 sequences of 192 tokens, checkpoint chosen by the valid generation loss)
  beauty  / toys: only that category (its own tokenizer; trained and evaluated on it alone)
  tiny    a one-to-two-minute smoke run
  stages  (sweeps only) the stage ablation instead of the loss ablation: Stage I on the mixture,
          Stage II only (from scratch) per category, Stage I + II per category

  # the stage ablation, CPU protocol (five runs in order: Stage I first; resumable)
  python launch/sweep.py --config configs/calrec/amazon.py:cpu,stages \
      --workdir ~/runs/calrec_stages \
      --metrics beauty/Recall@10,beauty/NDCG@10,toys/Recall@10,toys/NDCG@10

  # the loss ablation on Beauty, CPU protocol (five arms; resumable)
  python launch/sweep.py --config configs/calrec/amazon.py:cpu,beauty \
      --workdir ~/runs/calrec_beauty_ablation
"""

import os

from calrec_jax.config import (cpu_decoder_budget, default_calrec_config, loss_ablation_sweep,
                               shrink_calrec_to_tiny)
from seqrec_jax.default_config import parse_arg

_DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                      "..", "shared", "data"))
CATEGORIES = (f"beauty|p5|{os.path.join(_DATA, 'amazon-beauty-text')}",
              f"toys|p5|{os.path.join(_DATA, 'amazon-toys-text')}")


FLAGS = ("tiny", "cpu", "beauty", "toys", "stages")


def get_config(arg=None):
  flags = parse_arg(arg, known=FLAGS)
  c = default_calrec_config()
  only = [name for name in ("beauty", "toys") if name in flags]
  if len(only) > 1:
    raise ValueError(f"config flags {only}: pick one category (or neither for both)")
  c.calrec.categories = tuple(s for s in CATEGORIES if not only or s.startswith(only[0] + "|"))
  c.calrec.train_on = "all"  # Stage I; "beauty" / "toys" for Stage II
  c.data.max_len = 20
  # The P5 files carry title and category path; brand and price read "unknown" as in the paper.
  c.calrec.fields = ("title", "category")
  c.calrec.max_tokens = 256
  c.calrec.max_item_tokens = 48
  c.calrec.max_new_tokens = 48
  c.calrec.tokenizer.vocab_size = 8192
  c.model.preset = "small"
  c.train.num_steps = 3000
  c.train.eval_every_steps = 500
  c.calrec.eval_users = 1000
  c.calrec.test_users = 2000  # CPU protocol: a fixed random 2,000 users per category
  if "cpu" in flags:
    cpu_protocol(c)
  if "tiny" in flags:
    shrink_calrec_to_tiny(c)
  return c


def cpu_protocol(c):
  """The ml-100k CPU protocol's decoder and budget on Amazon text (BENCHMARKS.md §5); the
  valid/test users stay get_config's 1,000 / 2,000 per category."""
  cpu_decoder_budget(c)
  c.calrec.tokenizer.vocab_size = 4096
  c.calrec.max_tokens = 192
  c.calrec.max_item_tokens = 40
  c.calrec.max_new_tokens = 40
  # Select the checkpoint by the valid target-text loss: embedding retrieval stays at chance in
  # arms without both contrastive terms, so selecting by it is arbitrary there (§5, ml-100k).
  c.train.early_stop_metric = "gen/nig"
  c.train.early_stop_mode = "min"
  return c


def get_sweep(arg=None):
  """The loss ablation (see calrec_jax.config.loss_ablation_sweep), or with `stages` the stage
  ablation: Stage I, Stage II only and Stage I + II (Stage II from the sweep's Stage I run)."""
  flags = parse_arg(arg, known=FLAGS)
  if "stages" not in flags:
    return loss_ablation_sweep()
  names = [s.split("|")[0] for s in get_config(arg).calrec.categories]
  if len(names) < 2:
    raise ValueError(f"the stage ablation needs several categories, got {names}")
  # Category by category (Stage II only, then I + II), so each category's comparison is complete
  # as early as possible.
  stage1 = "{sweep}/train_on=all"
  return [{"calrec.train_on": "all"}] + [
      arm for n in names
      for arm in ({"calrec.train_on": n}, {"calrec.train_on": n, "calrec.init_from": stage1})]
