"""The train loop end to end on a small synthetic dataset: results contract, exact resume,
restore onto another mesh, and sharded == single-device steps."""

import functools
import json
import os

import jax
import numpy as np
import pytest

from seqrec_jax import loop
from seqrec_jax import metrics as metrics_lib
from seqrec_jax import models, optim, sharding, tasks
from seqrec_jax import train_state as ts
from seqrec_jax.default_config import base_config


def _write_pairs(path, n_users=160, n_items=40, seed=0):
  """Users walk the item ring with small random jumps, so the next item is learnable."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for u in range(1, n_users + 1):
      item = int(rng.integers(1, n_items + 1))
      for _ in range(int(rng.integers(4, 12))):
        f.write(f"{u} {item}\n")
        item = (item + int(rng.integers(1, 3)) - 1) % n_items + 1
  return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
  return _write_pairs(str(tmp_path_factory.mktemp("data") / "toy.txt"))


def small_config(path, **mesh_shape):
  c = base_config()
  c.data.format = "pairs"
  c.data.path = path
  c.data.max_len = 8
  c.model.hidden = 16
  c.model.n_heads = 2
  c.model.inner = 32
  c.model.n_layers = 1
  c.model.dropout = 0.2
  c.model.attn_dropout = 0.2
  c.model.vocab_pad_multiple = 8
  c.train.batch_size = 32
  c.train.num_steps = 40
  c.train.eval_every_steps = 10
  c.train.log_every_steps = 5
  c.train.patience = 0
  c.train.progress = False
  c.eval.batch_size = 64
  c.checkpoint.async_save = False
  if mesh_shape:
    c.mesh.shape = mesh_shape
  return c


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_results_contract_and_learning(pairs_file, tmp_path):
  c = small_config(pairs_file)
  c.train.num_steps = 120
  results = loop.train_and_evaluate(c, str(tmp_path))
  with open(tmp_path / "results.json") as f:
    on_disk = json.load(f)
  assert set(on_disk) >= {"valid", "test", "best_step", "train_seconds"}
  for stage in ("valid", "test"):
    assert set(on_disk[stage]) == set(metrics_lib.metric_keys())
  assert on_disk["test"] == results["test"]
  # The ring structure is learnable: far above the chance HR@10 of 10/40.
  assert results["test"]["HR@10"] > 0.5
  rows = _read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows if r["split"] == "valid"] == list(range(10, 121, 10))
  assert os.listdir(tmp_path / "tensorboard")
  best = max((r for r in rows if r["split"] == "valid"), key=lambda r: r["NDCG@10"])
  assert results["best_step"] == best["step"]


def test_resume_is_exact(pairs_file, tmp_path):
  """Stopped at step 25 (between evaluations) and relaunched == uninterrupted."""
  straight = loop.train_and_evaluate(small_config(pairs_file), str(tmp_path / "a"))
  c = small_config(pairs_file)
  c.train.stop_at_step = 25
  first = loop.train_and_evaluate(c, str(tmp_path / "b"))
  assert first == {"stopped_at_step": 25}
  assert not os.path.exists(tmp_path / "b" / "results.json")
  resumed = loop.train_and_evaluate(small_config(pairs_file), str(tmp_path / "b"))
  assert resumed["test"] == straight["test"]
  assert resumed["valid"] == straight["valid"]
  assert resumed["best_step"] == straight["best_step"]
  rows_a = [r for r in _read_jsonl(tmp_path / "a" / "metrics.jsonl") if r["split"] == "valid"]
  rows_b = [r for r in _read_jsonl(tmp_path / "b" / "metrics.jsonl") if r["split"] == "valid"]
  assert rows_a == rows_b


def test_resume_with_a_changed_config_is_refused_or_recorded(pairs_file, tmp_path):
  """A relaunch must not silently mix two protocols in one run: changed result-affecting keys
  stop it (the checkpoints and config.json stay as they were), free keys do not, and 'allow'
  goes on and records the change."""
  c = small_config(pairs_file)
  c.train.stop_at_step = 20
  wd = str(tmp_path / "run")
  assert loop.train_and_evaluate(c, wd) == {"stopped_at_step": 20}
  saved = open(os.path.join(wd, "config.json")).read()
  changed = small_config(pairs_file)
  changed.model.dropout = 0.3
  changed.optim.lr = 2e-3
  with pytest.raises(ValueError) as err:
    loop.train_and_evaluate(changed, wd)
  msg = str(err.value)
  assert "step 20" in msg and "2 key(s)" in msg and "on_config_change" in msg
  assert "model.dropout: 0.2 -> 0.3" in msg and "optim.lr: 0.001 -> 0.002" in msg
  assert open(os.path.join(wd, "config.json")).read() == saved
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["10", "20"]
  # Settings that do not change results may differ; a key the old config lacked is taken at
  # its current value (here: the old config.json is edited to predate train.patience).
  old = json.loads(saved)
  del old["train"]["patience"]
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump(old, f)
  free = small_config(pairs_file)
  free.eval.batch_size = 32
  free.train.log_every_steps = 10
  free.checkpoint.max_to_keep = 3
  free.train.stop_at_step = 30
  assert loop.train_and_evaluate(free, wd) == {"stopped_at_step": 30}
  assert not os.path.exists(os.path.join(wd, "config_changes.jsonl"))
  # 'allow' goes on with the new values and records them.
  changed.train.on_config_change = "allow"
  results = loop.train_and_evaluate(changed, wd)
  assert results["steps"] == 40
  with open(os.path.join(wd, "config_changes.jsonl")) as f:
    (record,) = [json.loads(line) for line in f]
  assert record["resumed_step"] == 30
  assert {(r["key"], r["old"], r["new"]) for r in record["changes"]} == {
      ("model.dropout", 0.2, 0.3), ("optim.lr", 0.001, 0.002)}
  assert json.load(open(os.path.join(wd, "config.json")))["optim"]["lr"] == 0.002
  # A fresh workdir, or one without checkpoints, is never checked.
  changed.train.on_config_change = "error"
  changed.train.num_steps = 10
  loop.train_and_evaluate(changed, str(tmp_path / "fresh"))
  bad = small_config(pairs_file)
  bad.train.on_config_change = "maybe"
  with pytest.raises(ValueError, match="on_config_change='maybe'"):
    loop.train_and_evaluate(bad, str(tmp_path / "bad"))


def test_config_diff_keys():
  from seqrec_jax import config_diff
  old = {"a": {"b": 1, "c": [1, 2]}, "data": {"path": "x"}, "mesh": {"shape": {"data": 8}},
         "gone": 3}
  new = {"a": {"b": 1, "c": [1, 3], "d": 0}, "data": {"path": "y"}, "mesh": {"shape": {"data": 2}}}
  changed, free, added = config_diff.resume_changes(old, new)
  assert changed == [("a.c", [1, 2], [1, 3]), ("gone", 3, "<removed>")]
  assert free == [("data.path", "x", "y"), ("mesh.shape.data", 8, 2)]
  assert added == ["a.d"]
  assert config_diff.flatten({"x": {}, "y": {"z": {"w": 1}}}) == {"x": {}, "y.z.w": 1}


def test_finished_run_relaunch_does_not_retrain(pairs_file, tmp_path):
  c = small_config(pairs_file)
  c.train.num_steps = 20
  first = loop.train_and_evaluate(c, str(tmp_path))
  again = loop.train_and_evaluate(c, str(tmp_path))
  assert again["test"] == first["test"] and again["steps"] == 20


def test_restore_onto_a_different_mesh(pairs_file, tmp_path):
  """A checkpoint written on data=8 resumes on data=2 x fsdp=2 x tensor=2."""
  straight = loop.train_and_evaluate(small_config(pairs_file, data=8), str(tmp_path / "a"))
  c = small_config(pairs_file, data=8)
  c.train.stop_at_step = 20
  loop.train_and_evaluate(c, str(tmp_path / "b"))
  resumed = loop.train_and_evaluate(small_config(pairs_file, data=2, fsdp=2, tensor=2),
                                    str(tmp_path / "b"))
  for k, v in straight["test"].items():
    assert resumed["test"][k] == pytest.approx(v, abs=0.02), k


def _one_config_state(mesh_shape, num_devices, n_items=40):
  c = small_config("unused")
  c.mesh.shape = mesh_shape
  c.mesh.num_devices = num_devices
  p = sharding.partitioner_from_config(c.mesh)
  model, _ = models.build_model(c.model, n_items=n_items, max_len=8)
  task = tasks.make_task(c, None, model)
  tx = optim.make_optimizer(c.optim, 10)
  state, sh = p.partition_init(functools.partial(ts.init_state, task=task, tx=tx),
                               jax.random.key(0))
  step = p.partition_step(functools.partial(ts.train_step, task=task, tx=tx),
                          in_shardings=(sh, {k: p.batch_sharding(n)
                                             for k, n in task.train_fields.items()}, {}),
                          out_shardings=(sh, p.replicated), donate_argnums=(0,))
  return p, state, lambda s_, b_: step(s_, b_, {})


def _batch(seed, n_items=40):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, n_items + 1, size=(32, 8)).astype(np.int32)
  inputs[:8, :3] = 0  # some left padding
  return {"inputs": inputs, "targets": rng.integers(1, n_items + 1, 32).astype(np.int32),
          "target_seq": np.concatenate([inputs[:, 1:], rng.integers(1, n_items + 1, (32, 1))],
                                       axis=1).astype(np.int32),
          "users": np.arange(32, dtype=np.int32), "examples": np.arange(32, dtype=np.int32),
          "weights": (np.arange(32) < 30).astype(np.float32)}


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2},
                                        {"data": 1, "fsdp": 4, "tensor": 2}])
def test_sharded_step_equals_single_device(mesh_shape):
  p1, s1, step1 = _one_config_state({"data": 1}, 1)
  p8, s8, step8 = _one_config_state(mesh_shape, 8)
  for i in range(3):
    s1, m1 = step1(s1, p1.shard_inputs(_batch(i)))
    s8, m8 = step8(s8, p8.shard_inputs(_batch(i)))
    assert float(m8["loss_sum"]) == pytest.approx(float(m1["loss_sum"]), rel=1e-5)
  flat1 = jax.tree.leaves(jax.device_get(s1.params))
  flat8 = jax.tree.leaves(jax.device_get(s8.params))
  for a, b in zip(flat1, flat8):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_parameters_are_sharded_as_the_rules_say():
  p, state, _ = _one_config_state({"data": 2, "fsdp": 2, "tensor": 2}, 8)
  P = jax.sharding.PartitionSpec
  params = state.params
  assert params["item_embedding"]["embedding"].sharding.spec == P("tensor", "fsdp")
  ffn_in = params["block_0"]["ffn_in"]["kernel"]
  assert ffn_in.sharding.spec == P("fsdp", "tensor")
  # Each device holds a 1/4 slice of the ffn kernel (fsdp x tensor), replicated over data.
  shard_shapes = {s.data.shape for s in ffn_in.addressable_shards}
  assert shard_shapes == {(ffn_in.shape[0] // 2, ffn_in.shape[1] // 2)}
  assert params["block_0"]["attention"]["query_kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert state.step.sharding.spec == P()


def test_bad_batch_size_names_the_numbers(pairs_file, tmp_path):
  c = small_config(pairs_file)
  c.train.batch_size = 30
  with pytest.raises(ValueError, match=r"config.train.batch_size=30 .* 8 batch shards"):
    loop.train_and_evaluate(c, str(tmp_path))


def test_resume_after_dying_between_best_and_periodic_save(pairs_file, tmp_path):
  """Best saved at step 20 but the periodic checkpoint of step 20 lost: resume from step 10."""
  import shutil  # pylint: disable=g-import-not-at-top
  straight = loop.train_and_evaluate(small_config(pairs_file), str(tmp_path / "a"))
  c = small_config(pairs_file)
  c.train.stop_at_step = 20
  loop.train_and_evaluate(c, str(tmp_path / "b"))
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "20")
  resumed = loop.train_and_evaluate(small_config(pairs_file), str(tmp_path / "b"))
  assert resumed["test"] == straight["test"]


def test_evaluate_workdir_reproduces_results(pairs_file, tmp_path, monkeypatch):
  c = small_config(pairs_file)
  c.train.num_steps = 20
  results = loop.train_and_evaluate(c, str(tmp_path))
  monkeypatch.setenv("HOME", str(tmp_path.parent))
  again = loop.evaluate_workdir("~/" + tmp_path.name)  # a workdir given with ~
  assert again["test"] == results["test"] and again["best_step"] == results["best_step"]
  # The finished run wrote every evaluated user's target rank; the metrics follow from them.
  with np.load(tmp_path / loop.RANKS_FILE) as f:
    written = {k: f[k] for k in f.files}
  split = loop.make_experiment(c, workdir=str(tmp_path)).split
  np.testing.assert_array_equal(written["users"], split.eval_users)
  items, offsets = split.dataset.items, split.dataset.offsets
  for stage, gap in (("valid", 2), ("test", 1)):
    np.testing.assert_array_equal(written[f"{stage}_targets"],
                                  items[offsets[split.eval_users + 1] - gap])
    ranks = written[f"{stage}_ranks"]
    assert ranks.min() >= 0 and ranks.max() < split.dataset.n_items
    for key, value in results[stage].items():
      np.testing.assert_allclose(metrics_lib.per_row(ranks, key).mean(), value, rtol=1e-5,
                                 err_msg=f"{stage} {key}")
  os.remove(tmp_path / loop.RANKS_FILE)
  loop.evaluate_workdir(str(tmp_path), write_ranks=True)  # for runs finished before the file
  with np.load(tmp_path / loop.RANKS_FILE) as f:
    for k, v in written.items():
      np.testing.assert_array_equal(f[k], v)
  with pytest.raises(ValueError, match="exclude_seen"):
    loop.evaluate_workdir(str(tmp_path), exclude_seen=True, write_ranks=True)
  excluded = loop.evaluate_workdir(str(tmp_path), exclude_seen=True)
  # Removing history items can only move targets up.
  assert excluded["test"]["HR@10"] >= results["test"]["HR@10"]
  with pytest.raises(FileNotFoundError, match="config.json"):
    loop.evaluate_workdir(str(tmp_path / "nothing"))


def test_early_stop_mode():
  from seqrec_jax.config_check import validate_config  # pylint: disable=g-import-not-at-top
  assert loop._improves(0.5, 0.4, lower_is_better=False)  # pylint: disable=protected-access
  assert not loop._improves(0.5, 0.4, lower_is_better=True)  # pylint: disable=protected-access
  assert loop._improves(0.3, 0.4, lower_is_better=True)  # pylint: disable=protected-access
  from configs.sasrec import ml100k  # pylint: disable=g-import-not-at-top
  c = ml100k.get_config("tiny")
  c.train.early_stop_mode = "median"
  with pytest.raises(ValueError, match="early_stop_mode"):
    validate_config(c)


def test_signal_during_final_evaluation_stops_cleanly_and_resumes(pairs_file, tmp_path,
                                                                   monkeypatch):
  """SIGTERM while the best checkpoint is being tested: no results.json, no kill, checkpoints
  kept; the relaunch only evaluates and matches an uninterrupted run."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  c = small_config(pairs_file)
  c.train.num_steps = 20
  straight = loop.train_and_evaluate(c, str(tmp_path / "a"))
  make_experiment = loop.make_experiment
  calls = []

  def signalled_experiment(*args, **kwargs):
    exp = make_experiment(*args, **kwargs)

    def final_evaluate(params, split):
      calls.append(split)
      os.kill(os.getpid(), signal.SIGTERM)  # arrives while this split is being evaluated
      return exp.evaluate(params, split)
    return dataclasses.replace(exp, final_evaluate=final_evaluate)

  monkeypatch.setattr(loop, "make_experiment", signalled_experiment)
  first = loop.train_and_evaluate(c, str(tmp_path / "b"))
  assert first == {"stopped_at_step": 20} and calls == ["valid"]
  assert not os.path.exists(tmp_path / "b" / "results.json")
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the watch handed the signal back
  monkeypatch.undo()
  again = loop.train_and_evaluate(c, str(tmp_path / "b"))
  assert again["test"] == straight["test"] and again["steps"] == 20
  rows = [r for r in _read_jsonl(tmp_path / "b" / "metrics.jsonl") if r["split"] == "train"]
  assert [r["step"] for r in rows] == [5, 10, 15, 20]  # no step trained twice


