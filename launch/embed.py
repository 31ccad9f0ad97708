"""SRA-CL's semantic stage: item / prefix texts -> embeddings -> top-k neighbour tables.

  python launch/embed.py --config configs/sracl/ml100k.py --workdir ~/runs/sracl_ml100k \
      [--config.sracl.semantic.k=10 ...]

Reads the data exactly as training does (`seqrec_jax.loop.load_split`), then builds the tables
of `sracl_jax.semantic.pipeline` into ``<workdir>/semantic/``.  Relaunching with unchanged data
and settings loads the existing tables instead of recomputing them.

`--time_prefix_sample N` only times the faithful user mode (one text per training prefix) on N
random prefixes and projects it to all of them, writing <workdir>/prefix_text_timing.json:

  python launch/embed.py --config configs/sracl/beauty.py --workdir W --time_prefix_sample 2000
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from seqrec_jax import loop
from sracl_jax.semantic import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                                "Output directory; the tables go to <workdir>/semantic.")
_TIME_SAMPLE = flags.DEFINE_integer(
    "time_prefix_sample", 0, "> 0: build no tables; time the faithful per-prefix text encoding on "
    "this many random training prefixes and project it to all of them.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if "sracl" not in config or "semantic" not in config.sracl:
    raise app.UsageError("the config has no sracl.semantic section (see "
                         "sracl_jax.semantic.pipeline.default_semantic_config)")
  split = loop.load_split(config)
  progress = bool(config.train.progress) if "train" in config else True
  if _TIME_SAMPLE.value > 0:
    timing = pipeline.time_prefix_texts(split, config.sracl.semantic, _TIME_SAMPLE.value,
                                        seed=int(config.seed), progress=progress)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    path = os.path.join(_WORKDIR.value, "prefix_text_timing.json")
    with open(path, "w") as f:
      json.dump(timing, f, indent=2)
    print(json.dumps(timing, indent=2))
    print(f"  written to {path}")
    return
  out_dir = os.path.join(_WORKDIR.value, "semantic")
  tables = pipeline.build_semantic_tables(split, config.sracl.semantic, out_dir,
                                          progress=progress)
  logging.info("semantic stage done: %s", out_dir)
  print(pipeline.format_summary(tables))
  print(f"  written to {out_dir}")


if __name__ == "__main__":
  app.run(main)
