"""Export a trained workdir's item embeddings, user vectors and a ScaNN item index.

  python launch/export.py --workdir W --out W/export [--top_k 100 --recall_sample 1000]

Writes item_embeddings.npy / item_ids.json, user_vectors.npy / user_ids.json, scann/ (load with
`scann.scann_ops_pybind.load_searcher` or `seqrec_jax.recommend.load_export`) and export.json,
which records the index parameters and its recall@top_k against exact search on a sample of the
user vectors.  The model's score is checked to be a dot product with the exported item table
before anything is written.  The folder is built as <out>.tmp and renamed when complete.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax

from seqrec_jax import distributed
from seqrec_jax import recommend

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by launch/train.py.")
_OUT = flags.DEFINE_string("out", None, "Export folder; default <workdir>/export.")
_TOP_K = flags.DEFINE_integer("top_k", 100, "K of the index and of the recall check.")
_RECALL_SAMPLE = flags.DEFINE_integer("recall_sample", 1000,
                                      "Users whose index top-K is checked against exact search.")
_TREE_MIN_ITEMS = flags.DEFINE_integer("tree_min_items", 10_000,
                                       "Below this many items the index is exact brute force.")
_NUM_LEAVES = flags.DEFINE_integer("num_leaves", 0, "Tree leaves; 0 = sqrt(items).")
_LEAVES_TO_SEARCH = flags.DEFINE_integer("leaves_to_search", 0, "Leaves per query; 0 = auto.")
_REORDER = flags.DEFINE_integer("reorder", 0, "Candidates re-scored exactly; 0 = 10 x top_k.")
_MIN_RECALL = flags.DEFINE_float("min_recall", 0.95, "Warn below this recall.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None,
                                   "Users per global batch; default config.eval.batch_size.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild a complete export.")
_START_PROCESSES = distributed.define_process_flags()
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _START_PROCESSES()
  rec = recommend.Recommender.from_workdir(_WORKDIR.value, batch_size=_BATCH_SIZE.value)
  out = _OUT.value or os.path.join(rec.workdir, "export")
  manifest = rec.export(out, k=_TOP_K.value, recall_sample=_RECALL_SAMPLE.value,
                        tree_min_items=_TREE_MIN_ITEMS.value, num_leaves=_NUM_LEAVES.value,
                        leaves_to_search=_LEAVES_TO_SEARCH.value, reorder=_REORDER.value,
                        min_recall=_MIN_RECALL.value, overwrite=_OVERWRITE.value)
  if jax.process_index() == 0:
    print(f"{out}: {manifest['n_items']} items, {manifest['n_users']} users, D={manifest['dim']}")
    print(f"index {json.dumps(manifest['index'])}")
    print(f"recall {json.dumps(manifest['recall'])}")


if __name__ == "__main__":
  app.run(main)
