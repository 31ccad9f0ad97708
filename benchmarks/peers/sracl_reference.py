#!/usr/bin/env python3
"""Peer timing: the public PyTorch reference implementation of SRA-CL, on CPU (or a GPU).

Run with the peer venv (never the project's):

    /work/peers-venv/bin/python benchmarks/peers/sracl_reference.py --threads 2 \
        --out /work/runs/peers/sracl_reference_beauty_timing.json

On a GPU (`--device cuda`) the reference runs as its train.sh says (no `.cuda()` shims) and the
GPU is synchronised at each batch boundary.

No reference code lives in this repository. At run time this script

1. extracts ``recommender_code/`` from the bare mirror of
   github.com/ziqiangcui/SRA-CL (``--mirror``, ``git archive HEAD``) into
   ``--workdir/src/<commit>/`` (outside this repository), byte for byte;
2. writes the three inputs the repository does not ship (its LLM-derived
   semantic embeddings), as random stand-ins of the exact format main.py
   loads, with a fixed seed (``--seed``), into ``--workdir/standins/``:
     * item embeddings ``[n_items + 1, 1024]`` float32, unit rows, a tensor
       saved by ``torch.save`` (main.py: ``torch.load(--item_semantic_emb_file)``);
     * user-prefix embeddings ``[n_prefixes, 1024]`` float32, unit rows, the
       same format (``torch.load(--user_semantic_emb_file)``);
     * ``keys_to_int``: a pickled ``dict`` from ``"uid:i1:i2:..."`` prefix keys
       to rows 0..n_prefixes-1 (``pickle.load(--seq_keys_to_int_file)``). The
       keys are produced by the reference's own ``utils.data_augmentation``
       (given a dict that numbers each new key on first lookup), so their
       format and order are exactly the ones it later looks up;
3. runs the reference's own, unmodified ``main.py`` (``runpy``) with the
   arguments of its ``train.sh`` (read from the extracted copy), ``--device``
   switched to ``cpu`` and the file paths pointed at the stand-ins. main.py
   does all of its own set-up (item and user neighbour search, data
   partition, prefix augmentation, ``SequenceDataset``/``DataLoader``,
   ``TransRec``, Adam) and then calls its ``train_epoch`` (from utils.py).
   The harness wraps that function: the wrapper hands the reference's own
   ``train_epoch`` the same ``DataLoader``, behind a pass-through iterator that
   stops after ``--warmup + --batches`` batches and timestamps each one, and
   then stops main.py (validation, checkpointing and test are not run). So
   each timed batch is exactly the reference's per-batch work: its
   ``SequenceDataset.__getitem__`` x 256 (padding, the 10 neighbour prefixes
   parsed from their keys, two random item-substitution augmentations) and
   collation, then ``calculate_loss`` + ``calculate_item_cl_loss`` +
   ``calculate_user_cl_loss``, the ``.item()`` bookkeeping, backward and
   ``optimizer.step()``. No loop glue is reimplemented.

Runtime shims (monkeypatches; the extracted files are never edited):
  * ``torch.Tensor.cuda`` and ``torch.nn.Module.cuda`` return ``self``:
    main.py calls ``torch.load(...).cuda()`` on the user embeddings, and
    utils.compute_cosine_similarity_batch calls ``.cuda()`` on its batches.
  * ``--device=cuda`` of train.sh becomes ``--device=cpu`` (all other
    placement in the reference goes through ``.to(args.device)``).
  * ``utils.train_epoch`` is wrapped as described above (timing, truncation,
    ``torch.set_num_threads(--threads)``, autograd anomaly detection off if
    anything switched it on; recorded in the JSON).
  * ``utils.compute_cosine_similarity_batch`` (the user-prefix top-100
    neighbour search, about 2 * n_prefixes^2 * 1024 flops, ~35 TFLOP on
    Beauty, several minutes on 2 cores; untimed set-up) is wrapped with a
    cache: the first run calls the reference's function and stores its result
    under --workdir/standins/, keyed by the stand-in manifest; later runs load
    it. ``--recompute_user_knn`` bypasses the cache.
  * The untimed set-up runs with ``torch.set_num_threads(--setup_threads)``
    (default: all cores); the timed batches with ``--threads``.

What is timed: the wall time of each batch, from the request for the batch to
the request for the next one (data loading/augmentation + training step).
The first ``--warmup`` batches are not counted. Reported: median, p10, p90
seconds per batch, the median split into data (``__getitem__`` + collate)
and step (everything the loop body does), training samples/s (batch /
median), samples and batches per epoch, and the implied seconds per epoch
(median x samples per epoch / batch size). During the first warm-up batch a
forward hook on ``model.trm_encoder`` counts the sequences encoded per batch
(it is removed before the timed batches).
"""
import argparse
import hashlib
import json
import os
import pickle
import platform
import runpy
import shlex
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MIRROR = "/work/.mirror/ziqiangcui+SRA-CL/repo"
EMB_DIM = 1024  # TransRec's self.W is [1024, hidden]: the embeddings must be 1024-d
STANDIN_FORMAT = 1  # bump when the stand-in generation changes


