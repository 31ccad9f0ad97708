#!/usr/bin/env python3
"""Users/s of RecBole 1.2.1's per-user top-K loop, the peer figure for launch/recommend_benchmark.py.

Runs in the peer venv (benchmarks/peers/README.md):

  /work/peers-venv/bin/python benchmarks/peers/recbole_full_sort.py --out /tmp/peer_full_sort.json

What is timed is the loop a RecBole user writes to serve recommendations: for each user, an
`Interaction` holding that one user's `item_id_list` / `item_length`, `model.full_sort_predict`,
the padding item's score set to -inf (as recbole.utils.case_study does), `torch.topk(scores, K)`
and the ids and scores as numpy arrays.  The model is RecBole's SASRec at our sizes (hidden 64,
2 layers, 2 heads, inner 256, GELU, MAX_ITEM_LIST_LENGTH = --max_len), randomly initialised and
in eval mode under `torch.no_grad()`: speed does not depend on training.

Two catalogues:
  * beauty: RecBole's own dataset built from Beauty.txt with recbole_sasrec.py's preparation;
    the users' histories are the rows of RecBole's leave-one-out test split;
  * synthetic: --synthetic_items items.  SASRec reads nothing from its dataset but
    `num(ITEM_ID)`, so the model is built from the Beauty config and a stub answering that
    (loading a million-item atomic file would only add minutes of pandas); the histories are
    random, with lengths drawn as our benchmark's synthetic users' are.

Each catalogue: one untimed warm-up pass over the users, then --repeats timed passes; users/s is
users / median pass time.  The shims of recbole_sasrec.py apply (it is imported), among them
autograd anomaly detection switched off after importing RecBole's models.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

# This folder, so that the Beauty preparation and RecBole shims come from the training runner.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import recbole_sasrec  # noqa: E402  (applies np.float, torch.load and anomaly-detection shims)

import recbole  # noqa: E402
from recbole.data import create_dataset  # noqa: E402
from recbole.data.interaction import Interaction  # noqa: E402
from recbole.model.sequential_recommender import SASRec  # noqa: E402
from recbole.utils import init_seed  # noqa: E402


class _ItemCountStub:
  """The one thing SequentialRecommender asks of its dataset: `num(ITEM_ID)` (items + padding)."""

  def __init__(self, item_field, n_items):
    self.item_field = item_field
    self.n_items = n_items

  def num(self, field):
    if field != self.item_field:
      raise KeyError(f"stub dataset only knows {self.item_field!r}, asked for {field!r}")
    return self.n_items + 1  # row 0 is RecBole's [PAD]


def _model(config, dataset):
  """RecBole's SASRec, random init, eval mode (dropout off), on the CPU."""
  init_seed(config["seed"], config["reproducibility"])
  model = SASRec(config, dataset).to(config["device"])
  model.eval()
  return model


def _loop(model, seqs, lens, k):
  """Seconds of one pass of the per-user loop over the rows of `seqs` [U, L] / `lens` [U]."""
  seq_field, len_field = model.ITEM_SEQ, model.ITEM_SEQ_LEN
  t = time.perf_counter()
  with torch.no_grad():
    for u in range(seqs.shape[0]):
      inter = Interaction({seq_field: seqs[u:u + 1], len_field: lens[u:u + 1]})
      scores = model.full_sort_predict(inter)  # [1, n_items + 1]
      scores[:, 0] = -np.inf  # never recommend [PAD]
      top_scores, top_ids = torch.topk(scores, k)
      top_ids.numpy(), top_scores.numpy()
  return time.perf_counter() - t


