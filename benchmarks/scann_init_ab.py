"""ScaNN tree centre initialisation, k-means++ vs random: reproducibility, recall and build time.

Builds the prefix-prefix top-k table of a semantic stage's `prefix_embeddings.npy` twice with each
`retrieval.scann_init`, interleaved (kmeans++, random, kmeans++, random), in one process, and
reports per init: build and search seconds, sampled recall@k against exact search, and how many
rows differ between its two builds (and how many neighbours those rows share).  (Builds in two
processes differ with random init too; the tests check k-means++ across processes.)

  python benchmarks/scann_init_ab.py --embeddings SEM/prefix_embeddings.npy \
      --out benchmarks/results/scann_init_toys_cpu.json
"""

import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app
from absl import flags

from sracl_jax.semantic import retrieval

_EMB = flags.DEFINE_string("embeddings", None, "A [rows, dim] .npy (e.g. prefix_embeddings.npy).")
_K = flags.DEFINE_integer("k", 10, "Neighbours per row (self excluded).")
_SAMPLE = flags.DEFINE_integer("recall_sample", 2000, "Queries sampled for recall@k.")
_OUT = flags.DEFINE_string("out", "", "Write the JSON summary here too.")
flags.mark_flags_as_required(["embeddings"])


def main(argv):
  del argv
  x = np.load(_EMB.value, mmap_mode="r")
  x = np.ascontiguousarray(x, np.float32)
  builds = {init: [] for init in retrieval.SCANN_INITS}
  for init in ("kmeans++", "random", "kmeans++", "random"):
    idx, _, st = retrieval.nearest_neighbours(x, x, _K.value, exclude_self=True, method="scann",
                                              scann_init=init, recall_sample=_SAMPLE.value,
                                              progress=False)
    builds[init].append((idx, st))
    print(f"{init}: build {st['build_seconds']:.1f} s, search {st['search_seconds']:.1f} s, "
          f"recall@{_K.value} {st['recall_at_k']:.4f}", flush=True)
  summary = {"embeddings": os.path.abspath(_EMB.value), "rows": int(x.shape[0]),
             "dim": int(x.shape[1]), "k": _K.value,
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
             "load_average_at_end": os.getloadavg()[0], "inits": {}}
  for init, runs in builds.items():
    (a, sa), (b, sb) = runs
    differ = (a != b).any(axis=1)
    shared = (float(np.mean([len(set(p) & set(q)) for p, q in zip(a[differ], b[differ])]))
              if differ.any() else float(_K.value))
    summary["inits"][init] = {
        "build_seconds": [sa["build_seconds"], sb["build_seconds"]],
        "search_seconds": [sa["search_seconds"], sb["search_seconds"]],
        "recall_at_k": [sa["recall_at_k"], sb["recall_at_k"]],
        "rows_differing_between_builds": int(differ.sum()),
        "neighbours_shared_on_differing_rows": shared,
        "params": {key: sa[key] for key in ("num_leaves", "num_leaves_to_search", "reorder")}}
    print(f"{init}: {int(differ.sum())} of {len(a)} rows differ between its two builds "
          f"(sharing {shared:.2f} of {_K.value} neighbours on those)")
  text = json.dumps(summary, indent=2)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main)
