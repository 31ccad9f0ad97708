"""Run a config's sweep: one training run per override dict of its `get_sweep()`.

  python launch/sweep.py --config configs/sracl/ml100k.py --workdir ~/runs/sweep_sracl
  python launch/sweep.py --config configs/sasrec/beauty.py --workdir W --print_commands  # for a cluster

Each run is `launch/train.py` in its own process, in <workdir>/<run name>; runs whose results.json
exists are skipped, so an interrupted sweep resumes (and each run resumes from its checkpoints).
`--parallel N` runs N at once (small models sharing one GPU); `--only A,B` runs only the runs named;
`--tabulate_only` starts nothing and tabulates the finished runs.
At the end: <workdir>/sweep.csv, sweep.md (Markdown table) and one PNG per swept numeric key
(test metric vs value), or sweep_runs.png (bars per run) when no key is numeric. When the sweep
has a "seed" key (e.g. `configs/sracl/beauty.py:ablation`, every arm x 3 seeds), sweep_seeds.md
and sweep_seeds.png give each arm's mean ± std over its finished seeds, and sweep_paired.md/.png
compares the first arm with each other arm user by user (launch/compare_runs.py).
sweep_curves.png draws every started run's validation curve, runs still training included
(`--tabulate_only` redraws it while a sweep runs).
`--archive DIR` then copies what the tables, curves and paired comparisons are made of into DIR
(the sweep files and each started run's results.json, config.json, metrics.jsonl and compressed
eval_ranks.npz; no checkpoints): a few hundred KB per run, small enough to commit, and
`--tabulate_only --workdir DIR` or launch/compare_runs.py on DIR redo every figure from it.
`--restore_finished_from DIR` (such an archive) first copies back each run that DIR holds as
finished and the workdir lacks, so a sweep relaunched on a new machine skips the runs already done
instead of training them again.
A run that stops early (SIGTERM: checkpointed, no results.json), or one killed by a signal, stops
the sweep; the same command resumes it. SIGTERM/SIGINT to the sweep reaches the run in flight as
SIGTERM.

`--mode benchmark` runs `launch/benchmark.py` instead of training (each run writes
<run>/benchmark.json and is skipped when it exists) and tabulates and plots its speed figures:
training sequences/s, step time, evaluation users/s and the fraction of the matmul peak, against
the swept value.  Throughput vs batch size, and vs device count over fake CPU devices:

  python launch/sweep.py --mode benchmark --config configs/sasrec/throughput.py --workdir W
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python launch/sweep.py --mode benchmark \
      --config configs/sasrec/throughput.py:devices --workdir W2
"""

import contextlib
import csv
import fnmatch
import importlib.util
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List

import numpy as np
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
_MODE = flags.DEFINE_enum("mode", "train", ["train", "benchmark"],
                          "train: launch/train.py per run (quality); benchmark: launch/benchmark.py "
                          "per run (speed).")
_BENCH_ARGS = flags.DEFINE_multi_string(
    "benchmark_arg", ["--steps=20", "--warmup=3", "--eval_repeats=1"],
    "benchmark mode: flags passed to launch/benchmark.py (repeat the flag for several).")
BENCHMARK_METRICS = ("train_sequences_per_second", "step_seconds_median", "eval_users_per_second",
                     "fraction_of_matmul_peak")
_PARALLEL = flags.DEFINE_integer(
    "parallel", 1, "Runs at once (train mode). >1 shares one accelerator between small runs (e.g. "
    "6 SRA-CL Beauty runs on one H100); each run's output goes to <run>/train.log and JAX's GPU "
    "memory preallocation is switched off (XLA_PYTHON_CLIENT_PREALLOCATE=false) unless set.")
_ONLY = flags.DEFINE_list(
    "only", [], "Run only these runs of the sweep (names as in sweep.csv, e.g. "
    "synthesizer=mean_seed=2024, or shell-style patterns, e.g. 'alpha=0.0_beta=0.0_seed=*'); the "
    "others start nothing, and finished ones are still tabulated. A name or pattern that matches "
    "no run of the sweep is an error.")
