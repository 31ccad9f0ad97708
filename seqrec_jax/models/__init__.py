"""Sequence encoders and the registry that builds them from a config.

Every encoder exposes the same three calls, so training, evaluation and SRA-CL's contrastive
terms work with any of them:
  `encode(inputs, train)` -> [B, L, D] states, `__call__(inputs, train)` -> [B, D] sequence vector,
  `score(vectors)` -> [..., table_rows] scores (padding and filler rows are -inf).
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import ml_collections

from seqrec_jax.models.bert4rec import BERT4Rec, BERT4RecConfig
from seqrec_jax.models.gru4rec import GRU4Rec, GRU4RecConfig
from seqrec_jax.models.sasrec import SASRec, SASRecConfig

# config.model keys that configure the loss (seqrec_jax.tasks), not the encoder.
LOSS_KEYS = ("name", "loss_positions", "softmax", "num_negatives", "sampling_power",
             "softmax_chunk")

# name -> (module class, config dataclass)
_REGISTRY: Dict[str, Any] = {
    "sasrec": (SASRec, SASRecConfig),
    "gru4rec": (GRU4Rec, GRU4RecConfig),
    "bert4rec": (BERT4Rec, BERT4RecConfig),
}


def register(name: str, module_cls: Any, config_cls: Any) -> None:
  """Adds an encoder (used by sracl_jax for GRU4Rec/BERT4Rec backbones)."""
  _REGISTRY[name] = (module_cls, config_cls)


def build_model(model_config: ml_collections.ConfigDict, *, n_items: int, max_len: int):
  """Builds the encoder named by `model_config.name` from the config's other fields.

  Args:
    model_config: the `config.model` section; every key but `LOSS_KEYS` (read by the task, not
      the encoder) must be a field of the encoder's config dataclass.
    n_items: number of real items in the dataset.
    max_len: input window length.

  Returns:
    (module, frozen model config dataclass).
  """
  name = model_config.name
  if name not in _REGISTRY:
    raise ValueError(f"config.model.name={name!r} is unknown; known: {sorted(_REGISTRY)}")
  module_cls, config_cls = _REGISTRY[name]
  fields = {f for f in config_cls.__dataclass_fields__}
  kwargs = {k: v for k, v in model_config.items() if k not in LOSS_KEYS}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"config.model has keys {unknown} that {config_cls.__name__} does not take; "
                     f"it takes {sorted(fields - {'n_items', 'max_len'})}")
  cfg = config_cls(n_items=n_items, max_len=max_len, **kwargs)
  return module_cls(cfg), cfg
