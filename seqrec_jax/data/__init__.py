"""Data: readers, the CSR sequence dataset, the leave-one-out split and host-side batching."""

from __future__ import annotations

import os

from seqrec_jax.data.batching import eval_batches
from seqrec_jax.data.batching import gather_windows
from seqrec_jax.data.batching import num_eval_batches
from seqrec_jax.data.batching import TrainIterator
from seqrec_jax.data.dataset import from_sequences
from seqrec_jax.data.dataset import PAD_ID
from seqrec_jax.data.dataset import SequenceDataset
from seqrec_jax.data.errors import DataFormatError
from seqrec_jax.data.readers import default_ml100k_dir
from seqrec_jax.data.readers import read_p5
from seqrec_jax.data.readers import read_pairs
from seqrec_jax.data.readers import read_recbole_atomic
from seqrec_jax.data.split import leave_one_out
from seqrec_jax.data.split import LeaveOneOutSplit

FORMATS = ("pairs", "atomic", "p5", "amazon")
_AMAZON_OPTIONS = ("reviews_path", "meta_path", "k_core", "min_rating")

__all__ = [
    "DataFormatError", "FORMATS", "LeaveOneOutSplit", "PAD_ID", "SequenceDataset",
    "TrainIterator", "default_ml100k_dir", "eval_batches", "from_sequences", "gather_windows",
    "leave_one_out", "load_dataset", "num_eval_batches", "read_p5", "read_pairs",
    "read_recbole_atomic",
]


def _require(path: str, what: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} not found: {path}")


def load_dataset(format: str,  # pylint: disable=redefined-builtin
                 path: str, name: str = "", **kwargs) -> SequenceDataset:
  """Reads a dataset in one of the supported formats.

  Args:
    format: "pairs" (``read_pairs``), "atomic" (``read_recbole_atomic``; path "" or "ml-100k"
      means the ml-100k example in the installed RecBole wheel), "p5" (``read_p5``) or "amazon"
      (``amazon.read_amazon``).
    path: the file or directory.  For "amazon" it is the reviews file unless ``reviews_path``
      is given.
    name: dataset name; "" lets the reader choose (file or directory name).
    **kwargs: only for "amazon": ``reviews_path``, ``meta_path``, ``k_core``, ``min_rating``.

  Returns:
    The SequenceDataset.

  Raises:
    ValueError: unknown format, or options the format does not take.
    FileNotFoundError: the path does not exist.
  """
  if format not in FORMATS:
    raise ValueError(f"unknown dataset format {format!r}; known formats: {', '.join(FORMATS)}")
  path = os.fspath(path) if path is not None else ""
  if format != "amazon" and kwargs:
    raise ValueError(f"format {format!r} takes no options, got {sorted(kwargs)}")
  reader_name = name or None
  if format == "pairs":
    _require(path, "pairs file")
    return read_pairs(path, name=reader_name)
  if format == "atomic":
    if path in ("", "ml-100k"):
      path = default_ml100k_dir()
    _require(path, "RecBole atomic dataset")
    return read_recbole_atomic(path, name=reader_name)
  if format == "p5":
    _require(path, "P5 dataset directory")
    return read_p5(path, name=reader_name)
  # amazon
  unknown = sorted(set(kwargs) - set(_AMAZON_OPTIONS))
  if unknown:
    raise ValueError(f"unknown options for format 'amazon': {unknown}; "
                     f"known: {list(_AMAZON_OPTIONS)}")
  options = {k: v for k, v in kwargs.items() if v is not None}
  reviews_path = options.pop("reviews_path", None) or path
  if not reviews_path:
    raise ValueError("format 'amazon' needs a reviews file (path or reviews_path)")
  _require(reviews_path, "Amazon reviews file")
  if options.get("meta_path"):
    _require(options["meta_path"], "Amazon metadata file")
  from seqrec_jax.data import amazon  # pylint: disable=g-import-not-at-top
  return amazon.read_amazon(reviews_path=reviews_path, name=reader_name, **options)