def test_an_error_mid_run_keeps_its_checkpoints_and_hands_signals_back(pairs_file, tmp_path,
                                                                      monkeypatch):
  """A run that raises (here a non-finite loss at step 15) still completes the async save it
  started, closes its checkpoints and restores the signal handlers; the relaunch resumes there."""
  import signal  # pylint: disable=g-import-not-at-top
  c = small_config(pairs_file)
  c.train.num_steps = 20
  c.checkpoint.async_save = True
  straight = loop.train_and_evaluate(c, str(tmp_path / "a"))
  summarise = loop._summarise  # pylint: disable=protected-access
  seen = [0]

  def nan_from_step_15(pending):  # called every log_every_steps = 5 steps
    seen[0] += len(pending)
    out = summarise(pending)
    return dict(out, loss=float("nan")) if seen[0] >= 15 else out

  monkeypatch.setattr(loop, "_summarise", nan_from_step_15)
  mine = lambda signum, frame: None  # noqa: E731
  previous = signal.signal(signal.SIGTERM, mine)
  try:
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at step 15"):
      loop.train_and_evaluate(c, str(tmp_path / "b"))
    assert signal.getsignal(signal.SIGTERM) is mine  # handed back despite the error
  finally:
    signal.signal(signal.SIGTERM, previous)
  monkeypatch.undo()
  saved = sorted(int(d) for d in os.listdir(tmp_path / "b" / "checkpoints") if d.isdigit())
  assert saved and saved[-1] == 10  # the last periodic save before the error, complete
  again = loop.train_and_evaluate(c, str(tmp_path / "b"))
  assert again["test"] == straight["test"] and again["steps"] == 20


