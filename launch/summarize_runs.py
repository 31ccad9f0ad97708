"""Mean and std of test metrics over seed runs, as a Markdown table row per run group.

  python launch/summarize_runs.py ~/runs/sasrec_beauty_seed*  [--keys HR@10,NDCG@10,HR@20,NDCG@20]
"""

import argparse
import json
import os

import numpy as np


def main():
  p = argparse.ArgumentParser()
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--keys", default="HR@10,NDCG@10,HR@20,NDCG@20,MRR@10")
  p.add_argument("--split", default="test")
  args = p.parse_args()
  keys = args.keys.split(",")
  rows, missing = [], []
  for wd in args.workdirs:
    path = os.path.join(wd, "results.json")
    if not os.path.exists(path):
      missing.append(wd)
      continue
    with open(path) as f:
      rows.append((wd, json.load(f)))
  print("| run | " + " | ".join(keys) + " | best step | train s |")
  print("|---|" + "---|" * (len(keys) + 2))
  for wd, r in rows:
    print(f"| {os.path.basename(wd)} | " + " | ".join(f"{r[args.split][k]:.4f}" for k in keys) +
          f" | {r['best_step']} | {r['train_seconds']:.0f} |")
  if rows:
    vals = np.array([[r[args.split][k] for k in keys] for _, r in rows])
    print(f"| **mean ± std ({len(rows)} seeds)** | " +
          " | ".join(f"**{m:.4f}** ± {s:.4f}" for m, s in zip(vals.mean(0), vals.std(0))) + " | | |")
  if missing:
    print(f"\n(no results.json yet: {', '.join(os.path.basename(m) for m in missing)})")


if __name__ == "__main__":
  main()
