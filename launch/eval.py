"""Evaluate the best checkpoint of a finished (or running) workdir.

  python launch/eval.py --workdir ~/runs/beauty [--exclude_seen] [--out eval.json] [--write_ranks]

--write_ranks (re)writes <workdir>/eval_ranks.npz, each evaluated user's target rank, as runs
write it when they finish (for runs finished before they did), for launch/compare_runs.py.

The config is read from <workdir>/config.json, so no config flags are repeated.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

from seqrec_jax import loop

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by launch/train.py.")
_EXCLUDE_SEEN = flags.DEFINE_bool("exclude_seen", False, "Rank history items out of the list.")
_OUT = flags.DEFINE_string("out", None, "Also write the metrics here as JSON.")
_WRITE_RANKS = flags.DEFINE_bool("write_ranks", False,
                                 "Also (re)write <workdir>/eval_ranks.npz (per-user target ranks).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  results = loop.evaluate_workdir(_WORKDIR.value, exclude_seen=_EXCLUDE_SEEN.value,
                                  write_ranks=_WRITE_RANKS.value)
  print(loop.format_results(results))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)
  logging.info("evaluated best step %d of %s", results["best_step"], _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