def test_steps_in_flight_bounds_the_host_without_changing_results(pairs_file, tmp_path,
                                                                 monkeypatch):
  """The host waits for the step `steps_in_flight` back (so the progress bar and a preemption
  follow the device); the bound changes no number, and a resumed run may change it."""
  waited = []
  real = jax.block_until_ready
  monkeypatch.setattr(loop.jax, "block_until_ready", lambda x: waited.append(1) or real(x))
  runs = {}
  for in_flight in (0, 2):
    c = small_config(pairs_file)
    c.train.steps_in_flight = in_flight
    waited.clear()
    runs[in_flight] = loop.train_and_evaluate(c, str(tmp_path / f"f{in_flight}"))
    # log_every_steps=5 syncs every 5 steps; in between, steps beyond the bound wait once each.
    assert len(waited) == 40 // 5 * (5 - in_flight if in_flight else 0)
  assert runs[2]["test"] == runs[0]["test"] and runs[2]["valid"] == runs[0]["valid"]
  c = small_config(pairs_file)
  c.train.steps_in_flight = 1
  c.train.stop_at_step = 20
  wd = str(tmp_path / "resumed")
  loop.train_and_evaluate(c, wd)
  c.train.stop_at_step = -1
  c.train.steps_in_flight = 0
  assert loop.train_and_evaluate(c, wd)["test"] == runs[0]["test"]  # a free key on resume
  c = small_config(pairs_file)
  c.train.steps_in_flight = -1
  with pytest.raises(ValueError, match="steps_in_flight must be an int >= 0"):
    loop.train_and_evaluate(c, str(tmp_path / "bad"))