class _StopAfterTraining(Exception):
    """Raised by the train_epoch wrapper to end main.py after the timed batches."""


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git(mirror, *args, **kw):
    return subprocess.run(["git", f"--git-dir={mirror}", *args], check=True,
                          stdout=subprocess.PIPE, **kw).stdout


def extract_reference(mirror, workdir):
    """git archive HEAD recommender_code (+ the mirror's Beauty.txt) into workdir/src/<commit>."""
    commit = _git(mirror, "rev-parse", "HEAD").decode().strip()
    dst = os.path.join(workdir, "src", commit)
    if os.path.isdir(dst):
        shutil.rmtree(dst)  # always a fresh, untouched copy
    os.makedirs(dst)
    tar = _git(mirror, "archive", "HEAD", "recommender_code", "data/Beauty/Beauty.txt")
    subprocess.run(["tar", "-x", "-C", dst], input=tar, check=True)
    code_dir = os.path.join(dst, "recommender_code")
    files = {}
    for name in ("main.py", "model.py", "utils.py", "train.sh"):
        files[name] = _sha256(os.path.join(code_dir, name))
    return commit, code_dir, os.path.join(dst, "data", "Beauty", "Beauty.txt"), files


def train_sh_args(code_dir):
    """The arguments of the `python main.py ...` line of the reference's train.sh."""
    with open(os.path.join(code_dir, "train.sh")) as f:
        for line in f:
            line = line.strip()
            if line.startswith("#") or "main.py" not in line:
                continue
            toks = shlex.split(line)
            return toks[toks.index("main.py") + 1:]
    raise RuntimeError("no `python main.py ...` line in train.sh")


class _NumberingDict(dict):
    """A dict that gives each new key the next row number on first lookup."""

    def __missing__(self, key):
        self[key] = v = len(self)
        return v


