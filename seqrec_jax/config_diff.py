"""What changed between the config a run started with and the one it is resumed with.

A run that spans sessions is relaunched with the same command, but the code between the two
launches may have changed a default, and a command may have been edited. A resumed run whose
result-affecting settings changed would silently mix two protocols in one figure, so
`loop.train_and_evaluate` compares the two configs before it restores a checkpoint and stops
with the list of changes (`config.train.on_config_change="error"`, the default), or logs them and
records them in ``<workdir>/config_changes.jsonl`` ("allow").

Keys that say where things are, how the work is spread over devices, how it is shown or when
checkpoints are written may change freely (`RESUME_FREE_KEYS`). Keys the earlier config did not
have yet (added to the code since) are reported, not refused: new keys keep the old behaviour
at their defaults.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any, Dict, List, Mapping, Tuple

ON_CONFIG_CHANGE = ("error", "allow")
CHANGES_FILE = "config_changes.jsonl"

# fnmatch patterns of dotted keys that may differ on resume: none changes what is trained.
RESUME_FREE_KEYS = (
    "data.path", "data.meta_path", "data.name",       # where the data is
    "train.progress", "train.log_every_steps",        # what is shown
    "train.steps_in_flight",                          # how far the host runs ahead
    "train.stop_at_step", "train.on_config_change",   # when to stop; this check itself
    "eval.batch_size",                                # evaluation chunking (same metrics)
    "checkpoint.*", "mesh.*",                         # when to save; how devices share the work
    "sracl.semantic_dir", "sracl.semantic.cache_dir", "sracl.semantic.llm_cache_dir",
    "sracl.semantic.encoder",                         # a path: the tables check its contents
    "sracl.semantic.encode_batch_size", "sracl.semantic.llm_concurrency",
    "sracl.semantic.llm_api_key_env",
    "sracl.length_buckets",                           # same function, other dropout draws
    "calrec.init_from", "calrec.pretrained", "calrec.tokenizer.path",
)

Change = Tuple[str, Any, Any]  # (dotted key, old value, new value)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; lists and other leaves are kept as they are."""
  out: Dict[str, Any] = {}
  for key, value in tree.items():
    dotted = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      out.update(flatten(value, dotted + "."))
    else:
      out[dotted] = value
  return out


def as_json(config: Any) -> Dict[str, Any]:
  """A ConfigDict (or mapping) as the JSON-able dict `config.json` holds."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def is_free(key: str) -> bool:
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUME_FREE_KEYS)


def resume_changes(old: Mapping[str, Any],
                   new: Mapping[str, Any]) -> Tuple[List[Change], List[Change], List[str]]:
  """Compares the config a run was started with (`old`, from its config.json) with `new`.

  Args:
    old: the earlier config as a JSON dict.
    new: the current config as a JSON dict (`as_json`).

  Returns:
    (changed: result-affecting keys whose values differ or that were removed,
     free: `RESUME_FREE_KEYS` that differ,
     added: keys the earlier config did not have), each sorted by key.
  """
  a, b = flatten(old), flatten(new)
  changed, free = [], []
  for key in sorted(a):
    old_value, new_value = a[key], b.get(key, "<removed>")
    if old_value == new_value:
      continue
    (free if is_free(key) else changed).append((key, old_value, new_value))
  added = sorted(set(b) - set(a))
  return changed, free, added


def describe(changes: List[Change]) -> str:
  return "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
