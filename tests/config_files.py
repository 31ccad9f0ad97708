"""Config *files* of a tiny pairs-data SASRec, for the tests that launch `launch/*.py` as
subprocesses (they take a config path, not a ConfigDict)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TEMPLATE = '''
from seqrec_jax.default_config import base_config

def get_config(arg=None):
  c = base_config()
  c.data.format = "pairs"
  c.data.path = {path!r}
  c.data.max_len = 8
  c.model.hidden, c.model.inner, c.model.n_layers, c.model.vocab_pad_multiple = 16, 32, 1, 8
  c.train.batch_size, c.train.num_steps, c.train.eval_every_steps = 32, {steps}, {eval_every}
  c.eval.batch_size = 64
{extra}
  return c
{sweep}'''


def write_small_config(out, data, steps: int, eval_every: int, *extra_lines: str,
                       sweep: str = "") -> str:
  """Writes the config file `out` over the pairs file `data` and returns its path.

  Args:
    out: the .py file to write (str or pathlib.Path).
    data: the pairs data file.
    steps, eval_every: `train.num_steps` and `train.eval_every_steps`.
    *extra_lines: more statements on `c` (e.g. "c.train.patience = 0").
    sweep: the body of a `get_sweep()` returning the list of overrides, if any.
  """
  text = _TEMPLATE.format(
      path=str(data), steps=steps, eval_every=eval_every,
      extra="\n".join("  " + line for line in extra_lines),
      sweep=f"\ndef get_sweep():\n  return {sweep}\n" if sweep else "")
  with open(out, "w") as f:
    f.write(text)
  return str(out)
