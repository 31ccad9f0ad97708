"""Train and evaluate a model described by a config file.

  python launch/train.py --config configs/sasrec/ml100k.py --workdir ~/runs/ml100k \
      [--config.optim.lr=3e-4 ...]

Relaunching the same command with the same workdir resumes from its last checkpoint.
"""

import logging as pylogging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from seqrec_jax import distributed
from seqrec_jax import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, results).")
_START_PROCESSES = distributed.define_process_flags()
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
  """Keeps orbax's per-save INFO chatter out of the run log (warnings still pass)."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _START_PROCESSES()
  logging.info("JAX process %d/%d, local devices %d, global devices %d", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  results = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if "test" in results and jax.process_index() == 0:
    print(loop.format_results(results))


if __name__ == "__main__":
  app.run(main)
