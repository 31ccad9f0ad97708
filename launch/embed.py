"""SRA-CL's semantic stage: item / prefix texts -> embeddings -> top-k neighbour tables.

  python launch/embed.py --config configs/sracl/ml100k.py --workdir ~/runs/sracl_ml100k \
      [--config.sracl.semantic.k=10 ...]

Reads the data exactly as training does (`seqrec_jax.loop.load_split`), then builds the tables
of `sracl_jax.semantic.pipeline` into ``<workdir>/semantic/``.  Relaunching with unchanged data
and settings loads the existing tables instead of recomputing them.
"""

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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if "sracl" not in config or "semantic" not in config.sracl:
    raise app.UsageError("the config has no sracl.semantic section (see "
                         "sracl_jax.semantic.pipeline.default_semantic_config)")
  split = loop.load_split(config)
  out_dir = os.path.join(_WORKDIR.value, "semantic")
  progress = bool(config.train.progress) if "train" in config else True
  tables = pipeline.build_semantic_tables(split, config.sracl.semantic, out_dir,
                                          progress=progress)
  logging.info("semantic stage done: %s", out_dir)
  print(pipeline.format_summary(tables))
  print(f"  written to {out_dir}")


if __name__ == "__main__":
  app.run(main)
