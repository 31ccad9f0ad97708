#!/usr/bin/env python3
"""Run the peer system RecBole 1.2.1's SASRec under our protocol.

This script only imports and configures RecBole (installed in its own venv,
see benchmarks/peers/README.md); no RecBole code lives in this repository.

Modes
  quality  train with early stopping on the valid metric, test at the best
           valid epoch, write HR/NDCG/MRR @ 5/10/20 (our naming) to --out.
  timing   train --timing_epochs epochs with no evaluation, report median
           seconds per training epoch and training sequences/s, then time the
           full-ranking test evaluation (users/s).

Compatibility shims applied here (never by editing site-packages):
  * np.float = float          (RecBole's evaluator/metrics.py uses np.float)
  * torch.load(weights_only=False) by default (RecBole reloads its own
    checkpoint; torch >= 2.6 refuses it otherwise)
  * torch.autograd.set_detect_anomaly(False) after importing RecBole's
    models (its `sine` module switches anomaly detection on at import,
    which slows training several-fold)
  * torch.set_num_threads(--threads)
"""
import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

if not hasattr(np, "float"):
    np.float = float  # RecBole 1.2.1 evaluator/metrics.py

import torch

_orig_torch_load = torch.load


@functools.wraps(_orig_torch_load)
def _torch_load_full(*args, **kwargs):
    kwargs.setdefault("weights_only", False)  # RecBole's own checkpoints only
    return _orig_torch_load(*args, **kwargs)


torch.load = _torch_load_full

import recbole  # noqa: E402
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
import recbole.model.sequential_recommender  # noqa: E402,F401  (imports sine.py)
from recbole.utils import get_model, get_trainer, init_logger, init_seed  # noqa: E402

torch.autograd.set_detect_anomaly(False)  # undo recbole/model/sequential_recommender/sine.py

KS = (5, 10, 20)
# Expected counts (users, items, interactions) of the raw data: no filtering.
EXPECTED = {"ml-100k": (943, 1682, 100000), "beauty": (22363, 12101, 198502)}
DEFAULT_MAX_LEN = {"ml-100k": 50, "beauty": 20}


def our_metrics(result):
    """RecBole's {'hit@10': x, 'ndcg@10': y, 'mrr@10': z, ...} -> HR@10/NDCG@10/MRR@10."""
    names = (("hit", "HR"), ("ndcg", "NDCG"), ("mrr", "MRR"))
    return {f"{ours}@{k}": float(result[f"{theirs}@{k}"]) for theirs, ours in names for k in KS}


def prepare_beauty(beauty_path, data_root):
    """Beauty.txt (`user item` per line, chronological per user) -> atomic .inter.

    A synthetic, strictly increasing timestamp (the line number) keeps the file
    order under order=TO. No filtering.
    """
    ddir = os.path.join(data_root, "beauty")
    os.makedirs(ddir, exist_ok=True)
    dst = os.path.join(ddir, "beauty.inter")
    tmp = f"{dst}.{os.getpid()}.tmp"
    with open(beauty_path) as fin, open(tmp, "w") as fout:
        fout.write("user_id:token\titem_id:token\ttimestamp:float\n")
        n = 0
        for line in fin:
            parts = line.split()
            if not parts:
                continue
            u, i = parts[0], parts[1]
            fout.write(f"{u}\t{i}\t{n}\n")
            n += 1
    os.replace(tmp, dst)
    return data_root


def ml100k_wheel_file():
    return os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k", "ml-100k.inter")


def prepare_ml100k_rank(data_root):
    """The wheel's ml-100k.inter with each timestamp replaced by its dense rank.

    RecBole stores float fields as float32; raw ml-100k timestamps (~8.8e8 s) lose
    their seconds there (64 s spacing; about 1 s after RecBole's default min-max
    normalisation), so interactions a few seconds apart can swap and the per-user
    order is no longer the stable (user, timestamp) order our loader uses. Ranks
    (< 2^24) are exact in float32, ties stay ties (file order), so RecBole's stable
    sort reproduces our order exactly. Same 100,000 rows, nothing else changed.
    """
    import pandas as pd
    src = pd.read_csv(ml100k_wheel_file(), sep="\t", dtype=str)
    ts = src["timestamp:float"].astype(np.float64)
    src["timestamp:float"] = ts.rank(method="dense").astype(np.int64).astype(str)
    ddir = os.path.join(data_root, "ml100k_tsrank")
    os.makedirs(ddir, exist_ok=True)
    dst = os.path.join(ddir, "ml100k_tsrank.inter")
    src.to_csv(dst, sep="\t", index=False)
    return data_root


