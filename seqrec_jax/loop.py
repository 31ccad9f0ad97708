"""`train_and_evaluate(config, workdir)`: the sharded train / early-stop / test loop.

The launcher (`launch/train.py`) only parses flags and calls this; tests call it directly.

Resumption is exact: the checkpoint holds the train state (whose rng and step fix every dropout
mask), the data iterator's position and the early-stopping bookkeeping, so a run stopped at step N
and relaunched with the same command ends with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
from absl import logging

from seqrec_jax import checkpointing
from seqrec_jax import config_diff
from seqrec_jax import data as data_lib
from seqrec_jax import fileio
from seqrec_jax import metrics as metrics_lib
from seqrec_jax import models
from seqrec_jax import optim
from seqrec_jax import paired
from seqrec_jax import sharding
from seqrec_jax import tasks as tasks_lib
from seqrec_jax import train_state as ts
from seqrec_jax.config_check import validate_config
from seqrec_jax.writers import MetricWriter

RESULTS_FILE = "results.json"
RANKS_FILE = paired.RANKS_FILE  # per-user target ranks of the final evaluation


def load_split(config: ml_collections.ConfigDict) -> data_lib.LeaveOneOutSplit:
  """Reads the dataset named by `config.data` and splits it leave-one-out."""
  d = config.data
  kwargs = {}
  if d.format == "amazon":
    kwargs = dict(reviews_path=d.path, meta_path=d.get("meta_path", None) or None,
                  k_core=d.get("k_core", 5))
  dataset = data_lib.load_dataset(d.format, d.path, name=d.get("name", ""), **kwargs)
  logging.info("dataset %s", dataset.summary())
  return data_lib.leave_one_out(dataset, short_users=d.short_users)


@dataclasses.dataclass
class Evaluator:
  """Full-ranking evaluation of one split stage over all evaluated users, sharded."""
  split: Any
  partitioner: sharding.Partitioner
  step_fn: Any
  max_len: int
  batch_size: int
  ks: tuple
  history_len: int
  backbone: Any = staticmethod(lambda params: params)
  rank_fn: Any = None  # `step_fn` that also returns each row's rank (`eval_step(with_ranks=True)`)

  def _outputs(self, params: Any, stage: str, step_fn):
    """`step_fn`'s output for each global batch of `stage`, in order."""
    params = self.backbone(params)
    for host_batch in data_lib.eval_batches(self.split, stage, self.max_len, self.batch_size,
                                            history_len=self.history_len):
      yield step_fn(params, self.partitioner.shard_inputs(host_batch))

  def __call__(self, params: Any, stage: str) -> Dict[str, float]:
    """Metrics of `stage` ("valid" or "test") for the task's full parameters `params`."""
    total = None
    for sums in self._outputs(params, stage, self.step_fn):
      total = metrics_lib.accumulate(total, sums)
    return metrics_lib.normalise(jax.device_get(total), self.ks)

  def with_ranks(self, params: Any, stage: str):
    """(metrics, {"ranks": [n_eval], "targets": [n_eval]}) of `stage` in one pass; row i is
    `split.eval_users[i]` (every process gets all rows)."""
    if self.rank_fn is None:
      raise ValueError("this evaluator has no rank step")
    total, rows = None, []
    for sums, per_row in self._outputs(params, stage, self.rank_fn):
      total = metrics_lib.accumulate(total, sums)
      rows.append(per_row)
    rows = jax.device_get(rows)
    n = len(self.split.eval_users)  # the padding rows of the last batch come last
    return metrics_lib.normalise(jax.device_get(total), self.ks), {
        k: np.concatenate([r[k] for r in rows])[:n].astype(np.int32) for k in ("ranks", "targets")}


def _num_steps(config, steps_per_epoch: int) -> int:
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  return int(config.train.num_epochs) * steps_per_epoch


