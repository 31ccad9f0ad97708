"""The SRA-CL paper's comparison arms and config-file flags shared by configs/sracl/*.py.

Arms (override dicts of `launch/sweep.py`; the paper's ablation table, plus its "w/o CL" row,
which is the plain backbone trained by L_rec alone on the same data and split):

  sracl        the method: L_rec + alpha L_CS + beta L_IS, learned synthesizer, semantic neighbours
  wo_cl        alpha = beta = 0 (the backbone alone)
  wo_cs        without the inter-user term (alpha = 0)
  wo_is        without the intra-user term (beta = 0)
  mean_synth   the synthesizer replaced by the plain mean of the k neighbours
  random_nbrs  random neighbour prefixes and items instead of the retrieved ones
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import ml_collections

from seqrec_jax.default_config import (BACKBONES, base_config, parse_arg, set_backbone,
                                       shrink_to_tiny)
from sracl_jax.task import default_sracl_config, shrink_sracl_to_tiny

ARMS: Dict[str, Dict[str, Any]] = {
    "sracl": {},
    "wo_cl": {"sracl.alpha": 0.0, "sracl.beta": 0.0},
    "wo_cs": {"sracl.alpha": 0.0},
    "wo_is": {"sracl.beta": 0.0},
    "mean_synth": {"sracl.synthesizer": "mean"},
    "random_nbrs": {"sracl.neighbours": "random"},
}
SEEDS = (2024, 2025, 2026)
# get_config flags: `tiny`, a backbone name, `items` (the cheap user mode); get_sweep flags too:
# `ablation` (every arm x 3 seeds), `compare` (sracl and wo_cl x 3 seeds), `seeds`.
FLAGS = ("tiny", "items", "ablation", "compare", "seeds") + tuple(b for b in BACKBONES
                                                                  if b != "sasrec")


def apply_flags(c: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
  """Adds the sracl section's defaults' flags to a config built by a configs/sracl file."""
  flags = parse_arg(arg, known=FLAGS)
  for name in BACKBONES:
    if name in flags:
      set_backbone(c, name)
  if "items" in flags:
    c.sracl.semantic.user_mode = "items"
  if "tiny" in flags:
    shrink_sracl_to_tiny(shrink_to_tiny(c))
  return c


def sracl_section(domain: str) -> ml_collections.ConfigDict:
  s = default_sracl_config()
  s.semantic.domain = domain
  return s


def amazon_text_config(path: str, name: str, domain: str, arg=None) -> ml_collections.ConfigDict:
  """SRA-CL on an Amazon 5-core with item text in the P5 format (sequences.txt + items.tsv), at
  the paper's protocol: SASRec backbone, max_len 20, at most 100 epochs with early stopping on
  valid MRR@10 (as the reference code), alpha = beta = 0.1, k = 10, batch 256."""
  c = base_config()
  c.task.name = "sracl"
  c.data.format = "p5"
  c.data.path = path
  c.data.name = name
  c.data.max_len = 20
  c.train.num_epochs = 100
  c.train.early_stop_metric = "MRR@10"
  c.sracl = sracl_section(domain)
  return apply_flags(c, arg)


LOSS_WEIGHT_SWEEP = [{"sracl.alpha": a, "sracl.beta": b}
                     for a in (0.05, 0.1, 0.2) for b in (0.05, 0.1, 0.2)]


def arm_sweep(arms: Sequence[str], seeds: Sequence[int] = SEEDS) -> List[Dict[str, Any]]:
  """[{**ARMS[arm], "seed": s}] for every arm and seed, arms outermost."""
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    raise ValueError(f"unknown SRA-CL arm(s) {unknown}; known: {sorted(ARMS)}")
  return [dict(ARMS[a], seed=s) for a in arms for s in seeds]


def sweep_for_flags(arg, default: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """get_sweep(arg) of the configs/sracl files: `ablation`, `compare`, `seeds` or the file's own
  sensitivity sweep."""
  flags = parse_arg(arg, known=FLAGS)
  if "ablation" in flags:
    return arm_sweep(list(ARMS))
  if "compare" in flags:
    return arm_sweep(["sracl", "wo_cl"])
  if "seeds" in flags:
    return arm_sweep(["sracl"])
  return default
