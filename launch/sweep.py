"""Run a config's sweep: one training run per override dict of its `get_sweep()`.

  python launch/sweep.py --config configs/sracl/ml100k.py --workdir ~/runs/sweep_sracl
  python launch/sweep.py --config configs/sasrec/beauty.py --workdir W --print_commands  # for a cluster

Each run is `launch/train.py` in its own process, in <workdir>/<run name>; runs whose results.json
exists are skipped, so an interrupted sweep resumes (and each run resumes from its checkpoints).
At the end: <workdir>/sweep.csv, sweep.md (Markdown table) and one PNG per swept key
(test metric vs value).
"""

import csv
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Dict, List

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CONFIG = flags.DEFINE_string("config", None, "Config file (path[:arg]) that defines get_sweep().")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep folder; one sub-folder per run.")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print one train command per run and exit.")
_METRICS = flags.DEFINE_list("metrics", ["HR@10", "NDCG@10", "HR@20", "NDCG@20"],
                             "Test metrics to tabulate and plot.")
_EXTRA = flags.DEFINE_multi_string("override", [], "Extra --config.k=v for every run.")
flags.mark_flags_as_required(["config", "workdir"])


def load_sweep(config_arg: str) -> List[Dict[str, Any]]:
  """Imports the config file and returns its get_sweep() list, checked against get_config()."""
  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep()")
  config = module.get_config(arg or None)
  sweep = list(module.get_sweep())
  for i, overrides in enumerate(sweep):
    for key in overrides:
      node = config
      for part in key.split(".")[:-1]:
        if part not in node:
          raise KeyError(f"{path}: get_sweep()[{i}] key '{key}' is not a config key")
        node = node[part]
      if key.split(".")[-1] not in node:
        raise KeyError(f"{path}: get_sweep()[{i}] key '{key}' is not a config key")
  return sweep


def run_name(overrides: Dict[str, Any]) -> str:
  """'alpha=0.1_beta=0.05' from {'sracl.alpha': 0.1, 'sracl.beta': 0.05}."""
  parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
  return re.sub(r"[^A-Za-z0-9=._-]", "-", "_".join(parts)) or "default"


def train_command(config_arg: str, workdir: str, overrides: Dict[str, Any], extra) -> List[str]:
  cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={config_arg}",
         f"--workdir={workdir}", "--config.train.progress=false"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  cmd += list(extra)
  return cmd


def collect(workdir: str, sweep, metrics) -> List[Dict[str, Any]]:
  rows = []
  for overrides in sweep:
    name = run_name(overrides)
    path = os.path.join(workdir, name, "results.json")
    row = {"run": name, **overrides}
    if os.path.exists(path):
      with open(path) as f:
        res = json.load(f)
      row.update({f"test {m}": res["test"][m] for m in metrics})
      row.update({f"valid {m}": res["valid"][m] for m in metrics})
      row["best_step"] = res["best_step"]
      row["train_seconds"] = round(res["train_seconds"], 1)
    rows.append(row)
  return rows


def write_tables(workdir: str, rows) -> None:
  columns = []
  for row in rows:
    for k in row:
      if k not in columns:
        columns.append(k)
  with open(os.path.join(workdir, "sweep.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else str(v)
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
    for row in rows:
      f.write("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |\n")


def plot(workdir: str, rows, sweep, metrics) -> List[str]:
  """One PNG per swept numeric key: test metrics vs value (other keys' settings as series)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = sorted({k for o in sweep for k in o})
  done = [r for r in rows if f"test {metrics[0]}" in r]
  paths = []
  for key in keys:
    values = {r.get(key) for r in done}
    if len(values) < 2 or not all(isinstance(v, (int, float)) for v in values):
      continue
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    others = [k for k in keys if k != key]
    groups: Dict[tuple, list] = {}
    for r in done:
      groups.setdefault(tuple((k, r.get(k)) for k in others), []).append(r)
    for ax, metric in zip(axes[0], metrics):
      for group, members in sorted(groups.items(), key=lambda g: str(g[0])):
        members = sorted(members, key=lambda r: r[key])
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in group) or None
        ax.plot([r[key] for r in members], [r[f"test {metric}"] for r in members], "o-",
                label=label)
      ax.set_xlabel(key)
      ax.set_ylabel(f"test {metric}")
      ax.grid(alpha=0.3)
    if len(groups) > 1:
      axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(workdir, f"sweep_{key.replace('.', '_')}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def main(argv):
  del argv
  sweep = load_sweep(_CONFIG.value)
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  os.makedirs(workdir, exist_ok=True)
  commands = [(o, train_command(_CONFIG.value, os.path.join(workdir, run_name(o)), o,
                                _EXTRA.value)) for o in sweep]
  if _PRINT.value:
    for _, cmd in commands:
      print(" ".join(shlex.quote(c) for c in cmd))
    return
  for i, (overrides, cmd) in enumerate(commands):
    name = run_name(overrides)
    if os.path.exists(os.path.join(workdir, name, "results.json")):
      print(f"[{i + 1}/{len(commands)}] {name}: done, skipped", flush=True)
      continue
    print(f"[{i + 1}/{len(commands)}] {name}: training", flush=True)
    subprocess.run(cmd, check=True)
  rows = collect(workdir, sweep, _METRICS.value)
  write_tables(workdir, rows)
  pngs = plot(workdir, rows, sweep, _METRICS.value)
  print(open(os.path.join(workdir, "sweep.md")).read())
  print("wrote", os.path.join(workdir, "sweep.csv"), *pngs)


if __name__ == "__main__":
  app.run(main)
