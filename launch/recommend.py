"""Batch top-K recommendations of a trained workdir's best checkpoint, streamed to JSONL.

  python launch/recommend.py --workdir W --top_k 100 --out W/recs.jsonl        # every user
  python launch/recommend.py --workdir W --users users.txt --exclude_seen       # a subset

Each row is {"user": <original id>, "items": [<original ids>], "scores": [...]}, best first; each
user's whole sequence (validation and test items included) is the history, so the items are the
predicted *next* ones.  The config comes from <workdir>/config.json: no config flags.  A complete
output file from the same settings is skipped on rerun; a killed run leaves only `<out>.tmp`.
Multi-process runs (same flags as launch/train.py) write one file per process:
recs-00000-of-00002.jsonl, ...

A CALRec workdir (config task.name "calrec") is served by calrec_jax.recommend.CalrecRecommender
with the same flags and file format: sampled item texts, BM25, the config's merge rule
(--method=embedding ranks by v_U . v_T instead); --rng_seed and --category apply to it only.

  python launch/recommend.py --workdir W_calrec --top_k 50 --rng_seed 0
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from seqrec_jax import distributed
from seqrec_jax import loop
from seqrec_jax import recommend

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by launch/train.py.")
_OUT = flags.DEFINE_string(
    "out", None, "Output file: JSONL, or Parquet when it ends in .parquet (needs pyarrow); "
    "default <workdir>/recs.jsonl.")
_TOP_K = flags.DEFINE_integer("top_k", 100, "Items per user.")
_USERS = flags.DEFINE_string("users", None,
                             "File of original user ids, one per line; default every user.")
_EXCLUDE_SEEN = flags.DEFINE_bool("exclude_seen", False,
                                  "Leave the user's history items out of the recommendations.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None,
                                   "Users per global batch; default config.eval.batch_size.")
_DECIMALS = flags.DEFINE_integer("decimals", 6, "Decimals of the scores in the file (-1: exact).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Redo a complete output file (or one with other settings).")
_PROGRESS = flags.DEFINE_bool("progress", True, "tqdm progress bar (users/s).")
_METHOD = flags.DEFINE_enum("method", "generate", ["generate", "embedding"],
                            "CALRec only: sampled texts + BM25 merge, or v_U . v_T ranking.")
_RNG_SEED = flags.DEFINE_integer("rng_seed", 0, "CALRec only: sampling seed.")
_CATEGORY = flags.DEFINE_string("category", None,
                                "CALRec only: the category of a multi-category (Stage I) workdir.")
_START_PROCESSES = distributed.define_process_flags()
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _START_PROCESSES()
  config = loop.load_workdir_config(_WORKDIR.value)
  kwargs = {}
  if config.task.name == "calrec":
    from calrec_jax import recommend as calrec_recommend  # pylint: disable=g-import-not-at-top
    rec = calrec_recommend.CalrecRecommender.from_workdir(_WORKDIR.value,
                                                          batch_size=_BATCH_SIZE.value)
    kwargs = dict(method=_METHOD.value, rng_seed=_RNG_SEED.value, category=_CATEGORY.value)
  else:
    calrec_only = [f.name for f in (_METHOD, _RNG_SEED, _CATEGORY) if f.present]
    if calrec_only:
      raise app.UsageError(f"--{', --'.join(calrec_only)} apply to CALRec workdirs only; "
                           f"{_WORKDIR.value} trains {config.model.name}")
    rec = recommend.Recommender.from_workdir(_WORKDIR.value, batch_size=_BATCH_SIZE.value)
  users = recommend.read_id_file(_USERS.value) if _USERS.value else None
  out = _OUT.value or os.path.join(rec.workdir, "recs.jsonl")
  stats = rec.write_topk(out, _TOP_K.value, users=users, exclude_seen=_EXCLUDE_SEEN.value,
                         overwrite=_OVERWRITE.value, progress=_PROGRESS.value,
                         decimals=None if _DECIMALS.value < 0 else _DECIMALS.value, **kwargs)
  if stats["skipped"]:
    print(f"{stats['path']}: complete ({stats['rows']} users), skipped")
  else:
    print(f"{stats['path']}: {stats['rows']} users in {stats['seconds']:.1f} s "
          f"({stats['users_per_second']:.0f} users/s)")


if __name__ == "__main__":
  app.run(main)