def source_sequences(args):
    """{user token: [item tokens]} in our order: stable sort by (user, timestamp)."""
    seqs = {}
    if args.dataset == "beauty":
        with open(args.beauty_path) as f:
            for line in f:
                parts = line.split()
                if parts:
                    seqs.setdefault(parts[0], []).append(parts[1])
        return seqs
    import pandas as pd
    df = pd.read_csv(ml100k_wheel_file(), sep="\t", dtype=str)
    df["t"] = df["timestamp:float"].astype(np.float64)
    df = df.sort_values(["user_id:token", "t"], kind="stable")
    for u, i in zip(df["user_id:token"], df["item_id:token"]):
        seqs.setdefault(u, []).append(i)
    return seqs


def check_order(dataset, split_data, seqs, drop_last):
    """Counts users whose RecBole target/history differ from our order.

    split_data is the valid (drop_last=1) or test (drop_last=0) dataloader; its
    rows are (user, target, right-padded history of item_length items).
    """
    d = split_data._dataset
    feat = d.inter_feat
    uids = dataset.id2token(dataset.uid_field, feat[dataset.uid_field].numpy())
    targets = dataset.id2token(dataset.iid_field, feat[dataset.iid_field].numpy())
    hists = feat[dataset.iid_field + dataset.config["LIST_SUFFIX"]].numpy()
    lens = feat[dataset.config["ITEM_LIST_LENGTH_FIELD"]].numpy()
    bad = 0
    for u, tgt, h, n in zip(uids, targets, hists, lens):
        seq = seqs[u][: len(seqs[u]) - drop_last]
        hist = list(dataset.id2token(dataset.iid_field, h[:n]))
        if tgt != seq[-1] or hist != seq[-1 - n:-1]:
            bad += 1
    return bad


