"""Paired per-user comparison of two arms of runs (e.g. SRA-CL seeds vs the backbone's seeds).

  python launch/compare_runs.py --a 'W/seed=*' --b 'W/alpha=0.0_beta=0.0_seed=*' \
      [--metrics HR@10,NDCG@10,HR@20,NDCG@20] [--stage test] [--out cmp.json] [--md cmp.md]

Each run's <workdir>/eval_ranks.npz (written when it finishes; `launch/eval.py --workdir W
--write_ranks` for older runs) gives every user's target rank. The table has each arm's mean ±
std over runs (the seed spread), the difference, its 95% paired-bootstrap interval over users
and a sign-flip permutation p-value (seqrec_jax/paired.py). A second table gives the share of
users whose target ranks in each band (1, 2-5, 6-10, ...) and the median rank; `--plot` draws
each arm's HR@K at every K.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from seqrec_jax import paired

_A = flags.DEFINE_list("a", None, "Arm A: workdirs or glob patterns (quote them).")
_B = flags.DEFINE_list("b", None, "Arm B: workdirs or glob patterns.")
_A_NAME = flags.DEFINE_string("a_name", "A", "Arm A's name in the table.")
_B_NAME = flags.DEFINE_string("b_name", "B", "Arm B's name in the table.")
_METRICS = flags.DEFINE_list("metrics", ["HR@10", "NDCG@10", "HR@20", "NDCG@20"], "Metrics.")
_STAGE = flags.DEFINE_enum("stage", "test", ["valid", "test"], "Evaluation stage.")
_N = flags.DEFINE_integer("n_resamples", 10_000, "Bootstrap and permutation resamples.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the resampling.")
_OUT = flags.DEFINE_string("out", None, "Write the comparison here as JSON.")
_MD = flags.DEFINE_string("md", None, "Write the Markdown tables here.")
_PLOT = flags.DEFINE_string("plot", None, "Draw both arms' HR@K at every K, and A - B, here (.png).")
flags.mark_flags_as_required(["a", "b"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  result = paired.compare(paired.expand(_A.value), paired.expand(_B.value), _METRICS.value,
                          stage=_STAGE.value, n_resamples=_N.value, seed=_SEED.value)
  profile = paired.rank_profile({_A_NAME.value: result["a"], _B_NAME.value: result["b"]},
                                stage=_STAGE.value)
  table = (paired.to_markdown(result, _A_NAME.value, _B_NAME.value) + "\nWhere the targets rank: " +
           paired.profile_markdown(profile))
  print(table)
  if _PLOT.value:
    paired.save_profile_plot(_PLOT.value, profile)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=2)
  if _MD.value:
    with open(_MD.value, "w") as f:
      f.write(table)


if __name__ == "__main__":
  app.run(main)
