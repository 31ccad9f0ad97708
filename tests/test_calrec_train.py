"""CALRec end to end through the spine's loop: tiny configs train, evaluate, resume and chain stages."""

import json
import os

import numpy as np
import pytest

from calrec_jax import ranking
from seqrec_jax import loop

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def _ml100k_tiny(**overrides):
  from configs.calrec import ml100k  # pylint: disable=g-import-not-at-top
  c = ml100k.get_config("tiny")
  c.train.progress = False
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def _check_metrics(metrics, prefixes):
  for prefix in prefixes:
    for key in ranking.metric_keys((1, 5, 10)):
      value = metrics[f"{prefix}{key}"]
      assert 0.0 <= value <= 1.0, (prefix, key, value)
    assert metrics[f"{prefix}Recall@1"] <= metrics[f"{prefix}Recall@5"] <= \
        metrics[f"{prefix}Recall@10"]


def test_tiny_ml100k_trains_and_reports_every_ranking(tmp_path):
  # Model selection by the validation generation loss, lower is better.
  results = loop.train_and_evaluate(
      _ml100k_tiny(**{"train.early_stop_metric": "gen/nig", "train.early_stop_mode": "min"}),
      str(tmp_path))
  _check_metrics(results["test"], ["", "rr/", "max/", "emb/"])
  assert 0.0 < results["test"]["gen/nig"] < 20.0
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["test"] == results["test"]
  assert os.path.exists(tmp_path / "tokenizer" / "tokenizer.json")
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train = [l for l in lines if l["split"] == "train"]
  assert all(np.isfinite(l["loss"]) for l in train)
  assert {"nig", "tt", "ut"} <= set(train[0])
  # Training lowers the generation loss of the target text.
  assert train[-1]["nig"] < train[0]["nig"]
  valid = [l for l in lines if l["split"] == "valid"]
  assert results["best_step"] == min(valid, key=lambda l: l["gen/nig"])["step"]
  print(loop.format_results(results))


def test_resume_equals_uninterrupted(tmp_path):
  straight = loop.train_and_evaluate(_ml100k_tiny(**{"calrec.test_users": 32}),
                                     str(tmp_path / "a"))
  stopped = loop.train_and_evaluate(_ml100k_tiny(**{"calrec.test_users": 32,
                                                    "train.stop_at_step": 10}),
                                    str(tmp_path / "b"))
  assert stopped == {"stopped_at_step": 10}
  resumed = loop.train_and_evaluate(_ml100k_tiny(**{"calrec.test_users": 32}),
                                    str(tmp_path / "b"))
  for stage in ("valid", "test"):
    for key, value in straight[stage].items():
      assert resumed[stage][key] == pytest.approx(value, abs=1e-6), (stage, key)


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "amazon-toys-text")),
                    reason="needs ../shared/data")
def test_stage_one_mixture_then_stage_two(tmp_path):
  """Stage I trains on the mixture of both categories; Stage II (one category) starts from
  Stage I's best parameters exactly, with its tokenizer, and trains on that category alone."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs.calrec import amazon  # pylint: disable=g-import-not-at-top
  from seqrec_jax import checkpointing  # pylint: disable=g-import-not-at-top
  c = amazon.get_config("tiny")
  c.train.progress = False
  c.calrec.test_users = 32
  c.calrec.num_samples = 1
  stage1 = loop.train_and_evaluate(c, str(tmp_path / "s1"))
  _check_metrics(stage1["test"], ["beauty/", "toys/", "", "beauty/emb/"])
  c2 = amazon.get_config("tiny")
  c2.train.progress = False
  c2.calrec.train_on = "beauty"
  c2.calrec.init_from = str(tmp_path / "s1")
  exp = loop.make_experiment(c2, workdir=str(tmp_path / "s2"))
  assert [cat.name for cat in exp.iterator.cats] == ["beauty"]
  ckpt = checkpointing.Checkpointer(str(tmp_path / "s1"), async_save=False)
  try:
    best, _ = ckpt.restore_best(exp.state.params)
  finally:
    ckpt.close()
  # Stage I's best parameters, not a fresh initialisation (they differ: Stage I trained them).
  fresh = loop.make_experiment(c, workdir=str(tmp_path / "fresh")).state.params
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(best),
                                                      jax.tree.leaves(fresh)))
  for got, want in zip(jax.tree.leaves(exp.state.params), jax.tree.leaves(best)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with open(tmp_path / "s2" / "tokenizer" / "tokenizer.json") as f2, \
      open(tmp_path / "s1" / "tokenizer" / "tokenizer.json") as f1:
    assert f1.read() == f2.read()
  _, metrics = exp.train_step(exp.state, next(exp.iterator))  # a Stage II step on beauty alone
  assert float(metrics["weight_sum"]) > 0 and np.isfinite(float(metrics["loss_sum"]))


def test_amazon_config_flags():
  from configs.calrec import amazon  # pylint: disable=g-import-not-at-top
  from calrec_jax.config import validate_calrec  # pylint: disable=g-import-not-at-top
  both = amazon.get_config(None)
  assert [s.split("|")[0] for s in both.calrec.categories] == ["beauty", "toys"]
  c = amazon.get_config("cpu,beauty")
  assert [s.split("|")[0] for s in c.calrec.categories] == ["beauty"]
  assert c.calrec.categories[0].endswith("amazon-beauty-text")
  assert (c.train.early_stop_metric, c.train.early_stop_mode) == ("gen/nig", "min")
  assert c.model.overrides.d_model == 128 and c.train.num_steps == 800
  validate_calrec(c)
  assert [s.split("|")[0] for s in amazon.get_config("toys").calrec.categories] == ["toys"]
  with pytest.raises(ValueError, match="pick one category"):
    amazon.get_config("beauty,toys")
  with pytest.raises(ValueError, match="unknown config argument"):
    amazon.get_config("cpu,bauty")
  assert len(amazon.get_sweep("cpu,beauty")) == 5
  stages = amazon.get_sweep("cpu,stages")
  assert stages[0] == {"calrec.train_on": "all"}
  assert {"calrec.train_on": "toys", "calrec.init_from": "{sweep}/train_on=all"} in stages
  assert len(stages) == 5
  with pytest.raises(ValueError, match="several categories"):
    amazon.get_sweep("cpu,beauty,stages")