def build_config(args, run_dir):
    max_len = args.max_len or DEFAULT_MAX_LEN[args.dataset]
    cfg = {
        # environment
        "seed": args.seed,
        "reproducibility": True,
        "use_gpu": False,
        "device": "cpu",
        "worker": 0,
        "show_progress": False,
        "state": "INFO",
        "checkpoint_dir": os.path.join(run_dir, "saved"),
        "save_dataset": False,
        "save_dataloaders": False,
        "log_wandb": False,
        # data: no filtering at all
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "MAX_ITEM_LIST_LENGTH": max_len,
        "rm_dup_inter": None,
        "val_interval": None,
        "filter_inter_by_user_or_item": False,
        "user_inter_num_interval": None,
        "item_inter_num_interval": None,
        # model: SASRec
        "n_layers": 2,
        "n_heads": 2,
        "hidden_size": 64,
        "inner_size": 256,
        "hidden_dropout_prob": 0.5,
        "attn_dropout_prob": 0.5,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "initializer_range": 0.02,
        "loss_type": "CE",
        # training
        "epochs": args.epochs,
        "train_batch_size": args.batch,
        "learner": "adam",
        "learning_rate": 1e-3,
        "weight_decay": 0.0,
        "train_neg_sample_args": None,
        "eval_step": 1,
        "stopping_step": args.stopping_step,
        "clip_grad_norm": None,
        "enable_amp": False,
        # evaluation
        "eval_args": {
            "split": {"LS": "valid_and_test"},
            "group_by": "user",
            "order": "TO",
            "mode": "full",
        },
        "repeatable": True,
        "metrics": ["Hit", "NDCG", "MRR"],
        "topk": list(KS),
        "valid_metric": args.valid_metric,
        "valid_metric_bigger": True,
        "eval_batch_size": args.eval_batch,
        "metric_decimal_place": 6,
    }
    if args.dataset == "ml-100k" and args.ml100k_timestamps == "raw":
        # RecBole's Config points "ml-100k" at the dataset_example shipped in the wheel
        # (recbole/dataset_example/ml-100k), so nothing is downloaded; RecBole's own
        # ml-100k.yaml applies (normalize_all: True on float32 timestamps).
        cfg["load_col"] = {"inter": ["user_id", "item_id", "rating", "timestamp"]}
        dataset_name = "ml-100k"
    elif args.dataset == "ml-100k":
        # The same wheel file, timestamps rank-encoded (see prepare_ml100k_rank).
        cfg["data_path"] = prepare_ml100k_rank(os.path.join(run_dir, "data"))
        cfg["load_col"] = {"inter": ["user_id", "item_id", "rating", "timestamp"]}
        cfg["normalize_all"] = False
        dataset_name = "ml100k_tsrank"
    else:
        cfg["data_path"] = prepare_beauty(args.beauty_path, os.path.join(run_dir, "data"))
        cfg["load_col"] = {"inter": ["user_id", "item_id", "timestamp"]}
        cfg["normalize_all"] = False  # line numbers < 2^24: exact in float32
        dataset_name = "beauty"
    return Config(model="SASRec", dataset=dataset_name, config_dict=cfg)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ml-100k", "beauty"], required=True)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--epochs", type=int, default=300, help="max epochs (quality mode)")
    p.add_argument("--stopping_step", type=int, default=10, help="early-stopping patience")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=["quality", "timing", "check"], default="quality",
                   help="check: load and split the data, run the order check, write --out, no training")
    p.add_argument("--timing_epochs", type=int, default=2)
    p.add_argument("--out", required=True, help="JSON result path")
    p.add_argument("--beauty_path", default="/work/shared/data/beauty/Beauty.txt")
    p.add_argument("--max_len", type=int, default=None, help="MAX_ITEM_LIST_LENGTH (default 50 ml-100k, 20 beauty)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--eval_batch", type=int, default=4096)
    p.add_argument("--valid_metric", default="NDCG@10")
    p.add_argument("--ml100k_timestamps", choices=["rank", "raw"], default="rank",
                   help="rank: the wheel's ml-100k.inter with timestamps rank-encoded so RecBole's "
                        "float32 time field keeps the exact (user, timestamp) order (default); "
                        "raw: RecBole's dataset_example as is (about 0.4%% of targets reordered, "
                        "5 users' valid/test items differ)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "recbole_peers"),
                   help="scratch dir for RecBole logs, checkpoints and converted data")
    args = p.parse_args()

    out_path = os.path.abspath(args.out)
    args.beauty_path = os.path.abspath(args.beauty_path)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix=f"{args.dataset}_{args.mode}_s{args.seed}_", dir=args.workdir)
    os.chdir(run_dir)  # RecBole writes ./log and ./log_tensorboard relative to cwd

    torch.set_num_threads(args.threads)

    config = build_config(args, run_dir)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)

    dataset = create_dataset(config)
    n_users, n_items, n_inter = dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num
    print(f"[runner] {args.dataset}: {n_users} users, {n_items} items, {n_inter} interactions", flush=True)
    if (n_users, n_items, n_inter) != EXPECTED[args.dataset]:
        raise SystemExit(f"unexpected data counts {(n_users, n_items, n_inter)}, expected {EXPECTED[args.dataset]}")
    train_data, valid_data, test_data = data_preparation(config, dataset)
    n_train_seqs = len(train_data._dataset)
    seqs = source_sequences(args)
    order_check = {"valid_users_differing": check_order(dataset, valid_data, seqs, 1),
                   "test_users_differing": check_order(dataset, test_data, seqs, 0)}
    print(f"[runner] order check vs stable (user, timestamp) order: {order_check}", flush=True)
    if args.ml100k_timestamps == "rank" and any(order_check.values()):
        raise SystemExit(f"RecBole's sequences differ from ours: {order_check}")

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    torch.autograd.set_detect_anomaly(False)
    torch.set_num_threads(args.threads)
    assert not torch.is_anomaly_enabled()

    epoch_times = []
    orig_train_epoch = trainer._train_epoch

    def timed_train_epoch(*a, **k):
        t0 = time.perf_counter()
        r = orig_train_epoch(*a, **k)
        epoch_times.append(time.perf_counter() - t0)
        return r

    trainer._train_epoch = timed_train_epoch

    result = {
        "peer": f"RecBole {recbole.__version__} SASRec",
        "dataset": args.dataset,
        "mode": args.mode,
        "seed": args.seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "anomaly_detection": bool(torch.is_anomaly_enabled()),
        "anomaly_detection_note": "switched off after importing RecBole (its sine module turns it on)",
        "data": {"users": n_users, "items": n_items, "interactions": n_inter,
                 "train_sequences": n_train_seqs, "valid_users": len(valid_data._dataset),
                 "test_users": len(test_data._dataset),
                 "source": (args.beauty_path if args.dataset == "beauty" else
                            f"{ml100k_wheel_file()} (timestamps: {args.ml100k_timestamps})"),
                 "order_check": order_check},
    }

    if args.mode == "check":
        result["config"] = config.final_config_dict
    elif args.mode == "quality":
        history, valid_times = [], []
        state = {"best_epoch": None}
        orig_valid_epoch = trainer._valid_epoch

        def timed_valid_epoch(*a, **k):
            t0 = time.perf_counter()
            score, res = orig_valid_epoch(*a, **k)
            valid_times.append(time.perf_counter() - t0)
            history.append({"epoch": len(history), "train_seconds": epoch_times[-1],
                            "valid_seconds": valid_times[-1], **our_metrics(res)})
            return score, res

        trainer._valid_epoch = timed_valid_epoch

        def on_epoch_end(epoch_idx, valid_score):
            if trainer.cur_step == 0:  # early_stopping just updated the best
                state["best_epoch"] = epoch_idx
            h = history[-1]
            print(f"[runner] epoch {epoch_idx}: train {h['train_seconds']:.2f}s "
                  f"valid {args.valid_metric}={valid_score:.6f} HR@10={h['HR@10']:.4f} "
                  f"best_epoch={state['best_epoch']}", flush=True)

        t0 = time.perf_counter()
        _, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False,
                                    callback_fn=on_epoch_end)
        train_seconds = time.perf_counter() - t0
        test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
        result.update({
            "config": config.final_config_dict,
            "valid": our_metrics(best_valid),
            "test": our_metrics(test),
            "best_epoch": state["best_epoch"],
            "epochs_run": len(epoch_times),
            "train_seconds": train_seconds,
            "train_seconds_note": "wall time of trainer.fit, including the per-epoch validation",
            "seconds_per_epoch": statistics.median(epoch_times),
            "seconds_per_epoch_note": "median of the training part of each epoch (no evaluation)",
            "valid_history": history,
        })
    else:  # timing
        trainer.eval_collector.data_collect(train_data)
        for ep in range(args.timing_epochs):
            trainer._train_epoch(train_data, ep, show_progress=False)
            print(f"[runner] timing epoch {ep}: {epoch_times[-1]:.2f}s", flush=True)
        spe = statistics.median(epoch_times)
        eval_times = []
        for _ in range(3):  # first call warms up; report the median of the other two
            t0 = time.perf_counter()
            trainer.evaluate(test_data, load_best_model=False, show_progress=False)
            eval_times.append(time.perf_counter() - t0)
        n_eval = test_data.sample_size
        eval_s = statistics.median(eval_times[1:])
        result.update({
            "config": config.final_config_dict,
            "timing_epochs": args.timing_epochs,
            "epoch_seconds": epoch_times,
            "seconds_per_epoch": spe,
            "train_sequences_per_s": n_train_seqs / spe,
            "eval_users": n_eval,
            "eval_seconds_all_calls": eval_times,
            "eval_seconds": eval_s,
            "eval_users_per_s": n_eval / eval_s,
            "eval_note": "trainer.evaluate(test_data) full ranking over all items; first call excluded (warm-up), median of the next two",
        })

    with open(out_path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    summary = {k: v for k, v in result.items() if k not in ("config", "valid_history")}
    print(json.dumps(summary, indent=2, default=str), flush=True)
    print(f"[runner] wrote {out_path}", flush=True)


if __name__ == "__main__":
    main()