def make_standins(utils, data_path, maxlen, seed, sdir):
    """Random unit-vector stand-ins of the reference's semantic-embedding inputs."""
    os.makedirs(sdir, exist_ok=True)
    paths = {
        "item_semantic_emb_file": os.path.join(sdir, "beauty_item_semantic_embeddings.pt"),
        "user_semantic_emb_file": os.path.join(sdir, "beauty_user_semantic_embeddings.pt"),
        "seq_keys_to_int_file": os.path.join(sdir, "beauty_keys_to_int.pkl"),
    }
    manifest_path = os.path.join(sdir, "manifest.json")
    want = {"format": STANDIN_FORMAT, "seed": seed, "maxlen": maxlen, "dim": EMB_DIM,
            "data_sha256": _sha256(data_path)}
    if os.path.exists(manifest_path) and all(os.path.exists(p) for p in paths.values()):
        with open(manifest_path) as f:
            have = json.load(f)
        if {k: have.get(k) for k in want} == want:
            have["reused"] = True
            return paths, have

    t0 = time.perf_counter()
    # The reference's own partition and prefix enumeration produce the keys.
    user_train, _, _, usernum, itemnum = utils.data_partition(data_path)
    keys = _NumberingDict()
    out = utils.data_augmentation(user_train, maxlen, keys)
    n_samples = len(out[1])
    keys_to_int = dict(keys)
    n_prefixes = len(keys_to_int)
    assert sorted(keys_to_int.values()) == list(range(n_prefixes))

    rng = np.random.default_rng(seed)

    def unit_rows(n):
        x = rng.standard_normal((n, EMB_DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return torch.from_numpy(x)

    torch.save(unit_rows(itemnum + 1), paths["item_semantic_emb_file"])
    torch.save(unit_rows(n_prefixes), paths["user_semantic_emb_file"])
    with open(paths["seq_keys_to_int_file"], "wb") as f:
        pickle.dump(keys_to_int, f)
    manifest = dict(want, n_users=usernum, n_items=itemnum, n_train_samples=n_samples,
                    n_prefixes=n_prefixes,
                    item_emb_shape=[itemnum + 1, EMB_DIM], user_emb_shape=[n_prefixes, EMB_DIM],
                    dtype="float32", rows="unit-norm Gaussian (numpy default_rng(seed): items, then users)",
                    formats={"item_semantic_emb_file": "torch.save(torch.Tensor)",
                             "user_semantic_emb_file": "torch.save(torch.Tensor)",
                             "seq_keys_to_int_file": "pickle of dict[str, int], keys 'uid:i1:i2:...'"},
                    files={k: os.path.basename(v) for k, v in paths.items()},
                    generation_seconds=round(time.perf_counter() - t0, 2))
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    manifest["reused"] = False
    return paths, manifest


class _TimedLoader:
    """Pass-through over the reference's DataLoader: stops after n batches, timestamps each.

    Batch i's time runs from the request for batch i to the request for batch
    i+1 (for the last one: to the end of the loop), so it covers the loader's
    work for the batch and the whole body of train_epoch's loop.
    """

    def __init__(self, loader, n, on_batch_start=None, sync=None):
        self.loader, self.n, self.on_batch_start = loader, n, on_batch_start
        self.sync = sync or (lambda: None)  # torch.cuda.synchronize on a GPU
        self.dataset = loader.dataset
        self.fetch_s, self.total_s = [], []

    def __len__(self):
        return self.n

    def __iter__(self):
        it = iter(self.loader)
        prev = None
        for i in range(self.n):
            self.sync()
            t0 = time.perf_counter()
            if prev is not None:
                self.total_s.append(t0 - prev)
            if self.on_batch_start is not None:
                self.on_batch_start(i)
            batch = next(it)
            self.fetch_s.append(time.perf_counter() - t0)
            prev = t0
            yield batch
        self.sync()
        self.total_s.append(time.perf_counter() - prev)


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def _jsonable(v):
    return isinstance(v, (bool, int, float, str)) or v is None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="/work/shared/data/beauty/Beauty.txt",
                    help="`user item` per line (the reference's own Beauty.txt format); "
                         "the default is byte-identical to the mirror's data/Beauty/Beauty.txt")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the timed batches")
    ap.add_argument("--setup_threads", type=int, default=os.cpu_count(),
                    help="torch threads for the untimed set-up (neighbour searches)")
    ap.add_argument("--batches", type=int, default=20, help="timed training batches")
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches before them")
    ap.add_argument("--workdir", default="/tmp/sracl_reference")
    ap.add_argument("--mirror", default=DEFAULT_MIRROR, help="bare git mirror of ziqiangcui/SRA-CL")
    ap.add_argument("--seed", type=int, default=2024, help="seed of the random stand-in embeddings")
    ap.add_argument("--recompute_user_knn", action="store_true",
                    help="run the reference's user neighbour search even if a cached result exists")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu: .cuda() calls shimmed to identity and train.sh's --device switched to "
                         "cpu; cuda: the reference runs as its train.sh says, on the GPU, no shims")
    ap.add_argument("--out", help="JSON report")
    a = ap.parse_args()
    if a.warmup < 1 or a.batches < 1:
        ap.error("--warmup and --batches must be >= 1")

    workdir = os.path.abspath(a.workdir)
    if os.path.commonpath([workdir, REPO_ROOT]) == REPO_ROOT:
        ap.error(f"--workdir must be outside the repository ({REPO_ROOT})")
    data_path = os.path.abspath(a.data)
    os.makedirs(workdir, exist_ok=True)

    commit, code_dir, mirror_beauty, src_sha = extract_reference(a.mirror, workdir)
    data_sha = _sha256(data_path)
    data_is_mirror_beauty = data_sha == _sha256(mirror_beauty)

    # ---- shims (monkeypatches only) -------------------------------------------------
    shims = []
    if a.device == "cpu":
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        torch.nn.Module.cuda = lambda self, *args, **kwargs: self
        shims.append("torch.Tensor.cuda -> identity (main.py: torch.load(user emb).cuda(); "
                     "utils.compute_cosine_similarity_batch: batch/.t() .cuda())")
        shims.append("torch.nn.Module.cuda -> identity (defensive; the reference moves its model with .to(device))")
    elif not torch.cuda.is_available():
        ap.error("--device=cuda but torch sees no GPU")

    torch.set_num_threads(a.setup_threads)
    sys.path.insert(0, code_dir)
    import utils as ref_utils  # the reference's utils.py (extracted copy)
    assert os.path.dirname(os.path.abspath(ref_utils.__file__)) == code_dir, ref_utils.__file__

    sh_args = train_sh_args(code_dir)
    kv = dict(t.lstrip("-").split("=", 1) for t in sh_args)
    maxlen = int(kv["maxlen"])
    paths, manifest = make_standins(ref_utils, data_path, maxlen, a.seed, os.path.join(workdir, "standins"))

    run_dir = os.path.join(workdir, "run")
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    argv = []
    for t in sh_args:
        if t.startswith("--device=") and t != f"--device={a.device}":
            shims.append(f"train.sh {t} -> --device={a.device}")
            t = f"--device={a.device}"
        argv.append(t)
    argv += [f"--{k}={v}" for k, v in paths.items()]
    argv += [f"--user_sorted_indices_file={os.path.join(run_dir, 'user_sorted_indices.npy')}",
             f"--dataset_file={data_path}", f"--log_dir={os.path.join(run_dir, 'log')}/"]

    # user-prefix neighbour search: the reference's function, cached across runs
    setup = {}
    orig_knn = ref_utils.compute_cosine_similarity_batch
    knn_cache = os.path.join(workdir, "standins", "user_knn_cache.npy")
    knn_key_path = knn_cache[:-4] + ".json"
    knn_key = {"manifest_seed": manifest["seed"], "data_sha256": manifest["data_sha256"],
               "n_prefixes": manifest["n_prefixes"], "format": STANDIN_FORMAT, "reference_commit": commit}

    def cached_knn(user_semantic_emb, *args, **kwargs):
        key = dict(knn_key, args=repr(args), kwargs=repr(sorted(kwargs.items())))
        if not a.recompute_user_knn and os.path.exists(knn_cache) and os.path.exists(knn_key_path):
            with open(knn_key_path) as f:
                if json.load(f) == key:
                    setup["user_knn"] = "loaded from cache (computed earlier by the reference's own function)"
                    return np.load(knn_cache)
        t0 = time.perf_counter()
        res = orig_knn(user_semantic_emb, *args, **kwargs)
        setup["user_knn"] = "computed by the reference's compute_cosine_similarity_batch"
        setup["user_knn_seconds"] = round(time.perf_counter() - t0, 2)
        np.save(knn_cache, res)
        with open(knn_key_path, "w") as f:
            json.dump(key, f)
        return res

    ref_utils.compute_cosine_similarity_batch = cached_knn
    shims.append("utils.compute_cosine_similarity_batch wrapped with a result cache in --workdir/standins "
                 "(untimed set-up; first run calls the reference's function)")

    # the timed epoch: the reference's own train_epoch over a truncated, timestamped loader
    orig_train_epoch = ref_utils.train_epoch
    result = {}

    def timed_train_epoch(args, model, train_data, optimizer, epoch_idx, *rest, **kw):
        setup["main_setup_seconds"] = round(time.perf_counter() - t_main, 2)
        result["anomaly_detection_was_on"] = bool(torch.is_anomaly_enabled())
        torch.autograd.set_detect_anomaly(False)
        torch.set_num_threads(a.threads)
        counts = {"sequences": 0, "calls": 0}

        def hook(_mod, inputs, _out):
            counts["sequences"] += int(inputs[0].shape[0])
            counts["calls"] += 1

        handle = model.trm_encoder.register_forward_hook(hook)

        def on_batch_start(i):
            if i == 1:
                handle.remove()  # counted over the first warm-up batch only

        sync = torch.cuda.synchronize if a.device == "cuda" else None
        loader = _TimedLoader(train_data, a.warmup + a.batches, on_batch_start, sync)
        losses = orig_train_epoch(args, model, loader, optimizer, epoch_idx, *rest, **kw)
        handle.remove()
        result.update(args=args, model=model, loader=loader, train_data=train_data,
                      losses=losses, encoder=counts)
        raise _StopAfterTraining

    ref_utils.train_epoch = timed_train_epoch
    shims.append("utils.train_epoch wrapped: the reference's train_epoch runs on its DataLoader, truncated "
                 "to warmup+batches and timed per batch; main.py is stopped after it (no validation/test)")

    # ---- run the reference's main.py ------------------------------------------------
    old_cwd, old_argv = os.getcwd(), sys.argv
    os.chdir(run_dir)
    sys.argv = [os.path.join(code_dir, "main.py")] + argv
    t_main = time.perf_counter()
    try:
        runpy.run_path(os.path.join(code_dir, "main.py"), run_name="__main__")
        raise RuntimeError("main.py returned without calling train_epoch")
    except _StopAfterTraining:
        pass
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv

    # ---- report -----------------------------------------------------------------------
    args, model, loader, train_data = result["args"], result["model"], result["loader"], result["train_data"]
    batch = int(args.train_batch_size)
    timed = loader.total_s[a.warmup:]
    fetch = loader.fetch_s[a.warmup:]
    step = [t - f for t, f in zip(timed, fetch)]
    med = statistics.median(timed)
    n_samples = len(train_data.dataset)
    n_batches = len(train_data)
    hp = {k: v for k, v in sorted(vars(args).items()) if _jsonable(v)}
    ds = train_data.dataset
    implicit = {
        "item_substitution_prob (SequenceDataset.mlm_probability)": ds.mlm_probability,
        "user_neighbour_pool (compute_cosine_similarity_batch top_k)": 100,
        "user_neighbours_used (k_num)": int(args.user_sorted_indices.shape[1]),
        "item_neighbours_used (k_num)": int(args.sorted_indices.shape[1]),
        "neighbour_attention_dropout (select_similar_user_probs)": 0.5,
        "semantic_emb_dim": EMB_DIM,
        "shuffle": True, "num_workers": 0,
    }
    enc = result["encoder"]
    rec, icl, ucl = result["losses"]
    n_steps = a.warmup + a.batches
    report = {
        "peer": "SRA-CL reference (github.com/ziqiangcui/SRA-CL, recommender_code/, PyTorch)",
        "reference_commit": commit,
        "reference_files_sha256": src_sha,
        "train_sh_args": sh_args,
        "main_py_argv": argv,
        "hyperparameters": hp,
        "implicit_hyperparameters": implicit,
        "data": {"path": data_path, "sha256": data_sha,
                 "identical_to_mirror_data_Beauty_Beauty_txt": data_is_mirror_beauty,
                 "n_users": manifest["n_users"], "n_items": manifest["n_items"]},
        "standins": {k: v for k, v in manifest.items() if k != "data_sha256"},
        "standin_dir": os.path.join(workdir, "standins"),
        "shims": shims,
        "anomaly_detection_was_on": result["anomaly_detection_was_on"],
        "setup": setup,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "threads": a.threads,
        "device": a.device,
        "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None,
        "torch_num_threads_during_timing": torch.get_num_threads(),
        "setup_threads": a.setup_threads,
        "batch_size": batch,
        "warmup_batches": a.warmup,
        "timed_batches": a.batches,
        "seconds_per_batch_median": med,
        "seconds_per_batch_p10": _pct(timed, 10),
        "seconds_per_batch_p90": _pct(timed, 90),
        "data_seconds_per_batch_median": statistics.median(fetch),
        "step_seconds_per_batch_median": statistics.median(step),
        "train_samples_per_s": batch / med,
        "train_samples_per_epoch": n_samples,
        "batches_per_epoch": n_batches,
        "implied_seconds_per_epoch": med * n_samples / batch,
        "encoder_sequences_per_batch": enc["sequences"],
        "encoder_calls_per_batch": enc["calls"],
        "encoder_sequences_per_sample": enc["sequences"] / batch,
        "model_parameters": int(sum(p.numel() for p in model.parameters())),
        "mean_losses_over_run": {"rec": rec / n_steps, "item_cl": icl / n_steps, "user_cl": ucl / n_steps},
        "all_batch_seconds": loader.total_s,
        "all_batch_data_seconds": loader.fetch_s,
    }
    s = (f"SRA-CL reference: {med:.3f} s/batch of {batch} (p10 {report['seconds_per_batch_p10']:.3f}, "
         f"p90 {report['seconds_per_batch_p90']:.3f}; data {report['data_seconds_per_batch_median']:.3f}), "
         f"{batch / med:.1f} samples/s, {n_samples} samples/epoch -> {report['implied_seconds_per_epoch']:.0f} s/epoch; "
         f"{a.threads} thread(s), torch {torch.__version__}; "
         f"{enc['sequences'] / batch:g} encoder sequences per sample")
    print(s, flush=True)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