_TABULATE = flags.DEFINE_bool("tabulate_only", False,
                              "Start nothing: tabulate and plot the runs that have finished.")
_ARCHIVE = flags.DEFINE_string(
    "archive", None, "After tabulating, copy the sweep's tables and each started run's small "
    "files (results, config, metrics, compressed per-user ranks; no checkpoints) here.")
_RESTORE = flags.DEFINE_string(
    "restore_finished_from", None, "An --archive folder of this sweep: before running, copy each "
    "run it holds as finished (results.json) into the workdir where the workdir lacks it, so the "
    "sweep skips it (a relaunch on a new machine); a local run with checkpoints is left alone.")
flags.mark_flags_as_required(["config", "workdir"])

ARCHIVED_RUN_FILES = ("results.json", "config.json", "metrics.jsonl")


def load_sweep(config_arg: str) -> List[Dict[str, Any]]:
  """Imports the config file and returns its get_sweep() list, checked against get_config()."""
  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep()")
  config = module.get_config(arg or None)
  takes_arg = bool(inspect.signature(module.get_sweep).parameters)
  sweep = list(module.get_sweep(arg or None) if takes_arg else module.get_sweep())
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


# An override value "{sweep}/<run name>" names another run of the same sweep (e.g. CALRec's
# Stage II starting from the sweep's Stage I run): it becomes that run's folder in the command,
# and such a run starts only after its source run has finished.
SWEEP_REF = "{sweep}/"


def _ref(value) -> str:
  """The run a "{sweep}/<run>" value names, or ""."""
  return value[len(SWEEP_REF):] if isinstance(value, str) and value.startswith(SWEEP_REF) else ""


def sources(overrides: Dict[str, Any]) -> List[str]:
  """The runs of the same sweep that `overrides` starts from."""
  return [r for r in map(_ref, overrides.values()) if r]


def _resolve(value, sweep_dir: str):
  ref = _ref(value)
  return os.path.join(sweep_dir, ref) if ref else value


def run_name(overrides: Dict[str, Any]) -> str:
  """'alpha=0.1_beta=0.05' from {'sracl.alpha': 0.1, 'sracl.beta': 0.05}."""
  parts = [f"{k.split('.')[-1]}={_ref(v) or v}" for k, v in overrides.items()]
  return re.sub(r"[^A-Za-z0-9=._-]", "-", "_".join(parts)) or "default"


def select_runs(patterns: List[str], names: List[str]) -> List[str]:
  """The run names that `--only` selects, in sweep order (all of them when `patterns` is empty).

  Each entry is a run name or a shell-style pattern (`fnmatch`: `*`, `?`, `[...]`); run names use
  only `[A-Za-z0-9=._-]`, so an entry with a pattern character is never a name itself.  An entry
  that matches no run raises `app.UsageError`, naming it and listing the sweep's runs.
  """
  if not patterns:
    return list(names)
  unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
  if unmatched:
    raise app.UsageError(f"--only names runs that are not in the sweep: {unmatched}; its runs: "
                         f"{names}")
  return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def train_command(config_arg: str, workdir: str, overrides: Dict[str, Any], extra) -> List[str]:
  cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={config_arg}",
         f"--workdir={workdir}", "--config.train.progress=false"]
  cmd += [f"--config.{k}={_resolve(v, os.path.dirname(workdir))}" for k, v in overrides.items()]
  cmd += list(extra)
  return cmd