def _time(name, model, seqs, lens, k, repeats):
  """Warm-up pass, then the median of `repeats` timed passes -> a result row."""
  _loop(model, seqs, lens, k)
  passes = [_loop(model, seqs, lens, k) for _ in range(repeats)]
  users = int(seqs.shape[0])
  row = {"catalogue": name, "items": model.n_items - 1, "users_timed": users,
         "pass_seconds": passes, "users_per_s": users / statistics.median(passes)}
  print(f"[peer] {name:10s} items={row['items']:>9,d}: RecBole per-user full_sort_predict + "
        f"topk {row['users_per_s']:8.1f} users/s ({users} users, passes {passes})", flush=True)
  return row


def _synthetic_histories(n_items, n_users, max_len, seed=0):
  """Right-padded random histories; lengths as launch/recommend_benchmark.py's synthetic users."""
  rng = np.random.default_rng(seed)
  lens = np.minimum(rng.integers(5, max_len + 10, n_users), max_len)
  seqs = np.zeros((n_users, max_len), np.int64)
  for u, n in enumerate(lens):
    seqs[u, :n] = rng.integers(1, n_items + 1, n)  # RecBole pads on the right
  return torch.from_numpy(seqs), torch.from_numpy(lens.astype(np.int64))


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="JSON result path")
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--top_k", type=int, default=100)
  p.add_argument("--max_len", type=int, default=20,
                 help="MAX_ITEM_LIST_LENGTH (configs/sasrec/beauty.py's data.max_len)")
  p.add_argument("--beauty_path", default="/work/shared/data/beauty/Beauty.txt")
  p.add_argument("--beauty_users", type=int, default=500, help="users timed on Beauty")
  p.add_argument("--synthetic_items", type=int, default=1_000_000)
  p.add_argument("--synthetic_users", type=int, default=50, help="users timed on the synthetic one")
  p.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
  p.add_argument("--seed", type=int, default=2024)
  p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "recbole_peers"))
  args = p.parse_args()

  out_path = os.path.abspath(args.out)
  beauty_path = os.path.abspath(args.beauty_path)
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  os.makedirs(args.workdir, exist_ok=True)
  run_dir = tempfile.mkdtemp(prefix="full_sort_", dir=args.workdir)
  os.chdir(run_dir)  # RecBole writes ./log relative to the working directory
  torch.set_num_threads(args.threads)

  # The training runner's config, so the model sizes and field names are the ones the peer
  # quality/timing runs use; its training-only fields are unused here.
  runner_args = argparse.Namespace(
      dataset="beauty", beauty_path=beauty_path, max_len=args.max_len, seed=args.seed,
      epochs=1, batch=256, stopping_step=10, valid_metric="NDCG@10", eval_batch=4096,
      ml100k_timestamps="rank")
  config = recbole_sasrec.build_config(runner_args, run_dir)
  result = {"peer": f"RecBole {recbole.__version__} SASRec", "torch": torch.__version__,
            "threads": args.threads, "top_k": args.top_k, "max_len": args.max_len,
            "repeats": args.repeats, "runs": []}

  dataset = create_dataset(config)
  _, _, test = dataset.build()  # leave-one-out test split: one row per user
  feat = test.inter_feat
  n = min(args.beauty_users, len(feat))
  seqs = feat[dataset.iid_field + config["LIST_SUFFIX"]][:n]
  lens = feat[config["ITEM_LIST_LENGTH_FIELD"]][:n]
  model = _model(config, dataset)
  result["runs"].append(_time("beauty", model, seqs, lens, args.top_k, args.repeats))
  del model, dataset, test, feat

  stub = _ItemCountStub(config["ITEM_ID_FIELD"], args.synthetic_items)
  model = _model(config, stub)
  seqs, lens = _synthetic_histories(args.synthetic_items, args.synthetic_users, args.max_len)
  result["runs"].append(_time("synthetic", model, seqs, lens, args.top_k, args.repeats))

  # After the runs: RecBole's import switches anomaly detection on; the runner switched it off.
  result["threads"] = torch.get_num_threads()
  result["anomaly_detection"] = bool(torch.is_anomaly_enabled())
  with open(out_path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"[peer] wrote {out_path}", flush=True)


if __name__ == "__main__":
  main()
