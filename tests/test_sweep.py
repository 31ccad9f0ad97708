"""launch/sweep.py: runs every override, skips finished runs, writes csv/md/png."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from config_files import ROOT, write_small_config  # pylint: disable=g-bad-import-order


def _toy_sweep(tmp_path, sweep, *extra_lines, steps=10, eval_every=5, devices=1,
               workdir="sweep"):
  """A toy pairs file and sweep config under tmp_path; returns (sweep.py command, env)."""
  from test_loop import _write_pairs  # pylint: disable=g-import-not-at-top
  data = _write_pairs(str(tmp_path / "toy.txt"), n_users=60, n_items=20)
  cfg = tmp_path / "toy_sweep.py"
  write_small_config(cfg, data, steps, eval_every, *extra_lines, sweep=sweep)
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, os.path.join(ROOT, "launch", "sweep.py"), f"--config={cfg}",
         f"--workdir={tmp_path / workdir}"]
  return cmd, env



def test_sweep_runs_skips_and_tabulates(tmp_path):
  cmd, env = _toy_sweep(tmp_path, '[{"optim.lr": lr} for lr in (1e-3, 3e-3)]',
                        "c.checkpoint.async_save = False")
  first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  with open(tmp_path / "sweep" / "sweep.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["lr=0.001", "lr=0.003"]
  assert all(float(r["test NDCG@10"]) >= 0 for r in rows)
  assert (tmp_path / "sweep" / "sweep_optim_lr.png").stat().st_size > 1000
  assert "| run |" in (tmp_path / "sweep" / "sweep.md").read_text()
  again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert again.returncode == 0 and again.stdout.count("done, skipped") == 2
  printed = subprocess.run(cmd + ["--print_commands"], capture_output=True, text=True, env=env)
  assert printed.stdout.count("launch/train.py") == 2 and "--config.optim.lr=0.003" in printed.stdout


def test_only_runs_the_named_runs_and_rejects_unknown_names(tmp_path):
  cmd, env = _toy_sweep(tmp_path, '[{"optim.lr": lr} for lr in (1e-3, 3e-3, 1e-2)]',
                        "c.checkpoint.async_save = False", steps=4, eval_every=4)
  bad = subprocess.run(cmd + ["--only=lr=0.003,lr=7"], capture_output=True, text=True, env=env,
                       timeout=600)
  assert bad.returncode != 0 and "['lr=7']" in bad.stderr
  printed = subprocess.run(cmd + ["--only=lr=0.003", "--print_commands"], capture_output=True,
                           text=True, env=env, timeout=600)
  assert printed.stdout.count("launch/train.py") == 1 and "optim.lr=0.003" in printed.stdout
  printed = subprocess.run(cmd + ["--only=lr=0.00*", "--print_commands"], capture_output=True,
                           text=True, env=env, timeout=600)
  assert printed.returncode == 0, printed.stderr[-3000:]
  assert [line.split("optim.lr=")[1].split()[0] for line in printed.stdout.splitlines()] == [
      "0.001", "0.003"]
  run = subprocess.run(cmd + ["--only=lr=0.003"], capture_output=True, text=True, env=env,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["lr=0.003"]
  with open(tmp_path / "sweep" / "sweep.csv") as f:
    rows = {r["run"]: r for r in csv.DictReader(f)}
  assert float(rows["lr=0.003"]["test NDCG@10"]) >= 0
  assert rows["lr=0.001"]["test NDCG@10"] == rows["lr=0.01"]["test NDCG@10"] == ""


def test_only_takes_shell_patterns_in_sweep_order():
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import sweep  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  names = [sweep.run_name(o) for o in
           [{"seed": s} for s in (1, 2)] + [{"sracl.alpha": 0.0, "sracl.beta": 0.0, "seed": s}
                                            for s in (1, 2, 10)]]
  assert sweep.select_runs([], names) == names
  assert sweep.select_runs(["alpha=0.0_beta=0.0_seed=*"], names) == names[2:]
  assert sweep.select_runs(["alpha=0.0_beta=0.0_seed=?", "seed=2"], names) == [names[1]] + names[2:4]
  assert sweep.select_runs(["seed=[12]", "seed=1"], names) == names[:2]
  with pytest.raises(app.UsageError, match=r"\['alpha=1\*'\]"):
    sweep.select_runs(["seed=1", "alpha=1*"], names)


def test_benchmark_mode_tabulates_speed_over_device_counts(tmp_path):
  cmd, env = _toy_sweep(tmp_path, '[{"mesh.num_devices": n} for n in (1, 2)]', devices=2,
                        workdir="bench")
  cmd += ["--mode=benchmark", "--benchmark_arg=--steps=3", "--benchmark_arg=--warmup=1",
          "--benchmark_arg=--eval_repeats=1"]
  first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  with open(tmp_path / "bench" / "sweep.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["num_devices=1", "num_devices=2"]
  assert [r["devices"] for r in rows] == ["1", "2"]  # the runs really used 1 and 2 devices
  assert all(float(r["train_sequences_per_second"]) > 0 for r in rows)
  assert all(0 < float(r["fraction_of_matmul_peak"]) < 1.5 for r in rows)
  assert (tmp_path / "bench" / "sweep_mesh_num_devices.png").stat().st_size > 1000
  again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert again.returncode == 0 and again.stdout.count("done, skipped") == 2


def test_throughput_config_sweeps():
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import sweep  # pylint: disable=g-import-not-at-top
  path = os.path.join(ROOT, "configs", "sasrec", "throughput.py")
  assert sweep.load_sweep(path) == [{"train.batch_size": b} for b in (64, 128, 256, 512, 1024)]
  assert sweep.load_sweep(path + ":devices") == [{"mesh.num_devices": n} for n in (1, 2, 4, 8)]


def test_seed_groups_average_each_arm_over_its_seeds(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import sweep  # pylint: disable=g-import-not-at-top
  plan = [{"sracl.alpha": 0.0, "seed": s} for s in (1, 2, 3)] + [{"seed": s} for s in (1, 2)]
  rows = [{"run": sweep.run_name(o), **o} for o in plan]
  for row, v in zip(rows, (0.1, 0.2, 0.3, 0.5, None)):
    if v is not None:  # the last run has not finished
      row.update({"test HR@10": v, "test NDCG@10": v / 2})
  groups = sweep.seed_groups(rows, plan, ["HR@10", "NDCG@10"])
  assert [g["arm"] for g in groups] == ["alpha=0.0", "default"]
  assert [(g["n"], g["seeds"]) for g in groups] == [(3, 3), (1, 2)]
  np = __import__("numpy")
  assert groups[0]["test HR@10"] == pytest.approx(0.2)
  assert groups[0]["test NDCG@10 std"] == pytest.approx(np.std([0.05, 0.1, 0.15]))
  assert groups[1]["test HR@10"] == pytest.approx(0.5) and groups[1]["test HR@10 std"] == 0
  sweep.write_seed_table(str(tmp_path), groups, ["HR@10", "NDCG@10"])
  table = (tmp_path / "sweep_seeds.md").read_text()
  assert "| alpha=0.0 | 3/3 | 0.2000 ± 0.0816 | 0.1000 ± 0.0408 |" in table
  assert "| default | 1/2 | 0.5000 ± 0.0000 |" in table
  assert sweep.plot_seed_groups(str(tmp_path), groups, ["HR@10"])
  assert (tmp_path / "sweep_seeds.png").stat().st_size > 1000
  assert sweep.seed_groups(rows, [{"sracl.alpha": 0.0}] * 5, ["HR@10"]) == []  # no seed key


def test_paired_tables_compare_the_first_arm_with_each_other(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import numpy as np  # pylint: disable=g-import-not-at-top
  import sweep  # pylint: disable=g-import-not-at-top
  from seqrec_jax import paired  # pylint: disable=g-import-not-at-top
  plan = ([{"seed": s} for s in (1, 2)] + [{"sracl.alpha": 0.0, "seed": s} for s in (1, 2)] +
          [{"sracl.beta": 0.0, "seed": 1}])
  assert sweep.write_paired_tables(str(tmp_path), plan, ["HR@10"]) == ""  # nothing finished
  rng = np.random.default_rng(0)
  users = np.arange(1, 401, dtype=np.int32)
  for overrides, worse in zip(plan[:4], (0, 0, 15, 15)):  # the beta arm has not finished
    run_dir = tmp_path / sweep.run_name(overrides)
    run_dir.mkdir()
    ranks = rng.integers(0, 20, size=400) + worse
    np.savez(run_dir / paired.RANKS_FILE, users=users, test_targets=users, test_ranks=ranks,
             valid_targets=users, valid_ranks=ranks)
  path = sweep.write_paired_tables(str(tmp_path), plan, ["HR@10"])
  text = open(path).read()
  assert "## default vs alpha=0.0" in text and "## default vs beta=0.0" in text
  assert "(no finished run with eval_ranks.npz yet)" in text
  row = next(line for line in text.splitlines() if line.startswith("| HR@10 |"))
  assert "| yes |" in row and "400 users" in text  # the default arm is far better here
  assert (tmp_path / "sweep_paired.png").stat().st_size > 1000
  assert "## Where the targets rank" in text and "| default - alpha=0.0 |" in text
  assert "| default - beta=0.0 |" not in text  # no finished run in that arm
  assert (tmp_path / "sweep_ranks.png").stat().st_size > 1000


def test_sracl_config_flags_and_arm_sweeps():
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import sweep  # pylint: disable=g-import-not-at-top
  from sracl_jax import experiments  # pylint: disable=g-import-not-at-top
  for name in ("beauty", "toys", "ml100k"):
    path = os.path.join(ROOT, "configs", "sracl", f"{name}.py")
    arms = sweep.load_sweep(path + ":items,ablation")
    assert len(arms) == 6 * 3 and {a["seed"] for a in arms} == {2024, 2025, 2026}
    assert {sweep.group_name(a) for a in arms} == {
        "default", "alpha=0.0_beta=0.0", "alpha=0.0", "beta=0.0", "synthesizer=mean",
        "neighbours=random"}
    assert len({sweep.run_name(a) for a in arms}) == 18  # one workdir per run
    assert sweep.load_sweep(path + ":compare") == experiments.arm_sweep(["sracl", "wo_cl"])
    gru = sweep.load_sweep(path + ":gru4rec,seeds")
    assert gru == [{"seed": s} for s in (2024, 2025, 2026)]
  spec = importlib.util.spec_from_file_location("b", os.path.join(ROOT, "configs", "sracl",
                                                                  "beauty.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("items,bert4rec")
  assert c.model.name == "bert4rec" and c.sracl.rec_task == "cloze" and c.task.name == "sracl"
  assert c.sracl.semantic.user_mode == "items"
  assert mod.get_config("gru4rec").model.name == "gru4rec"
  assert mod.get_config().sracl.semantic.user_mode == "prefix"
  with pytest.raises(ValueError, match="unknown SRA-CL arm"):
    experiments.arm_sweep(["sracl", "w/o_everything"])


def test_sweep_stops_after_a_preempted_run_and_resumes(tmp_path):
  """A run that exits 0 without results.json (preempted, checkpointed) ends the sweep there; the
  same command then resumes it and goes on."""
  cmd, env = _toy_sweep(tmp_path, '[{"seed": s} for s in (1, 2)]',
                        "c.checkpoint.async_save = False")
  first = subprocess.run(cmd + ["--override=--config.train.stop_at_step=5"], capture_output=True,
                         text=True, env=env, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "seed=1 stopped before it finished" in first.stdout
  assert not (tmp_path / "sweep" / "seed=2").exists()  # the next run was not started
  second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert (tmp_path / "sweep" / "seed=1" / "results.json").exists()
  assert (tmp_path / "sweep" / "seed=2" / "results.json").exists()
  assert "resumed from step 5" in second.stderr  # seed=1 went on from its checkpoint
  seeds_table = (tmp_path / "sweep" / "sweep_seeds.md").read_text()
  assert "| default | 2/2 |" in seeds_table


def test_parallel_runs_share_the_machine_and_tabulate_only_starts_nothing(tmp_path):
  """--parallel 2 over three seeds: all three finish (the third starts when a slot frees), each
  logging to its own train.log; --tabulate_only then starts nothing; --parallel in benchmark
  mode is refused."""
  cmd, env = _toy_sweep(tmp_path, '[{"seed": s} for s in (1, 2, 3)]',
                        "c.checkpoint.async_save = False")
  sweep_dir = tmp_path / "sweep"
  first = subprocess.run(cmd + ["--parallel=2"], capture_output=True, text=True, env=env,
                         timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  assert first.stdout.count(": finished after") == 3
  assert "(2 running;" in first.stdout  # two at once
  for s in (1, 2, 3):
    assert (sweep_dir / f"seed={s}" / "results.json").exists()
    assert "results" in (sweep_dir / f"seed={s}" / "train.log").read_text()
  assert "| default | 3/3 |" in (sweep_dir / "sweep_seeds.md").read_text()
  assert (sweep_dir / "sweep_curves.png").exists()
  (sweep_dir / "seed=3" / "results.json").unlink()
  tab = subprocess.run(cmd + ["--tabulate_only"], capture_output=True, text=True, env=env,
                       timeout=600)
  assert tab.returncode == 0, tab.stderr[-3000:]
  assert not (sweep_dir / "seed=3" / "results.json").exists()  # nothing was started
  assert "| default | 2/3 |" in (sweep_dir / "sweep_seeds.md").read_text()
  bad = subprocess.run(cmd + ["--parallel=2", "--mode=benchmark"], capture_output=True, text=True,
                       env=env, timeout=600)
  assert bad.returncode != 0 and "--parallel > 1 is for training sweeps" in bad.stderr


def test_parallel_sweep_passes_sigterm_to_its_runs_and_resumes(tmp_path):
  """SIGTERM to a --parallel sweep reaches the runs in flight: they checkpoint, the sweep exits 0
  without starting the rest, and the same command resumes them from their checkpoints."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  cmd, env = _toy_sweep(tmp_path, '[{"seed": s} for s in (1, 2, 3)]',
                        "c.checkpoint.async_save = False", "c.train.patience = 0", steps=100000,
                        eval_every=50)
  cmd.append("--parallel=2")
  sweep_dir = tmp_path / "sweep"
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env)
  logs = [sweep_dir / f"seed={s}" / "train.log" for s in (1, 2)]
  deadline = time.time() + 300
  while time.time() < deadline and not all(
      p.exists() and "valid" in p.read_text() for p in logs):  # both are past an evaluation
    time.sleep(1)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert out.count("stopped before it finished") == 2, out[-3000:]
  assert "1 runs not started" in out
  assert not (sweep_dir / "seed=3").exists()
  for p in logs:
    assert "relaunch the same command to resume" in p.read_text()  # each checkpointed on SIGTERM
  # Resumed with fewer planned steps, so that the test ends soon: a change of protocol, which
  # the runs refuse unless allowed, and then record.
  short = cmd + ["--override=--config.train.num_steps=60"]
  refused = subprocess.run(short, capture_output=True, text=True, env=env, timeout=600)
  assert refused.returncode != 0
  assert all("train.num_steps: 100000 -> 60" in p.read_text() for p in logs)
  again = subprocess.run(short + ["--override=--config.train.on_config_change=allow"],
                         capture_output=True, text=True, env=env, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  for s in (1, 2, 3):
    assert (sweep_dir / f"seed={s}" / "results.json").exists()
  assert all("resumed from step" in p.read_text() for p in logs)
  for s in (1, 2):
    (record,) = [json.loads(line) for line in
                 (sweep_dir / f"seed={s}" / "config_changes.jsonl").read_text().splitlines()]
    assert record["changes"] == [{"key": "train.num_steps", "old": 100000, "new": 60}]
  assert not (sweep_dir / "seed=3" / "config_changes.jsonl").exists()  # started fresh


def test_runs_that_start_from_an_earlier_run_of_the_sweep(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  stage2 = {"calrec.train_on": "beauty", "calrec.init_from": "{sweep}/train_on=all"}
  name = sweep_lib.run_name(stage2)
  assert name == "train_on=beauty_init_from=train_on=all"
  assert sweep_lib.sources(stage2) == ["train_on=all"]
  assert sweep_lib.sources({"calrec.init_from": "/abs/dir"}) == []
  cmd = sweep_lib.train_command("c.py", str(tmp_path / "sw" / name), stage2, [])
  assert f"--config.calrec.init_from={tmp_path / 'sw' / 'train_on=all'}" in cmd
  # The source has not finished: the dependent run is not started (`false` would raise).
  needs = {name: ["train_on=all"]}
  sweep_lib.run_serially([(1, name, ["false"])], 2, str(tmp_path / "sw"), "train", needs)
  assert not (tmp_path / "sw" / name).exists()
  # A source that comes later in the sweep, or --parallel > 1, is refused up front.
  cmd, env = _toy_sweep(tmp_path, '[{"data.name": "{sweep}/name=b"}, {"data.name": "b"}]')
  bad = subprocess.run(cmd + ["--tabulate_only"], capture_output=True, text=True, env=env)
  assert bad.returncode != 0 and "not an earlier run" in bad.stderr
  cmd, env = _toy_sweep(tmp_path, '[{"data.name": "b"}, {"data.name": "{sweep}/name=b"}]')
  par = subprocess.run(cmd + ["--parallel=2"], capture_output=True, text=True, env=env)
  assert par.returncode != 0 and "--parallel=1" in par.stderr


def test_runs_with_non_numeric_keys_get_a_bar_chart(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  rows = [{"run": "train_on=all", "test R@10": 0.02}, {"run": "train_on=beauty"},
          {"run": "train_on=beauty_init_from=train_on=all", "test R@10": 0.03}]
  sweep = [{"calrec.train_on": "all"}, {"calrec.train_on": "beauty"},
           {"calrec.train_on": "beauty", "calrec.init_from": "{sweep}/train_on=all"}]
  assert sweep_lib.plot(str(tmp_path), rows, sweep, ["R@10"]) == []  # no numeric axis
  paths = sweep_lib.plot_runs(str(tmp_path), rows, ["R@10"])
  assert paths == [str(tmp_path / "sweep_runs.png")] and os.path.getsize(paths[0]) > 1000
  assert sweep_lib.plot_runs(str(tmp_path), rows[1:2], ["R@10"]) == []  # nothing finished


def test_serial_sweep_passes_signals_on_and_stops_on_a_killed_run(tmp_path):
  """Serial sweeps: SIGTERM to the sweep reaches the run in flight as SIGTERM and nothing more
  starts; a run killed by a signal stops the sweep with a message, not a traceback; a failing
  run raises with its name."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  sw = tmp_path / "sw"
  # Each fake run writes `started`, then waits; on SIGTERM it writes `term` and exits 0.
  fake = ("import pathlib, signal, sys, time; d = pathlib.Path(sys.argv[1]); "
          "signal.signal(signal.SIGTERM, lambda *a: (d.joinpath('term').write_text('x'), "
          "sys.exit(0))); d.joinpath('started').write_text('x'); time.sleep(120)")
  script = tmp_path / "serial.py"
  script.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(ROOT, 'launch')!r})\n"
      "import sweep\n"
      f"todo = [(i, n, [sys.executable, '-c', {fake!r}, {str(sw)!r} + '/' + n]) "
      "for i, n in enumerate(['a', 'b'])]\n"
      f"sweep.run_serially(todo, 2, {str(sw)!r}, 'train')\n")
  proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 60
  while time.time() < deadline and not (sw / "a" / "started").exists():
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  assert (sw / "a" / "term").exists() and not (sw / "b").exists(), out
  assert "a stopped before it finished" in out
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  killed = [(0, "k", ["sh", "-c", "kill -KILL $$"]), (1, "never", ["false"])]
  sweep_lib.run_serially(killed, 2, str(tmp_path / "sw2"), "train")  # no raise
  assert not (tmp_path / "sw2" / "never").exists()
  with pytest.raises(RuntimeError, match="sweep run f failed"):
    sweep_lib.run_serially([(0, "f", ["false"])], 1, str(tmp_path / "sw3"), "train")
  # Run side by side, the same outcomes read the same way: killed -> stop with a message, failed
  # -> raise once the others have ended, and nothing new starts after either.
  (tmp_path / "sw4").mkdir()
  sweep_lib.run_concurrently(killed, 2, str(tmp_path / "sw4"), 1)  # no raise
  assert not (tmp_path / "sw4" / "never").exists()
  with pytest.raises(RuntimeError, match=r"sweep runs failed: \['f'\]"):
    sweep_lib.run_concurrently([(0, "f", ["false"]), (1, "never", ["true"])], 2,
                               str(tmp_path / "sw5"), 1)
  assert not (tmp_path / "sw5" / "never").exists()


def test_learning_curves_of_finished_and_running_runs(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  sweep = [{"alpha": a, "seed": s} for a in (0.1, 0.0) for s in (1, 2)]

  def write(name, metric, rows, finished):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"train": {"early_stop_metric": metric}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
      (d / "results.json").write_text("{}")

  write("alpha=0.1_seed=1", "MRR@10",
        [{"step": 20, "split": "valid", "MRR@10": 0.3}, {"step": 5, "split": "train", "loss": 1},
         {"step": 10, "split": "valid", "MRR@10": 0.2}], finished=True)
  write("alpha=0.0_seed=1", "NDCG@10",
        [{"step": 10, "split": "valid", "NDCG@10": 0.1, "MRR@10": 0.9}], finished=False)
  write("alpha=0.0_seed=2", "NDCG@10", [{"step": 5, "split": "train", "loss": 2}], False)
  curves = sweep_lib.learning_curves(str(tmp_path), sweep)
  assert list(curves) == ["alpha=0.1_seed=1", "alpha=0.0_seed=1"]  # sweep order; no valid row
  first = curves["alpha=0.1_seed=1"]
  assert first == {"arm": "alpha=0.1", "metric": "MRR@10", "steps": [10, 20],
                   "values": [0.2, 0.3], "finished": True}
  second = curves["alpha=0.0_seed=1"]
  assert second["values"] == [0.1] and not second["finished"] and second["arm"] == "alpha=0.0"
  (png,) = sweep_lib.plot_curves(str(tmp_path), sweep)
  assert png.endswith("sweep_curves.png") and os.path.getsize(png) > 1000
  assert sweep_lib.plot_curves(str(tmp_path / "alpha=0.0_seed=2"), sweep) == []


def test_archive_keeps_what_reproduces_the_tables_and_no_checkpoints(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import numpy as np  # pylint: disable=g-import-not-at-top
  import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  from seqrec_jax import paired  # pylint: disable=g-import-not-at-top
  plan = [{"seed": s} for s in (1, 2)] + [{"sracl.alpha": 0.0, "seed": s} for s in (1, 2)]
  work, dst = tmp_path / "work", tmp_path / "archive"
  metrics = {m: 0.1 for m in ("HR@10", "NDCG@10", "HR@20", "NDCG@20")}
  rng = np.random.default_rng(0)
  users = np.arange(500, dtype=np.int32)
  for i, overrides in enumerate(plan[:3]):  # the last run has not started
    d = work / sweep_lib.run_name(overrides)
    (d / "checkpoints" / "10").mkdir(parents=True)
    (d / "checkpoints" / "10" / "state").write_bytes(b"x" * 1000)
    (d / "config.json").write_text(json.dumps({"train": {"early_stop_metric": "MRR@10"}}))
    (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "split": "valid", "MRR@10": i}) + "\n")
    if i < 2:  # the third run is still training
      (d / "results.json").write_text(json.dumps(
          {"valid": metrics, "test": {**metrics, "HR@10": 0.1 * i}, "best_step": 10,
           "train_seconds": 1.0}))
      ranks = rng.integers(0, 50, size=500).astype(np.int32)
      np.savez(d / paired.RANKS_FILE, users=users, test_targets=users, test_ranks=ranks,
               valid_targets=users, valid_ranks=ranks + 1)
  (work / "sweep.csv").write_text("run\n")
  assert sweep_lib.archive(str(work), plan, str(dst)) == [
      sweep_lib.run_name(o) for o in plan[:3]]
  assert (dst / "sweep.csv").read_text() == "run\n"
  assert not list(dst.rglob("checkpoints")) and not (dst / "alpha=0.0_seed=2").exists()
  assert not (dst / "alpha=0.0_seed=1" / "results.json").exists()  # unfinished stays unfinished
  metrics_names = ["HR@10", "NDCG@20"]
  assert (sweep_lib.collect(str(dst), plan, metrics_names)
          == sweep_lib.collect(str(work), plan, metrics_names))
  assert sweep_lib.learning_curves(str(dst), plan) == sweep_lib.learning_curves(str(work), plan)
  for stage in ("valid", "test"):
    for name in ("seed=1", "seed=2"):
      a, b = paired.load_ranks(str(work / name), stage), paired.load_ranks(str(dst / name), stage)
      assert all(np.array_equal(a[k], b[k]) for k in a)
  assert (os.path.getsize(dst / "seed=1" / paired.RANKS_FILE)
          < os.path.getsize(work / "seed=1" / paired.RANKS_FILE))  # compressed
  with pytest.raises(ValueError, match="own workdir"):
    sweep_lib.archive(str(work), plan, str(work))

  # A new machine: the archive's finished runs come back, so the sweep skips them; the unfinished
  # one does not, and a run with checkpoints of its own here is left alone.
  fresh = tmp_path / "fresh"
  (fresh / "seed=2" / "checkpoints" / "5").mkdir(parents=True)
  assert sweep_lib.restore_finished(str(dst), str(fresh), plan) == ["seed=1"]
  assert not (fresh / "seed=2" / "results.json").exists()
  assert not (fresh / "alpha=0.0_seed=1").exists()
  assert (sweep_lib.collect(str(fresh), plan[:1], metrics_names)
          == sweep_lib.collect(str(work), plan[:1], metrics_names))
  a, b = paired.load_ranks(str(work / "seed=1"), "test"), paired.load_ranks(str(fresh / "seed=1"),
                                                                           "test")
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert sweep_lib.restore_finished(str(dst), str(fresh), plan) == []  # already there
  assert sweep_lib.restore_finished(str(tmp_path / "no_archive"), str(fresh), plan) == []