@dataclasses.dataclass
class Experiment:
  """Everything built from a config before the first step (shared by the loop and benchmarks)."""
  config: ml_collections.ConfigDict
  split: Any
  partitioner: sharding.Partitioner
  model: Any
  task: Any
  consts: Any
  tx: Any
  state: Any
  state_shardings: Any
  train_step: Any
  evaluate: Evaluator
  iterator: Any
  steps_per_epoch: int
  num_steps: int
  n_params: int
  final_evaluate: Any = None  # the final valid/test evaluation; default: `evaluate`
  summary: str = ""  # the data, for results.json; default: the split's dataset summary


# Tasks whose experiments are not item-id encoders build their own (same Experiment fields).
_EXPERIMENT_BUILDERS = {"calrec": "calrec_jax.experiment"}


def make_experiment(config: ml_collections.ConfigDict, workdir: str = "") -> Experiment:
  """`build_experiment`, or the task's own builder (e.g. CALRec's text pipeline)."""
  module = _EXPERIMENT_BUILDERS.get(config.task.name)
  if module is None:
    return build_experiment(config, workdir=workdir)
  import importlib  # pylint: disable=g-import-not-at-top
  validate_config(config)
  return importlib.import_module(module).build_experiment(config, workdir=workdir)


def build_experiment(config: ml_collections.ConfigDict, split=None, workdir: str = "") -> Experiment:
  """Reads data, builds the mesh, model, optimizer, sharded state and jitted steps.

  Args:
    config: the experiment config (validated here).
    split: an already-loaded LeaveOneOutSplit (benchmarks reuse one); default: from config.data.

  Returns:
    An Experiment; its state is freshly initialised (the loop may then restore a checkpoint).
  """
  validate_config(config)
  split = split if split is not None else load_split(config)
  dataset = split.dataset
  max_len = config.data.max_len
  partitioner = sharding.partitioner_from_config(config.mesh)
  logging.info("mesh %s over %d devices in %d processes", dict(partitioner.mesh.shape),
               partitioner.mesh.size, jax.process_count())
  _check_batch(config.train.batch_size, partitioner, "config.train.batch_size")
  _check_batch(config.eval.batch_size, partitioner, "config.eval.batch_size")

  model, _ = models.build_model(config.model, n_items=dataset.n_items, max_len=max_len)
  task = tasks_lib.make_task(config, split, model, workdir=workdir)
  iterator = data_lib.TrainIterator(split, max_len, config.train.batch_size, seed=config.seed)
  steps_per_epoch = iterator.steps_per_epoch
  num_steps = _num_steps(config, steps_per_epoch)
  tx = optim.make_optimizer(config.optim, num_steps)
  state, state_shardings = partitioner.partition_init(
      functools.partial(ts.init_state, task=task, tx=tx), jax.random.key(config.seed))
  consts_shardings = {k: nn.logical_to_mesh_sharding(P(*task.consts_axes[k]), partitioner.mesh,
                                                     partitioner.rules)
                      for k in task.consts}
  consts = {k: jax.device_put(v, consts_shardings[k]) for k, v in task.consts.items()}
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info("model %s: %s parameters; %d training examples, %d steps/epoch, %d steps planned",
               config.model.name, f"{n_params:,}", len(split.train_targets), steps_per_epoch,
               num_steps)
  step_fn = partitioner.partition_step(
      functools.partial(ts.train_step, task=task, tx=tx),
      in_shardings=(state_shardings, {k: partitioner.batch_sharding(n)
                                      for k, n in task.train_fields.items()}, consts_shardings),
      out_shardings=(state_shardings, partitioner.replicated),
      donate_argnums=(0,))

  def train_step(state, host_batch):
    """host rows -> task fields -> global arrays -> one sharded step."""
    batch = partitioner.shard_inputs(task.host_batch(host_batch))
    return step_fn(state, batch, consts)

  train_step.jitted = step_fn.jitted
  train_step.device_batch = lambda host_batch: partitioner.shard_inputs(task.host_batch(host_batch))
  train_step.consts = consts
  history_len = int(dataset.lengths.max()) if config.eval.exclude_seen else 0
  eval_spec = {"inputs": 2, "targets": 1, "users": 1, "weights": 1}
  if history_len:
    eval_spec["history"] = 2
  def partitioned_eval_step(with_ranks):
    return partitioner.partition_step(
        functools.partial(ts.eval_step, model=model, ks=tuple(config.eval.ks),
                          exclude_seen=bool(config.eval.exclude_seen),
                          blocked_chunk=(task.softmax.chunk_size
                                         if getattr(task, "softmax", None) is not None
                                         and task.softmax.kind != "full" else None),
                          with_ranks=with_ranks),
        in_shardings=(task.backbone_params(state_shardings.params),
                      {k: partitioner.batch_sharding(n) for k, n in eval_spec.items()}),
        out_shardings=partitioner.replicated)

  evaluate = Evaluator(split, partitioner, partitioned_eval_step(False), max_len,
                       config.eval.batch_size, tuple(config.eval.ks), history_len,
                       task.backbone_params, rank_fn=partitioned_eval_step(True))
  return Experiment(config, split, partitioner, model, task, consts, tx, state, state_shardings,
                    train_step, evaluate, iterator, steps_per_epoch, num_steps, n_params)


