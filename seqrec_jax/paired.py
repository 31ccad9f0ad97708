"""Paired, per-user comparison of two groups of runs on the same data (e.g. SRA-CL vs its backbone).

Each finished run writes `eval_ranks.npz` (`loop.RANKS_FILE`): the 0-based target rank of every
evaluated user on the valid and test stages. Two arms, each a list of runs (seeds), are compared
on the same users:

- per run, the metric (its mean over users, as results.json reports it), then each arm's mean and
  population std over its runs: the seed-to-seed spread;
- per user, the metric averaged over the arm's runs; the per-user difference A - B; its mean (equal
  to the difference of the arms' means), a paired bootstrap 95% interval over users, and a two-sided
  sign-flip permutation p-value (H0: for each user, A's and B's values are exchangeable).

The user-level interval and p-value say whether the difference holds across users for *these*
trained models; training randomness is what the seed spread measures. Both are reported.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np

from seqrec_jax import metrics as metrics_lib

RANKS_FILE = "eval_ranks.npz"  # written by loop.final_metrics
_CHUNK = 256  # resamples drawn at once


def load_ranks(workdir: str, stage: str = "test") -> Dict[str, np.ndarray]:
  """{"users", "targets", "ranks"} of one run's `stage` from `<workdir>/eval_ranks.npz`."""
  if stage not in ("valid", "test"):
    raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")
  path = os.path.join(workdir, RANKS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: runs write it when they finish; for a run finished before that, "
        f"`python launch/eval.py --workdir {workdir} --write_ranks` writes it from its best "
        "checkpoint")
  with np.load(path) as f:
    missing = {"users", f"{stage}_targets", f"{stage}_ranks"} - set(f.files)
    if missing:
      raise ValueError(f"{path} lacks {sorted(missing)} (has {sorted(f.files)})")
    out = {"users": f["users"], "targets": f[f"{stage}_targets"], "ranks": f[f"{stage}_ranks"]}
  if not len(out["users"]) == len(out["targets"]) == len(out["ranks"]):
    raise ValueError(f"{path}: users, targets and ranks differ in length")
  if len(out["ranks"]) and out["ranks"].min() < 0:
    raise ValueError(f"{path}: negative ranks in {stage}_ranks (ranks are 0-based)")
  return out


def _check_same_rows(runs: Sequence[Dict[str, np.ndarray]], names: Sequence[str]) -> None:
  first, first_name = runs[0], names[0]
  for run, name in zip(runs[1:], names[1:]):
    for key in ("users", "targets"):
      if run[key].shape != first[key].shape or not np.array_equal(run[key], first[key]):
        raise ValueError(f"{name} and {first_name} were evaluated on different {key}: "
                         "paired comparisons need runs on the same data and split")


def compare(a_dirs: Sequence[str], b_dirs: Sequence[str], metrics: Sequence[str], *,
            stage: str = "test", n_resamples: int = 10_000, seed: int = 0) -> Dict:
  """The comparison of arm A (`a_dirs`) against arm B (`b_dirs`) on each of `metrics`.

  Returns:
    {"stage", "users", "a": [dirs], "b": [dirs], "metrics": {metric: {...}}} where each metric
    has a_runs / b_runs (per-run values), a_mean, a_std, b_mean, b_std, diff, ci95 (list),
    p_value, spread (the larger std), diff_over_spread, no_overlap (A's worst run above B's best).
  """
  if not a_dirs or not b_dirs:
    raise ValueError("each arm needs at least one run")
  if n_resamples < 1:
    raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
  for metric in metrics:
    metrics_lib.per_row(np.zeros(1), metric)  # an unknown name fails before any file is read
  names = list(a_dirs) + list(b_dirs)
  runs = [load_ranks(d, stage) for d in names]
  _check_same_rows(runs, names)
  n_users = len(runs[0]["users"])
  if n_users == 0:
    raise ValueError(f"{names[0]}: no evaluated users")
  rng = np.random.default_rng(seed)
  out = {"stage": stage, "users": n_users, "a": list(a_dirs), "b": list(b_dirs), "metrics": {},
         "n_resamples": int(n_resamples), "seed": int(seed)}
  for metric in metrics:
    values = np.stack([metrics_lib.per_row(r["ranks"], metric) for r in runs])  # [runs, users]
    a_vals, b_vals = values[:len(a_dirs)], values[len(a_dirs):]
    a_runs, b_runs = a_vals.mean(1), b_vals.mean(1)
    d = a_vals.mean(0) - b_vals.mean(0)  # [users]
    diff = float(d.mean())
    boot, flips = [], []
    for lo in range(0, n_resamples, _CHUNK):
      m = min(_CHUNK, n_resamples - lo)
      boot.append(d[rng.integers(0, n_users, size=(m, n_users))].mean(1))
      signs = rng.integers(0, 2, size=(m, n_users), dtype=np.int8) * 2 - 1
      flips.append((signs * d).mean(1))
    boot, flips = np.concatenate(boot), np.concatenate(flips)
    exceed = int(np.sum(np.abs(flips) >= abs(diff) - 1e-15))
    spread = float(max(a_runs.std(), b_runs.std()))
    out["metrics"][metric] = {
        "a_runs": a_runs.tolist(), "b_runs": b_runs.tolist(),
        "a_mean": float(a_runs.mean()), "a_std": float(a_runs.std()),
        "b_mean": float(b_runs.mean()), "b_std": float(b_runs.std()),
        "diff": diff,
        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "p_value": (1 + exceed) / (1 + n_resamples),
        "spread": spread,
        "diff_over_spread": diff / spread if spread > 0 else None,
        "no_overlap": bool(a_runs.min() > b_runs.max()),
    }
  return out