def benchmark_command(config_arg: str, workdir: str, overrides: Dict[str, Any], extra,
                      bench_args) -> List[str]:
  """launch/benchmark.py for one run; it writes <workdir>/benchmark.json (atomically)."""
  cmd = [sys.executable, os.path.join(ROOT, "launch", "benchmark.py"), f"--config={config_arg}",
         f"--out={os.path.join(workdir, 'benchmark.json')}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  return cmd + list(extra) + list(bench_args)


def result_file(mode: str) -> str:
  return "benchmark.json" if mode == "benchmark" else "results.json"


def collect(workdir: str, sweep, metrics, mode: str = "train") -> List[Dict[str, Any]]:
  """One row per run: its overrides, then (when finished) its metrics.

  train: "test M" and "valid M" for each metric M, best step and training seconds.
  benchmark: each of `metrics` from benchmark.json's "ours" block, plus its devices and mesh.
  """
  rows = []
  for overrides in sweep:
    name = run_name(overrides)
    path = os.path.join(workdir, name, result_file(mode))
    row = {"run": name, **overrides}
    if os.path.exists(path):
      with open(path) as f:
        res = json.load(f)
      if mode == "benchmark":
        ours = res["ours"]
        row.update({m: ours[m] for m in metrics})
        row["devices"] = ours.get("devices")
        row["mesh"] = "x".join(f"{k}={v}" for k, v in (ours.get("mesh") or {}).items())
      else:
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


def group_name(overrides: Dict[str, Any]) -> str:
  """The run name without its seed: the arm a seed run belongs to."""
  return run_name({k: v for k, v in overrides.items() if k != "seed"})


def seed_groups(rows, sweep, metrics) -> List[Dict[str, Any]]:
  """Mean and std over seeds of each arm's finished runs (empty when no 'seed' is swept).

  One row per arm (the overrides without 'seed', in sweep order): "n" finished seeds of
  "seeds" and "test M" / "test M std" for each metric (population std, as the tables in
  BENCHMARKS.md)."""
  if not any("seed" in o for o in sweep):
    return []
  groups: Dict[str, Dict[str, Any]] = {}
  for overrides, row in zip(sweep, rows):
    g = groups.setdefault(group_name(overrides), {"arm": group_name(overrides), "runs": []})
    g["runs"].append(row)
  out = []
  for g in groups.values():
    done = [r for r in g["runs"] if f"test {metrics[0]}" in r]
    row = {"arm": g["arm"], "n": len(done), "seeds": len(g["runs"])}
    for m in metrics:
      vals = np.array([r[f"test {m}"] for r in done], float)
      row[f"test {m}"] = float(vals.mean()) if len(vals) else float("nan")
      row[f"test {m} std"] = float(vals.std()) if len(vals) else float("nan")
    out.append(row)
  return out


def write_seed_table(workdir: str, groups, metrics) -> None:
  with open(os.path.join(workdir, "sweep_seeds.md"), "w") as f:
    f.write("| arm | seeds done | " + " | ".join(f"test {m}" for m in metrics) + " |\n|" +
            "---|" * (len(metrics) + 2) + "\n")
    for g in groups:
      cells = [(f"{g[f'test {m}']:.4f} ± {g[f'test {m} std']:.4f}" if g["n"] else "-")
               for m in metrics]
      f.write(f"| {g['arm']} | {g['n']}/{g['seeds']} | " + " | ".join(cells) + " |\n")


PAIRED_RESAMPLES = 2000  # bootstrap / sign-flip resamples of sweep_paired.md


def write_paired_tables(workdir: str, sweep, metrics) -> str:
  """sweep_paired.md: the first arm (SRA-CL in the sracl sweeps) against each other arm, paired
  per user over the finished runs' eval_ranks.npz (seqrec_jax/paired.py), then where each arm
  ranks the targets (`paired.rank_profile`); sweep_paired.png: each difference with its 95%
  interval over users; sweep_ranks.png: each arm's HR@K at every K, and the differences. Returns the Markdown's path, or "" when
  fewer than two arms have finished runs with ranks."""
  from seqrec_jax import paired  # pylint: disable=g-import-not-at-top
  arms: Dict[str, List[str]] = {}
  for overrides in sweep:
    run_dir = os.path.join(workdir, run_name(overrides))
    runs = arms.setdefault(group_name(overrides), [])
    if os.path.exists(os.path.join(run_dir, paired.RANKS_FILE)):
      runs.append(run_dir)
  names = list(arms)
  if len(names) < 2 or not arms[names[0]]:
    return ""
  first = names[0]
  parts = [f"# Paired per-user comparisons: {first} against each arm\n"]
  results = {}
  for name in names[1:]:
    if not arms[name]:
      parts.append(f"## {first} vs {name}\n\n(no finished run with {paired.RANKS_FILE} yet)\n")
      continue
    results[name] = paired.compare(arms[first], arms[name], metrics, n_resamples=PAIRED_RESAMPLES)
    parts.append(f"## {first} vs {name}\n\n" + paired.to_markdown(results[name], first, name))
  finished = {name: runs for name, runs in arms.items() if runs}
  if results:
    profile = paired.rank_profile(finished)
    parts.append("## Where the targets rank\n\n" + paired.profile_markdown(profile) +
                 "\nsweep_ranks.png: each arm's HR@K at every K, and the differences.\n")
  path = os.path.join(workdir, "sweep_paired.md")
  with open(path, "w") as f:
    f.write("\n".join(parts))
  if results:
    _save_differences(os.path.join(workdir, "sweep_paired.png"), first, results, metrics)
    paired.save_profile_plot(os.path.join(workdir, "sweep_ranks.png"), profile)
  return path


def _save_differences(path: str, first: str, results, metrics) -> None:
  """One panel per metric: `first` minus each arm, with its 95% paired interval over users."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = list(results)
  fig, axes = _panels(plt, len(metrics), 4.2, 1.6 + 0.5 * len(labels))
  y = np.arange(len(labels))
  for ax, m in zip(axes, metrics):
    diff = np.array([results[a]["metrics"][m]["diff"] for a in labels])
    ci = np.array([results[a]["metrics"][m]["ci95"] for a in labels])  # [arms, 2]
    ax.errorbar(diff, y, xerr=np.stack([diff - ci[:, 0], ci[:, 1] - diff]), fmt="o",
                capsize=3, color="tab:blue")
    ax.axvline(0.0, color="gray", lw=1)
    ax.set_yticks(y, [f"vs {a}\n(runs {len(results[a]['a'])}/{len(results[a]['b'])})"
                      for a in labels], fontsize=7)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel(f"{first} - arm, test {m}", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


MAX_PLOT_COLUMNS = 4  # panels per row; more metrics wrap onto further rows


def _panels(plt, n: int, width: float, height: float):
  """A figure of n panels, at most MAX_PLOT_COLUMNS per row: (fig, flat list of n axes)."""
  cols = min(n, MAX_PLOT_COLUMNS)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
  flat = list(axes.ravel())
  for ax in flat[n:]:
    ax.set_visible(False)
  return fig, flat[:n]


def _save_bars(path: str, labels: List[str], values: Dict[str, list], errors=None,
               zoom: bool = False, height: float = 3.8) -> List[str]:
  """One bar panel per metric (`values`: metric -> one value per label; `errors` likewise, as
  error bars); `zoom` starts the y axis just below the lowest bar. Returns [path]."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = _panels(plt, len(values), 0.6 + 0.5 * len(labels), height)
  x = np.arange(len(labels))
  for ax, (m, vals) in zip(axes, values.items()):
    ax.bar(x, vals, yerr=None if errors is None else errors[m], capsize=3, color="tab:blue")
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(f"test {m}")
    if zoom:
      lo = min(vals)
      ax.set_ylim(bottom=max(0.0, lo - 0.25 * (max(vals) - lo + 1e-9) - 0.1 * lo))
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [path]


def plot_seed_groups(workdir: str, groups, metrics) -> List[str]:
  """Bars of each arm's mean test metric over seeds, with the seed std as error bars."""
  groups = [g for g in groups if g["n"]]
  if not groups:
    return []
  return _save_bars(os.path.join(workdir, "sweep_seeds.png"),
                    [f"{g['arm']}\n(n={g['n']})" for g in groups],
                    {m: [g[f"test {m}"] for g in groups] for m in metrics},
                    errors={m: [g[f"test {m} std"] for g in groups] for m in metrics},
                    zoom=True, height=3.6)


def plot_runs(workdir: str, rows, metrics) -> List[str]:
  """Bars of every finished run's test metrics: for sweeps whose keys are not numeric (e.g.
  CALRec's stage ablation), which `plot` has no axis for."""
  done = [r for r in rows if f"test {metrics[0]}" in r]
  if not done:
    return []
  return _save_bars(os.path.join(workdir, "sweep_runs.png"), [r["run"] for r in done],
                    {m: [r[f"test {m}"] for r in done] for m in metrics})


def plot(workdir: str, rows, sweep, metrics, mode: str = "train") -> List[str]:
  """One PNG per swept numeric key: the metrics (test metrics in train mode, speed figures in
  benchmark mode) vs value, the other keys' settings as series."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = sorted({k for o in sweep for k in o} - {"seed"})  # seeds: see plot_seed_groups
  column = (lambda m: m) if mode == "benchmark" else (lambda m: f"test {m}")
  done = [r for r in rows if column(metrics[0]) in r]
  paths = []
  for key in keys:
    values = {r.get(key) for r in done}
    if len(values) < 2 or not all(isinstance(v, (int, float)) for v in values):
      continue
    fig, axes = _panels(plt, len(metrics), 4, 3.2)
    others = [k for k in keys if k != key]
    groups: Dict[tuple, list] = {}
    for r in done:
      groups.setdefault(tuple((k, r.get(k)) for k in others), []).append(r)
    for ax, metric in zip(axes, metrics):
      for group, members in sorted(groups.items(), key=lambda g: str(g[0])):
        members = sorted(members, key=lambda r: r[key])
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in group) or None
        ax.plot([r[key] for r in members], [r[column(metric)] for r in members], "o-",
                label=label)
      ax.set_xlabel(key)
      ax.set_ylabel(column(metric))
      if mode == "benchmark" and len(values) > 2 and min(values) > 0:
        ax.set_xscale("log", base=2)  # batch sizes and device counts double
      ax.grid(alpha=0.3)
    if len(groups) > 1:
      axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(workdir, f"sweep_{key.replace('.', '_')}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def learning_curves(workdir: str, sweep) -> Dict[str, Dict[str, Any]]:
  """Each started run's validation curve from its metrics.jsonl, finished or still training.

  Returns:
    run name -> {"arm", "metric" (the run's early-stopping metric), "steps", "values",
    "finished"}, in sweep order; runs without a validation row yet are left out.
  """
  curves = {}
  for overrides in sweep:
    name = run_name(overrides)
    run_dir = os.path.join(workdir, name)
    try:
      with open(os.path.join(run_dir, "config.json")) as f:
        metric = json.load(f)["train"]["early_stop_metric"]
      with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, KeyError):
      continue
    valid = sorted((r for r in rows if r.get("split") == "valid" and metric in r),
                   key=lambda r: r["step"])
    if valid:
      curves[name] = {"arm": group_name(overrides), "metric": metric,
                      "steps": [r["step"] for r in valid], "values": [r[metric] for r in valid],
                      "finished": os.path.exists(os.path.join(run_dir, result_file("train")))}
  return curves


def plot_curves(workdir: str, sweep) -> List[str]:
  """sweep_curves.png: every started run's validation metric against the training step, one
  colour per arm, its best point marked; runs still training are drawn dashed."""
  curves = learning_curves(workdir, sweep)
  if not curves:
    return []
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  arms = list(dict.fromkeys(c["arm"] for c in curves.values()))
  colours = plt.get_cmap("tab10")
  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  for name, c in curves.items():
    colour = colours(arms.index(c["arm"]) % 10)
    label = name + ("" if c["finished"] else " (training)")
    ax.plot(c["steps"], c["values"], "-" if c["finished"] else "--", color=colour, lw=1.2,
            label=label)
    best = int(np.argmax(c["values"]))
    ax.plot([c["steps"][best]], [c["values"][best]], "o", color=colour, ms=4)
  metrics = sorted({c["metric"] for c in curves.values()})
  ax.set_xlabel("training step")
  ax.set_ylabel("valid " + " / ".join(metrics))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  path = os.path.join(workdir, "sweep_curves.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [path]


def archive(workdir: str, sweep, dst: str) -> List[str]:
  """Copies the sweep's own files and every started run's small files from `workdir` into `dst`.

  Per run: ARCHIVED_RUN_FILES and eval_ranks.npz (rewritten compressed), never checkpoints, so
  that `dst` alone reproduces the tables, the curves and the paired comparisons. Files already in
  `dst` are replaced; each is written atomically. Returns the names of the runs archived.
  """
  from seqrec_jax import fileio  # pylint: disable=g-import-not-at-top
  from seqrec_jax import paired  # pylint: disable=g-import-not-at-top
  if os.path.abspath(dst) == os.path.abspath(workdir):
    raise ValueError(f"--archive={dst} is the sweep's own workdir")

  os.makedirs(dst, exist_ok=True)
  for name in sorted(os.listdir(workdir)):
    if name.startswith("sweep") and os.path.isfile(os.path.join(workdir, name)):
      fileio.atomic_copy(os.path.join(workdir, name), os.path.join(dst, name))
  done = []
  for overrides in sweep:
    name = run_name(overrides)
    src = os.path.join(workdir, name)
    present = [f for f in ARCHIVED_RUN_FILES if os.path.exists(os.path.join(src, f))]
    if not present:
      continue
    os.makedirs(os.path.join(dst, name), exist_ok=True)
    for f in present:
      fileio.atomic_copy(os.path.join(src, f), os.path.join(dst, name, f))
    ranks = os.path.join(src, paired.RANKS_FILE)
    if os.path.exists(ranks):
      with np.load(ranks) as z:
        arrays = {k: z[k] for k in z.files}
      fileio.atomic_write(os.path.join(dst, name, paired.RANKS_FILE),
                          lambda g, a=arrays: np.savez_compressed(g, **a), mode="wb")
    done.append(name)
  return done


def restore_finished(archive_dir: str, workdir: str, sweep) -> List[str]:
  """Copies each run that `archive_dir` (from `archive`) holds as finished into `workdir`.

  Only where `workdir` has neither that run's results nor checkpoints of it: a run that trained
  here is never overwritten. What is copied is what `archive` keeps (results, config, metrics,
  per-user ranks), which is all the sweep's skip check and tables read. A missing `archive_dir`
  restores nothing. Returns the names of the runs restored.
  """
  from seqrec_jax import fileio  # pylint: disable=g-import-not-at-top
  from seqrec_jax import paired  # pylint: disable=g-import-not-at-top
  restored = []
  for overrides in sweep:
    name = run_name(overrides)
    src, dst = os.path.join(archive_dir, name), os.path.join(workdir, name)
    if not os.path.exists(os.path.join(src, ARCHIVED_RUN_FILES[0])):
      continue
    if os.path.exists(os.path.join(dst, ARCHIVED_RUN_FILES[0])):
      continue
    if os.path.isdir(os.path.join(dst, "checkpoints")):
      print(f"{name}: finished in {archive_dir}, but {dst} has checkpoints of its own; left "
            "alone (it resumes here)", flush=True)
      continue
    os.makedirs(dst, exist_ok=True)
    # results.json last: a copy killed half-way leaves a run that is not taken as finished.
    for f in [*ARCHIVED_RUN_FILES[1:], paired.RANKS_FILE, ARCHIVED_RUN_FILES[0]]:
      if os.path.exists(os.path.join(src, f)):
        fileio.atomic_copy(os.path.join(src, f), os.path.join(dst, f))
    restored.append(name)
  return restored


def _describe(how: str, returncode: int) -> str:
  """A run's `_outcome` in words, as the sweep prints it after the run's name."""
  return {"finished": "finished", "killed": f"killed by signal {-returncode}",
          "failed": f"failed (exit {returncode})",
          "stopped": "stopped before it finished"}[how]  # e.g. checkpointed on SIGTERM


def _outcome(run_dir: str, mode: str, returncode: int, signalled: bool) -> str:
  """How a run ended: "finished" (its result file exists), "killed" (by a signal, exit < 0),
  "failed" (exit > 0 while the sweep was not signalled) or "stopped" (no result otherwise: it
  checkpointed and exited, e.g. on the SIGTERM the sweep passed on)."""
  if os.path.exists(os.path.join(run_dir, result_file(mode))):
    return "finished"
  if returncode < 0:
    return "killed"
  return "failed" if returncode and not signalled else "stopped"


def run_serially(todo, n_total: int, workdir: str, mode: str, needs=None) -> None:
  """One run after another, output to the terminal; stops after a preempted run, or before a run
  whose source runs (`needs`: name -> run names) have not finished.

  SIGTERM or SIGINT to the sweep is passed on to the run in flight as SIGTERM (it checkpoints and
  exits) and no further run starts. A run killed by a signal stops the sweep with a message; a
  run that fails otherwise raises.
  """
  for i, name, cmd in todo:
    missing = [r for r in (needs or {}).get(name, ())
               if not os.path.exists(os.path.join(workdir, r, result_file(mode)))]
    if missing:
      print(f"{name} starts from {missing}, which have not finished (not in this sweep, or "
            f"failed): stopping", flush=True)
      break
    print(f"[{i + 1}/{n_total}] {name}: {'benchmarking' if mode == 'benchmark' else 'training'}",
          flush=True)
    os.makedirs(os.path.join(workdir, name), exist_ok=True)
    returncode, signalled = _run_passing_signals(cmd)
    how = _outcome(os.path.join(workdir, name), mode, returncode, signalled)
    if how == "finished" and not signalled:
      continue
    if how == "failed":
      raise RuntimeError(f"sweep run {name} failed (exit {returncode}); command: "
                         f"{' '.join(cmd)}")
    hint = "the sweep was signalled" if how == "finished" else "its checkpoints are kept"
    print(f"{name} {_describe(how, returncode)}; {hint}: relaunch the same command to go on",
          flush=True)
    break


@contextlib.contextmanager
def _passing_signals_to(procs):
  """While open, SIGTERM/SIGINT to this process reach every live process of `procs()` (a
  callable: the runs in flight) as SIGTERM, so each checkpoints and exits. Yields a dict whose
  "signalled" turns True once a signal came."""
  state = {"signalled": False}

  def on_signal(signum, _frame):
    live = [proc for proc in procs() if proc.poll() is None]
    print(f"sweep: signal {signum}; stopping the {len(live)} runs in flight (they checkpoint)",
          flush=True)
    state["signalled"] = True
    for proc in live:
      proc.send_signal(signal.SIGTERM)

  previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield state
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _run_passing_signals(cmd):
  """Runs `cmd` in the foreground; SIGTERM/SIGINT to this process reach it as SIGTERM.

  Returns (exit code, whether this process was signalled)."""
  proc = subprocess.Popen(cmd)
  with _passing_signals_to(lambda: [proc]) as state:
    return proc.wait(), state["signalled"]


def run_concurrently(todo, n_total: int, workdir: str, parallel: int) -> None:
  """Up to `parallel` training runs at once, each logging to <run>/train.log.

  A run that fails, is killed by a signal or stops without results.json (preempted) stops new
  launches, and the runs in flight finish. SIGTERM or SIGINT to the sweep is passed on to the
  runs in flight as SIGTERM: each checkpoints and exits, and the same command resumes them. A
  run that failed (exit > 0, the sweep not signalled) is raised once the others have ended.
  """
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  pending, active, failed = list(todo), [], []
  stopped = False  # a run ended without results
  with _passing_signals_to(lambda: [run[2] for run in active]) as state:
    while active or (pending and not (stopped or state["signalled"])):
      while pending and not (stopped or state["signalled"]) and len(active) < parallel:
        i, name, cmd = pending.pop(0)
        run_dir = os.path.join(workdir, name)
        os.makedirs(run_dir, exist_ok=True)
        log = open(os.path.join(run_dir, "train.log"), "a")
        active.append((i, name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                 env=env), log, time.time()))
        print(f"[{i + 1}/{n_total}] {name}: training ({len(active)} running; log "
              f"{os.path.join(run_dir, 'train.log')})", flush=True)
      time.sleep(0.5)
      for run in list(active):
        i, name, proc, log, t0 = run
        if proc.poll() is None:
          continue
        active.remove(run)
        log.close()
        how = _outcome(os.path.join(workdir, name), "train", proc.returncode,
                       state["signalled"])
        if how == "failed":
          failed.append(name)
        print(f"[{i + 1}/{n_total}] {name}: {_describe(how, proc.returncode)} after "
              f"{time.time() - t0:.0f} s", flush=True)
        if how != "finished":
          stopped = True
  if (stopped or state["signalled"]) and (pending or state["signalled"]):
    print(f"{len(pending)} runs not started; relaunch the same command to resume", flush=True)
  if failed:
    raise RuntimeError(f"sweep runs failed: {failed} (see their train.log)")


def main(argv):
  del argv
  sweep = load_sweep(_CONFIG.value)
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  os.makedirs(workdir, exist_ok=True)
  mode = _MODE.value
  if mode == "benchmark":
    metrics = (list(BENCHMARK_METRICS) if _METRICS.value == _METRICS.default
               else _METRICS.value)
    commands = [(o, benchmark_command(_CONFIG.value, os.path.join(workdir, run_name(o)), o,
                                      _EXTRA.value, _BENCH_ARGS.value)) for o in sweep]
  else:
    metrics = _METRICS.value
    commands = [(o, train_command(_CONFIG.value, os.path.join(workdir, run_name(o)), o,
                                  _EXTRA.value)) for o in sweep]
  names = [run_name(o) for o in sweep]
  only = set(select_runs(_ONLY.value, names))
  if _PRINT.value:
    for o, cmd in commands:
      if run_name(o) not in only:
        continue
      print(" ".join(shlex.quote(c) for c in cmd))
    return
  if _RESTORE.value and not _TABULATE.value:
    restored = restore_finished(os.path.abspath(os.path.expanduser(_RESTORE.value)), workdir,
                                sweep)
    if restored:
      print(f"restored {len(restored)} finished runs from {_RESTORE.value}: "
            f"{', '.join(restored)}", flush=True)
  if _PARALLEL.value < 1:
    raise app.UsageError(f"--parallel={_PARALLEL.value} must be >= 1")
  if _PARALLEL.value > 1 and mode != "train":
    raise app.UsageError("--parallel > 1 is for training sweeps: concurrent benchmarks would time "
                         "each other")
  todo = []
  for i, (overrides, cmd) in enumerate(commands):
    name = run_name(overrides)
    if os.path.exists(os.path.join(workdir, name, result_file(mode))):
      print(f"[{i + 1}/{len(commands)}] {name}: done, skipped", flush=True)
    elif not _TABULATE.value and name in only:
      todo.append((i, name, cmd))
  needs = {run_name(o): sources(o) for o in sweep if sources(o)}
  for name, srcs in needs.items():
    for src in srcs:
      if src not in names or names.index(src) > names.index(name):
        raise app.UsageError(f"run {name} starts from {src!r}, which is not an earlier run of "
                             f"the sweep")
  if _PARALLEL.value > 1 and any(name in needs for _, name, _ in todo):
    raise app.UsageError(f"runs {sorted(needs)} start from other runs of the sweep: run it with "
                         f"--parallel=1")
  if _PARALLEL.value == 1:
    run_serially(todo, len(commands), workdir, mode, needs)
  else:
    run_concurrently(todo, len(commands), workdir, _PARALLEL.value)
  rows = collect(workdir, sweep, metrics, mode)
  write_tables(workdir, rows)
  pngs = plot(workdir, rows, sweep, metrics, mode)
  if mode == "train":
    pngs += plot_curves(workdir, sweep)
  print(open(os.path.join(workdir, "sweep.md")).read())
  groups = seed_groups(rows, sweep, metrics) if mode == "train" else []
  if groups:
    write_seed_table(workdir, groups, metrics)
    pngs += plot_seed_groups(workdir, groups, metrics)
    print(open(os.path.join(workdir, "sweep_seeds.md")).read())
    paired_md = write_paired_tables(workdir, sweep, metrics)
    if paired_md:
      print(open(paired_md).read())
  elif not pngs and mode == "train":
    pngs += plot_runs(workdir, rows, metrics)
  print("wrote", os.path.join(workdir, "sweep.csv"), *pngs)
  if _ARCHIVE.value:
    dst = os.path.abspath(os.path.expanduser(_ARCHIVE.value))
    runs = archive(workdir, sweep, dst)
    print(f"archived the sweep's tables and {len(runs)} runs' results, configs, metrics and "
          f"ranks in {dst}")


if __name__ == "__main__":
  app.run(main)
