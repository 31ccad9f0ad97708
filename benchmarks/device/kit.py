"""Semantic tables small enough to travel to a lent GPU machine, and back to full size there.

A device call carries at most 64 MiB, and Beauty's prefix embeddings alone are 192 MiB
(131,413 x 384 float32).  They carry no information of their own:

* `user_mode=items`: each row is the normalised mean of the prefix's last items' embeddings,
  recomputed from `item_embeddings.npy` and the data in about a second;
* `user_mode=user`: one distinct row per user, repeated over that user's prefixes, stored as the
  distinct rows plus an index.

  python benchmarks/device/kit.py --action=slim --src ~/runs/sracl_beauty_items/semantic \
      --dst .kit/sem/beauty_items
  # on the other machine, before training (the config must read the same data):
  python benchmarks/device/kit.py --action=restore --dst .kit/sem/beauty_items \
      --config configs/sracl/beauty.py:items --config.data.path=.kit/data/amazon-beauty-text

`restore` rebuilds `prefix_embeddings.npy` and checks it bit for bit (SHA-256) against the
original, and checks the data's fingerprint against `stats.json`, so training there loads these
tables unchanged instead of recomputing them.
"""

import hashlib
import json
import os
import shutil
import sys

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from seqrec_jax import fileio  # pylint: disable=g-import-not-at-top
from seqrec_jax import loop
from sracl_jax.semantic import pipeline

MANIFEST = pipeline.KIT_MANIFEST
PREFIX = "prefix_embeddings.npy"
FLAGS = flags.FLAGS


def _sha256(arr: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(arr).view(np.uint8).reshape(-1)).hexdigest()


def slim(src: str, dst: str) -> dict:
  """Copies the tables in `src` to `dst` without the derivable prefix embeddings."""
  with open(os.path.join(src, "stats.json"), encoding="utf-8") as f:
    stats = json.load(f)
  prefix = np.load(os.path.join(src, PREFIX), allow_pickle=False)
  entry = {"sha256": _sha256(prefix), "shape": list(prefix.shape), "dtype": prefix.dtype.str}
  os.makedirs(dst, exist_ok=True)
  for name in os.listdir(src):
    path = os.path.join(src, name)
    if name != PREFIX and os.path.isfile(path):
      shutil.copy2(path, os.path.join(dst, name))
  if stats.get("user_mode") == "items":
    entry["rebuild"] = "mean_item_vectors"
  else:
    rows, inverse = np.unique(prefix, axis=0, return_inverse=True)
    np.save(os.path.join(dst, "prefix_rows.npy"), rows)
    np.save(os.path.join(dst, "prefix_inverse.npy"), inverse.reshape(-1).astype(np.int32))
    entry["rebuild"] = "rows_inverse"
  with open(os.path.join(dst, MANIFEST), "w", encoding="utf-8") as f:
    json.dump({"prefix_embeddings": entry, "fingerprint": stats.get("fingerprint")}, f, indent=1)
  return entry


def rebuild_prefixes(dst: str, entry: dict, split, semantic_cfg) -> np.ndarray:
  """The prefix embeddings that `slim` left out, from the slim copy (and the data)."""
  if entry["rebuild"] == "rows_inverse":
    rows = np.load(os.path.join(dst, "prefix_rows.npy"), allow_pickle=False)
    return rows[np.load(os.path.join(dst, "prefix_inverse.npy"), allow_pickle=False)]
  if entry["rebuild"] != "mean_item_vectors":
    raise ValueError(f"{dst}/{MANIFEST}: unknown rebuild method {entry['rebuild']!r}")
  opts = pipeline.resolve_config(semantic_cfg)
  item_embeddings = np.load(os.path.join(dst, "item_embeddings.npy"), allow_pickle=False)
  return pipeline.items_mode_prefix_vectors(split, item_embeddings,
                                            int(opts["max_history_items"]))


def restore(dst: str, split, semantic_cfg) -> None:
  """Writes `dst`/prefix_embeddings.npy again and checks it and the data against the originals.

  Args:
    dst: the slim copy.
    split: the LeaveOneOutSplit the tables were built from (`loop.load_split(config)`).
    semantic_cfg: `config.sracl.semantic` of that config.
  """
  with open(os.path.join(dst, MANIFEST), encoding="utf-8") as f:
    manifest = json.load(f)
  entry = manifest["prefix_embeddings"]
  fp, _ = pipeline.fingerprint(split, pipeline.resolve_config(semantic_cfg))
  if fp != manifest["fingerprint"]:
    raise ValueError(f"{dst}: the tables were built from other data or settings (fingerprint "
                     f"{manifest['fingerprint']}, this config's data gives {fp})")
  prefix = rebuild_prefixes(dst, entry, split, semantic_cfg)
  if list(prefix.shape) != entry["shape"] or _sha256(prefix) != entry["sha256"]:
    raise ValueError(f"{dst}: rebuilt prefix embeddings {prefix.shape} differ from the "
                     f"original {entry['shape']} (SHA-256 mismatch)")
  # A temporary file of its own: two jobs of run_jobs.sh may restore the same copy at once.
  fileio.atomic_write(os.path.join(dst, PREFIX), lambda f: np.save(f, prefix, allow_pickle=False))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.action == "slim":
    if not FLAGS.src:
      raise app.UsageError("--action=slim needs --src")
    entry = slim(os.path.expanduser(FLAGS.src), FLAGS.dst)
    print(f"slim copy in {FLAGS.dst}: prefix embeddings {entry['shape']} left out "
          f"({entry['rebuild']})")
  else:
    if FLAGS.config is None:
      raise app.UsageError("--action=restore needs --config")
    restore(FLAGS.dst, loop.load_split(FLAGS.config), FLAGS.config.sracl.semantic)
    print(f"{FLAGS.dst}: prefix embeddings rebuilt and checked")


if __name__ == "__main__":
  # Flags are defined here, not at import, so that tests can import this module beside others.
  flags.DEFINE_enum("action", None, ["slim", "restore"], "What to do.")
  flags.DEFINE_string("src", None, "slim: the semantic tables directory to copy.")
  flags.DEFINE_string("dst", None, "slim: where the slim copy goes; restore: that copy.")
  config_flags.DEFINE_config_file("config", None, "restore: the experiment config whose data the "
                                  "tables were built from.", lock_config=True)
  flags.mark_flags_as_required(["action", "dst"])
  app.run(main)