def to_markdown(result: Dict, a_name: str = "A", b_name: str = "B") -> str:
  """One table row per metric."""
  lines = [
      f"{result['stage']} stage, {result['users']} users; {a_name}: {len(result['a'])} runs, "
      f"{b_name}: {len(result['b'])} runs; {result['n_resamples']} resamples",
      "",
      f"| metric | {a_name} (mean ± std) | {b_name} (mean ± std) | {a_name} - {b_name} | "
      "95% CI over users (paired bootstrap) | p (sign-flip) | diff / seed spread | "
      f"{a_name}'s worst run > {b_name}'s best |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for metric, r in result["metrics"].items():
    ratio = "n/a" if r["diff_over_spread"] is None else f"{r['diff_over_spread']:.1f}"
    lines.append(
        f"| {metric} | {r['a_mean']:.4f} ± {r['a_std']:.4f} | "
        f"{r['b_mean']:.4f} ± {r['b_std']:.4f} | {r['diff']:+.4f} | "
        f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | {r['p_value']:.4f} | "
        f"{ratio} | {'yes' if r['no_overlap'] else 'no'} |")
  lines += ["", CAVEAT]
  return "\n".join(lines) + "\n"


# Written under every table: two seeds of one method can differ with a user-level interval that
# excludes zero (BENCHMARKS.md §6, the Toys backbone's seeds 2024 vs 2026).
CAVEAT = ("The interval and p-value resample users for these trained runs: they leave training "
          "randomness out. Whether one method beats another is the difference against the seed "
          "spread (diff / seed spread, and the worst-vs-best column).")


# Upper edges (1-based, inclusive) of the rank bands of `rank_profile`; the last band is above
# the last edge.
RANK_EDGES = (1, 5, 10, 20, 50, 100, 500)


def band_labels(edges: Sequence[int] = RANK_EDGES) -> List[str]:
  """["1", "2-5", "6-10", ..., "> 500"] for the default edges."""
  if not edges or list(edges) != sorted(set(edges)) or edges[0] < 1:
    raise ValueError(f"rank band edges must be increasing integers >= 1, got {list(edges)}")
  labels, lo = [], 1
  for hi in edges:
    labels.append(str(hi) if hi == lo else f"{lo}-{hi}")
    lo = hi + 1
  return labels + [f"> {edges[-1]}"]


def rank_profile(arms: Dict[str, Sequence[str]], *, stage: str = "test",
                 edges: Sequence[int] = RANK_EDGES) -> Dict:
  """Where each arm's runs rank the targets: per run, the share of users whose target's 1-based
  rank falls in each band (1, 2-5, ..., > the last edge), its median rank and its hit rate
  HR@K at every K from 1 to the catalogue; per arm, their mean and population std over runs.

  Two arms can reach the same HR@10 by different routes (one sharper at the top, one with fewer
  targets buried deep); the bands and the HR@K curve show which. Every run must be on the same
  users and targets.

  Returns:
    {"stage", "users", "bands", "ks", "arms": {name: {"runs", "shares" [runs, bands],
     "share_mean", "share_std", "median_rank" [runs], "hr_at_k" [runs, ks]}}}.
  """
  labels = band_labels(edges)
  if not arms or any(not dirs for dirs in arms.values()):
    raise ValueError("each arm needs at least one run")
  names = [d for dirs in arms.values() for d in dirs]
  runs = [load_ranks(d, stage) for d in names]
  _check_same_rows(runs, names)
  n_users = len(runs[0]["users"])
  if n_users == 0:
    raise ValueError(f"{names[0]}: no evaluated users")
  top = int(max(r["ranks"].max() for r in runs)) + 1
  ks = np.unique(np.round(np.logspace(0, np.log10(max(top, 2)), 60)).astype(np.int64))
  out = {"stage": stage, "users": n_users, "bands": labels, "edges": list(edges),
         "ks": ks.tolist(), "arms": {}}
  bins = np.asarray([0, *edges, np.iinfo(np.int64).max], np.int64)  # 0-based ranks
  i = 0
  for name, dirs in arms.items():
    chunk = runs[i:i + len(dirs)]
    i += len(dirs)
    shares = np.stack([np.histogram(r["ranks"], bins=bins)[0] / n_users for r in chunk])
    hr = np.stack([np.searchsorted(np.sort(r["ranks"]), ks, side="left") / n_users
                   for r in chunk])  # [runs, ks]: share with 0-based rank < k
    out["arms"][name] = {
        "runs": list(dirs), "shares": shares.tolist(),
        "share_mean": shares.mean(0).tolist(), "share_std": shares.std(0).tolist(),
        "median_rank": [float(np.median(r["ranks"]) + 1) for r in chunk],
        "hr_at_k": hr.tolist()}
  return out


def profile_markdown(profile: Dict) -> str:
  """One row per arm: its share of users in each rank band (mean ± std over runs) and its median
  rank; then, for each arm after the first, the first arm minus it."""
  bands = profile["bands"]
  head = (f"{profile['stage']} stage, {profile['users']} users: the share of users whose target "
          "ranks in each band (mean ± std over runs), and the median rank (mean over runs)")
  lines = [head, "", "| arm | runs | " + " | ".join(bands) + " | median rank |",
           "|---|---|" + "---|" * (len(bands) + 1)]
  arms = profile["arms"]
  for name, a in arms.items():
    cells = [f"{m:.4f} ± {s:.4f}" for m, s in zip(a["share_mean"], a["share_std"])]
    lines.append(f"| {name} | {len(a['runs'])} | " + " | ".join(cells) +
                 f" | {np.mean(a['median_rank']):.0f} |")
  names = list(arms)
  for name in names[1:]:
    d = np.asarray(arms[names[0]]["share_mean"]) - np.asarray(arms[name]["share_mean"])
    dm = np.mean(arms[names[0]]["median_rank"]) - np.mean(arms[name]["median_rank"])
    lines.append(f"| {names[0]} - {name} | | " + " | ".join(f"{x:+.4f}" for x in d) +
                 f" | {dm:+.0f} |")
  return "\n".join(lines) + "\n"


def save_profile_plot(path: str, profile: Dict) -> None:
  """Two panels: each arm's HR@K against K (log axis; the mean over runs, shaded from its lowest
  to its highest run), and the first arm minus each other arm (shaded: ± the larger seed std)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ks = np.asarray(profile["ks"])
  arms = profile["arms"]
  names = list(arms)
  fig, (top, diff) = plt.subplots(1, 2, figsize=(11, 3.8))
  for j, name in enumerate(names):
    hr = np.asarray(arms[name]["hr_at_k"])
    colour = f"C{j}"
    top.plot(ks, hr.mean(0), color=colour, label=f"{name} ({len(hr)} runs)")
    top.fill_between(ks, hr.min(0), hr.max(0), color=colour, alpha=0.2, lw=0)
    if j:
      first = np.asarray(arms[names[0]]["hr_at_k"])
      d = first.mean(0) - hr.mean(0)
      spread = np.maximum(first.std(0), hr.std(0))
      diff.plot(ks, d, color=colour, label=f"{names[0]} - {name}")
      diff.fill_between(ks, d - spread, d + spread, color=colour, alpha=0.2, lw=0)
  for ax in (top, diff):
    ax.set_xscale("log")
    ax.set_xlabel("K (1-based rank cut-off)")
    ax.grid(alpha=0.3)
    for k in (10, 20):
      ax.axvline(k, color="gray", lw=0.8, ls=":")
  top.set_ylabel(f"{profile['stage']} HR@K")
  top.legend(fontsize=8)
  diff.axhline(0.0, color="gray", lw=1)
  diff.set_ylabel(f"difference in {profile['stage']} HR@K")
  if len(names) > 1:
    diff.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def expand(patterns: Sequence[str]) -> List[str]:
  """Workdirs from names or glob patterns, sorted within each pattern; a pattern matching nothing
  is an error."""
  import glob  # pylint: disable=g-import-not-at-top
  out = []
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not found:
      raise FileNotFoundError(f"no workdir matches {pattern!r}")
    out.extend(found)
  return out