def final_metrics(exp: Experiment, params, *,
                  ranks_path: Optional[str] = None) -> Dict[str, Dict[str, float]]:
  """{"valid": ..., "test": ...} metrics of `params` by `exp.final_evaluate` (default:
  `exp.evaluate`), as results.json and `evaluate_workdir` report them.

  With `ranks_path`, where the experiment ranks every item (not CALRec's generate-and-retrieve
  evaluation), each evaluated user's 0-based target rank on both stages is written there too
  (`RANKS_FILE`: users, valid_/test_targets, valid_/test_ranks), from the same pass as the
  metrics, for per-user paired comparisons of runs (`launch/compare_runs.py`).
  """
  stages = ("valid", "test")
  if exp.final_evaluate is not None or ranks_path is None or exp.evaluate.rank_fn is None:
    final_evaluate = exp.final_evaluate or exp.evaluate
    return {stage: final_evaluate(params, stage) for stage in stages}
  out, arrays = {}, {"users": np.asarray(exp.split.eval_users, np.int32)}
  for stage in stages:
    out[stage], rows = exp.evaluate.with_ranks(params, stage)
    arrays.update({f"{stage}_{k}": v for k, v in rows.items()})
  if jax.process_index() == 0:
    fileio.atomic_write(ranks_path, lambda f: np.savez_compressed(f, **arrays))
  return out


