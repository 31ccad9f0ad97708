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
"""

import os

from calrec_jax.config import default_calrec_config, loss_ablation_sweep, shrink_calrec_to_tiny
from seqrec_jax.default_config import parse_arg

_DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                      "..", "shared", "data"))
CATEGORIES = (f"beauty|p5|{os.path.join(_DATA, 'amazon-beauty-text')}",
              f"toys|p5|{os.path.join(_DATA, 'amazon-toys-text')}")


def get_config(arg=None):
  flags = parse_arg(arg)
  c = default_calrec_config()
  c.calrec.categories = CATEGORIES
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
  if "tiny" in flags:
    shrink_calrec_to_tiny(c)
  return c


def get_sweep():
  """The loss ablation (see calrec_jax.config.loss_ablation_sweep)."""
  return loss_ablation_sweep()