def _check_resumed_config(config: ml_collections.ConfigDict, workdir: str, is_main: bool) -> None:
  """Before a run resumes from its checkpoints: its config.json against `config` (see
  `config_diff`). Raises ValueError naming each changed key unless on_config_change='allow'."""
  path = os.path.join(workdir, "config.json")
  step = checkpointing.latest_step_on_disk(workdir)
  if step is None or not os.path.isfile(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
  except (OSError, ValueError) as e:
    logging.warning("%s is unreadable (%s): the config of the checkpoints in %s cannot be "
                    "checked against this one", path, e, workdir)
    return
  changed, free, added = config_diff.resume_changes(old, config_diff.as_json(config))
  if free:
    logging.info("resuming %s with other settings that do not change results: %s", workdir,
                 config_diff.describe(free))
  if added:
    logging.info("config keys new since %s started, at their current values: %s", workdir,
                 ", ".join(added))
  if not changed:
    return
  msg = (f"{workdir} holds checkpoints (step {step}) of a run whose config.json differs from "
         f"this config in {len(changed)} key(s) that change results: "
         f"{config_diff.describe(changed)}")
  if config.train.get("on_config_change", "error") != "allow":
    raise ValueError(msg + ". Relaunch with the run's own settings, use a new workdir, or set "
                     "config.train.on_config_change='allow' to go on with the new values (they "
                     f"are then recorded in {config_diff.CHANGES_FILE}).")
  logging.warning("%s; going on with the new values (on_config_change='allow')", msg)
  if is_main:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "resumed_step": step,
              "changes": [{"key": k, "old": a, "new": b} for k, a, b in changed]}
    with open(os.path.join(workdir, config_diff.CHANGES_FILE), "a", encoding="utf-8") as f:
      f.write(json.dumps(record, default=str) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains with early stopping on validation, then tests the best checkpoint.

  Args:
    config: the experiment ConfigDict (see configs/sasrec/*.py for every field).
    workdir: output directory; relaunching with the same workdir resumes.

  Returns:
    The results dict also written to `workdir/results.json`:
    {"valid": {...}, "test": {...}, "best_step": n, "train_seconds": s, ...}.
  """
  validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  _check_resumed_config(config, workdir, is_main)
  if is_main:
    fileio.atomic_write(os.path.join(workdir, "config.json"),
                        lambda f: f.write(config.to_json_best_effort(indent=2)), mode="w")

  exp = make_experiment(config, workdir=workdir)
  split, partitioner, state, iterator = exp.split, exp.partitioner, exp.state, exp.iterator
  dataset = split.dataset
  train_step, evaluate = exp.train_step, exp.evaluate
  steps_per_epoch, num_steps, n_params = exp.steps_per_epoch, exp.num_steps, exp.n_params
  eval_every = config.train.eval_every_steps or steps_per_epoch
  ckpt_every = config.checkpoint.every_steps or eval_every

  # Closed in reverse order on every exit (results, a stop, or an error): progress bar, signal
  # handlers, metric writer, then checkpoints, which waits for an async save in flight.
  with contextlib.ExitStack() as cleanup:
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                      async_save=config.checkpoint.async_save)
    cleanup.callback(ckpt.close)  # waits for a pending async save, also when an error ends the run
    loop = {"best_metric": None, "best_step": -1, "bad_evals": 0, "finished": False,
            "train_seconds": 0.0, "iterator": iterator.get_state()}
    start = ckpt.latest_step()
    if start is not None:
      state, loop = ckpt.restore(start, state)
      iterator.set_state(loop["iterator"])
      logging.info("resumed from step %d (%s)", start, json.dumps(
          {k: v for k, v in loop.items() if k != "iterator"}))
    step = int(jax.device_get(state.step))
    writer = MetricWriter(workdir, enabled=is_main, resume_step=step)
    cleanup.callback(writer.close)

    metric_name = config.train.early_stop_metric
    lower_is_better = config.train.get("early_stop_mode", "max") == "min"
    stop_at = config.train.stop_at_step
    preemption = PreemptionWatch()
    cleanup.callback(preemption.restore)
    t_start = time.perf_counter() - loop["train_seconds"]
    pending = []  # device-side train metrics since the last log
    progress = _progress(num_steps, step, enabled=is_main and config.train.progress)
    cleanup.callback(progress.close)
    in_flight = config.train.get("steps_in_flight", 0)
    while not loop["finished"] and step < num_steps:
      state, train_metrics = train_step(state, next(iterator))
      step += 1
      pending.append(train_metrics)
      if in_flight and len(pending) > in_flight:  # the step `in_flight` back has finished
        jax.block_until_ready(pending[-1 - in_flight]["loss_sum"])
      progress.update(1)
      if step % config.train.log_every_steps == 0 or step % eval_every == 0 or step == num_steps:
        summary = _summarise(pending)
        pending = []
        if not math.isfinite(summary["loss"]):
          raise FloatingPointError(f"non-finite training loss {summary['loss']} at step {step}; "
                                   "lower config.optim.lr or set config.optim.grad_clip")
        progress.set_postfix(loss=f"{summary['loss']:.4f}", epoch=iterator.epoch)
        writer.write(step, "train", summary)
      if step % eval_every == 0 or step == num_steps:
        valid = evaluate(state.params, "valid")
        writer.write(step, "valid", valid)
        value = valid[metric_name]
        if loop["best_metric"] is None or _improves(value, loop["best_metric"], lower_is_better):
          loop.update(best_metric=value, best_step=step, bad_evals=0)
          ckpt.save_best(step, state.params, {"step": step, "valid": valid})
        else:
          loop["bad_evals"] += 1
        logging.info("step %d epoch %d valid %s=%.5f (best %.5f at %d, %d/%d bad evals)", step,
                     iterator.epoch, metric_name, value, loop["best_metric"], loop["best_step"],
                     loop["bad_evals"], config.train.patience)
        if config.train.patience > 0 and loop["bad_evals"] >= config.train.patience:
          logging.info("early stop at step %d: no %s gain for %d evaluations", step, metric_name,
                       loop["bad_evals"])
          loop["finished"] = True
      if step == num_steps:
        loop["finished"] = True
      preempted = preemption.should_stop(step, every=config.train.log_every_steps)
      if loop["finished"] or step % ckpt_every == 0 or step == stop_at or preempted:
        loop["train_seconds"] = time.perf_counter() - t_start
        loop["iterator"] = iterator.get_state()
        ckpt.save(step, state, loop)
      if step == stop_at or preempted:
        why = "a termination signal" if preempted else "config.train.stop_at_step"
        logging.info("stopping at step %d (%s); relaunch the same command to resume", step, why)
        ckpt.wait()  # the save above completes while our signal handlers are still installed
        return {"stopped_at_step": step}
    progress.close()
    ckpt.wait()

    # Test at the best validation checkpoint. Training is finished and checkpointed, so a
    # termination signal from here on abandons the evaluation (a relaunch redoes only it) instead
    # of killing the process mid-way or making it evaluate for minutes past its notice.
    params, best_meta = ckpt.restore_best(state.params)
    try:
      preemption.interrupt_from_now()
      evaluated = final_metrics(exp, params, ranks_path=os.path.join(workdir, RANKS_FILE))
    except Preempted:
      logging.info("stopped during the final evaluation (a termination signal); training is "
                   "finished and checkpointed at step %d: relaunch the same command to evaluate",
                   step)
      return {"stopped_at_step": step}
    finally:
      preemption.restore()  # the default handlers again while `cleanup` waits for saves
    results = {
        "valid": evaluated["valid"],
        "test": evaluated["test"],
        "best_step": int(best_meta["step"]),
        "train_seconds": float(loop["train_seconds"]),
        "steps": step,
        "epochs": step / steps_per_epoch,
        "dataset": exp.summary or dataset.summary(),
        "n_params": n_params,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }
    writer.write(results["best_step"], "test", results["test"])
    if is_main:
      fileio.atomic_write(os.path.join(workdir, RESULTS_FILE),
                          lambda f: json.dump(results, f, indent=2), mode="w")
      shown = ", ".join(f"{k} {results['test'][k]:.4f}" for k in ("NDCG@10", "HR@10", "Recall@10")
                        if k in results["test"])
      logging.info("results written to %s (test %s at step %d)",
                   os.path.join(workdir, RESULTS_FILE), shown or "-", results["best_step"])
    return results


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (<workdir>/config.json)."""
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a workdir written by launch/train.py?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  try:
    validate_config(config)
  except (KeyError, ValueError) as e:
    raise ValueError(f"{path} does not fit this version of seqrec_jax (written by another version?):"
                     f" {e}") from e
  return config


def evaluate_workdir(workdir: str, *, exclude_seen: bool = False,
                     write_ranks: bool = False) -> Dict[str, Any]:
  """Valid and test metrics of a workdir's best checkpoint.

  Args:
    workdir: a workdir written by `train_and_evaluate`.
    exclude_seen: rank with history items removed (off in both papers' protocol).
    write_ranks: also (re)write `<workdir>/eval_ranks.npz`, each user's target ranks, as a
      finished run writes them (for runs finished before runs wrote it). Refused with
      `exclude_seen`, whose ranks are not the run's protocol.

  Returns:
    {"valid": {...}, "test": {...}, "best_step": n}.
  """
  if write_ranks and exclude_seen:
    raise ValueError("write_ranks with exclude_seen would overwrite the run's ranks with another "
                     "protocol's; pass one of them")
  config = load_workdir_config(workdir)
  config.eval.exclude_seen = bool(exclude_seen)
  exp_dir = os.path.abspath(os.path.expanduser(workdir))
  exp = make_experiment(config, workdir=exp_dir)
  ckpt = checkpointing.Checkpointer(exp_dir, max_to_keep=config.checkpoint.max_to_keep,
                                    async_save=False)
  try:
    params, meta = ckpt.restore_best(exp.state.params)
  finally:
    ckpt.close()
  ranks_path = os.path.join(exp_dir, RANKS_FILE) if write_ranks else None
  return dict(final_metrics(exp, params, ranks_path=ranks_path), best_step=int(meta["step"]))


class Preempted(Exception):
  """A termination signal arrived while `PreemptionWatch.interrupt_from_now` was in force."""


class PreemptionWatch:
  """Turns SIGTERM / SIGINT into "finish this step, checkpoint, exit cleanly".

  In a multi-process run the processes agree on the stop step: the local flags are combined
  with an all-gather at every `every`-th step (a signal usually reaches every process of a job).
  After `interrupt_from_now()` (once nothing is left to checkpoint) a signal raises `Preempted`
  at the next Python instruction instead, once; a signal already received raises at once.
  """

  def __init__(self):
    self._signalled = False
    self._interrupt = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    first = not self._signalled
    self._signalled = True
    if self._interrupt:
      if first:
        logging.warning("received signal %d: abandoning the final evaluation", signum)
        raise Preempted(f"signal {signum}")
      return
    logging.warning("received signal %d: will checkpoint after the current step and exit", signum)

  def interrupt_from_now(self) -> None:
    self._interrupt = True
    if self._signalled:
      logging.warning("a termination signal arrived before the final evaluation: skipping it")
      raise Preempted("signalled before the final evaluation")

  def should_stop(self, step: int, every: int) -> bool:
    if jax.process_count() == 1:
      return self._signalled
    if step % max(1, every):
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags_all = multihost_utils.process_allgather(np.asarray(self._signalled))
    return bool(np.any(flags_all))

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def _improves(value: float, best: float, lower_is_better: bool) -> bool:
  """Whether a validation value beats the best so far (a loss improves downwards)."""
  return value < best if lower_is_better else value > best


def _check_batch(batch_size: int, partitioner: sharding.Partitioner, key: str) -> None:
  shards = partitioner.batch_size_multiple
  procs = jax.process_count()
  if batch_size % shards or batch_size % procs:
    raise ValueError(f"{key}={batch_size} must be divisible by the {shards} batch shards of mesh "
                     f"{dict(partitioner.mesh.shape)} and by the {procs} processes")


def _summarise(pending) -> Dict[str, float]:
  """Host-side means of the train metrics since the last log (loss weighted by rows)."""
  got = jax.device_get(pending)
  loss_sum = sum(float(m["loss_sum"]) for m in got)
  weight_sum = sum(float(m["weight_sum"]) for m in got)
  out = {"loss": loss_sum / max(weight_sum, 1.0)}
  for key in got[0]:
    if key not in ("loss_sum", "weight_sum"):
      out[key] = float(np.mean([float(m[key]) for m in got]))
  return out


class _NoProgress:
  def update(self, n):
    pass

  def set_postfix(self, **kw):
    pass

  def close(self):
    pass


def _progress(total: int, initial: int, enabled: bool):
  if not enabled:
    return _NoProgress()
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def format_results(results: Dict[str, Any], ks=metrics_lib.DEFAULT_KS) -> str:
  """A fixed-width table of valid/test metrics.

  HR, NDCG and MRR at every K as columns for the item-id models; one row per metric for tasks
  with other metric names (CALRec's Recall@K of several rankings).
  """
  keys = metrics_lib.metric_keys(ks)
  if all(k in results["test"] for k in keys):
    lines = ["split  " + " ".join(f"{k:>8s}" for k in keys)]
    for stage in ("valid", "test"):
      lines.append(f"{stage:6s} " + " ".join(f"{results[stage][k]:8.4f}" for k in keys))
  else:
    width = max(len(k) for k in results["test"])
    lines = [f"{'metric':{width}s}    valid     test"]
    for k, v in results["test"].items():
      lines.append(f"{k:{width}s} {results['valid'].get(k, float('nan')):8.4f} {v:8.4f}")
  tail = f"best step {results['best_step']}"
  if "train_seconds" in results:  # a training run's results (not evaluate_workdir's)
    tail += f", train {results['train_seconds']:.1f} s"
  lines.append(tail)
  return "\n".join(lines)
