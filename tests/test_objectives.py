"""The connectivity objective (models/objectives.py) in the one training harness: the loss
against NumPy, the pair of stretches, resume to the bit, checkpoints every evaluator reads."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainlm_jax.models import objectives
from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.training import pretrain, state as state_lib
from tests.conftest import tiny_config
from tests.test_train import _params


def _inputs(seed=0, b=4, p=6, w=25):
  rng = np.random.default_rng(seed)
  pred = np.tanh(rng.standard_normal((b, p, p))).astype(np.float32)
  target = rng.standard_normal((b, p, w)).astype(np.float32)
  target[:, 1] += 0.8 * target[:, 0] * rng.uniform(0, 1, (b, 1))  # connectivity that varies
  live = np.ones((b, p), np.float32)
  live[0, 2] = 0  # dead in sample 0
  return pred, target, live


def test_connectivity_losses_match_numpy():
  """mse: the squared error of pred against the target stretch's Pearson FC over the pairs p < q
  of live parcels of every sample. deviation: 1 - the correlation, over those pairs of every
  sample, of pred and FC each minus its mean over the samples where the pair is live."""
  pred, target, live = _inputs()
  b, p, _ = pred.shape
  fc = np.stack([np.corrcoef(t.astype(np.float64)) for t in target])
  w = np.stack([np.outer(l, l) * np.triu(np.ones((p, p)), k=1) for l in live])
  mse = np.sum(w * (pred - fc) ** 2) / w.sum()
  n = np.maximum(w.sum(axis=0), 1)
  x = (pred - (w * pred).sum(axis=0) / n) * w
  y = (fc - (w * fc).sum(axis=0) / n) * w
  dev = 1 - np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y))
  args = (jnp.asarray(pred), jnp.asarray(target), jnp.asarray(live))
  np.testing.assert_allclose(float(objectives.connectivity_loss(*args)), mse, rtol=1e-5)
  np.testing.assert_allclose(float(objectives.deviation_loss(*args)), dev, rtol=1e-5)
  # A prediction that is the target's FC scores 0 on both; its affine image too on 'deviation'.
  perfect = jnp.asarray(fc, jnp.float32)
  assert float(objectives.connectivity_loss(perfect, *args[1:])) < 1e-10
  assert float(objectives.deviation_loss(0.3 * perfect - 0.2, *args[1:])) < 1e-5


def test_pooled_evaluation_correlation_does_not_depend_on_batches():
  """eval_conn_r: per-pair sums added over batches give the deviation correlation of all the
  samples at once (centred on the mean over every sample, not each batch's)."""
  pred, target, live = _inputs(b=8)
  fc = np.stack([np.corrcoef(t.astype(np.float64)) for t in target]).astype(np.float32)
  w = objectives.pair_weights(jnp.asarray(live))
  sums = [objectives.pair_sums(jnp.asarray(pred[i:i + 3]), jnp.asarray(fc[i:i + 3]), w[i:i + 3])
          for i in (0, 3, 6)]  # batches of 3, 3, 2
  pooled = objectives.pooled_deviation_r(*(sum(np.asarray(s[k]) for s in sums)
                                           for k in range(6)))
  whole = 1 - float(objectives.deviation_loss(*map(jnp.asarray, (pred, target, live))))
  np.testing.assert_allclose(pooled, whole, rtol=1e-5)
  per_batch = objectives.deviation_sums(jnp.asarray(pred[:3]), jnp.asarray(fc[:3]), w[:3])
  assert abs(float(per_batch[0] / np.sqrt(per_batch[1] * per_batch[2])) - whole) > 1e-3


def test_split_pair_gives_adjacent_disjoint_stretches():
  x = jnp.arange(2 * 1 * 9, dtype=jnp.float32).reshape(2, 1, 9)
  ctx, tgt = objectives.split_pair(x, 3)
  np.testing.assert_array_equal(ctx[0, 0], [0, 1, 2])
  np.testing.assert_array_equal(tgt[0, 0], [3, 4, 5, 6, 7, 8])
  ctx, tgt = objectives.split_pair(x, 3, jnp.asarray([True, False]))
  np.testing.assert_array_equal(ctx[0, 0], [6, 7, 8])  # flipped: the target first
  np.testing.assert_array_equal(tgt[0, 0], [0, 1, 2, 3, 4, 5])
  np.testing.assert_array_equal(ctx[1, 0], [9, 10, 11])


def _conn_config(hcp_dir, steps):
  c = tiny_config(hcp_dir, steps)
  c.train.objective = "conn"
  c.train.target_window = 200
  c.masking.ratio = 0.0
  return c


def test_config_errors_name_the_objective_fields(hcp_dir):
  c = _conn_config(hcp_dir, 2)
  c.train.target_window = 2
  c.train.mae_weight = 1.0
  with pytest.raises(ValueError) as e:
    state_lib.validate_config(c, 1)
  assert "train.target_window=2" in str(e.value) and "masking.ratio=0 masks nothing" in str(e.value)
  c.train.target_window, c.train.mae_weight, c.train.grad_accum_steps = 200, 0.0, 2
  with pytest.raises(ValueError, match="train.grad_accum_steps=2: the deviation loss"):
    state_lib.validate_config(c, 1)
  c.train.objective = "jepa"
  with pytest.raises(ValueError, match="train.objective='jepa'"):
    state_lib.validate_config(c, 1)


def test_both_objectives_hold_out_the_same_subjects(tmp_path):
  """Recordings too short for a connectivity sample (window + target) are dropped after the
  subject split, so 'conn' validates on the same subjects as 'mae' (never on training ones)."""
  from brainlm_jax.data import run_data  # pylint: disable=import-outside-toplevel
  from configs import pretrain as presets  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  save = lambda s, n: np.save(tmp_path / f"{s}_bold.npy",  # noqa: E731
                              rng.standard_normal((n, 5)).astype(np.float32))
  for s in range(20):
    save(f"sub-{s:02d}", 200)
  c = presets.get_config("tiny")
  c.data.path, c.data.window = str(tmp_path), 40
  val = lambda d: {r.subject for r in d.val}  # noqa: E731
  held_out = sorted(val(run_data.prepare_data(c)))
  for s in held_out[:3]:  # three of the held-out subjects too short for a 'conn' sample
    save(s, 60)
  mae, conn = run_data.prepare_data(c), run_data.prepare_data(c, window=120)
  assert val(mae) == set(held_out) and val(conn) == set(held_out[3:])
  assert {r.subject for r in conn.train} == {r.subject for r in mae.train}
  assert sorted(x["path"] for x in conn.skipped) == sorted(
      str(tmp_path / f"{s}_bold.npy") for s in held_out[:3])
  assert all("shorter than window=120" in x["reason"] for x in conn.skipped)


def test_connectivity_pretraining_learns_resumes_to_the_bit_and_is_probed(hcp_dir, tmp_path,
                                                                         capsys):
  """The one loop with objective 'conn' on the real HCP recordings: samples of window + target
  timepoints, its loss falls below its start, the checkpoint's meta names the objective, an
  interrupted run resumes to the same bits, a run of another objective in the workdir is
  refused, and the probe and the reconstruction evaluator read its checkpoint."""
  config = _conn_config(hcp_dir, 30)
  config.train.mae_weight = 0.5  # both parts, so the decoder trains too
  config.masking.ratio = 0.5
  pretrain.train_and_evaluate(config, str(tmp_path / "a"))
  rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
  evals = [r for r in rows if "eval_conn_loss" in r]
  assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals  # 1 - eval_conn_r + 0.5 x MSE
  assert evals[-1]["eval_conn_r"] > evals[0]["eval_conn_r"], evals  # the connectivity part too
  assert {"conn_loss", "mae_loss", "train_loss"} <= set(rows[1]) and "eval_r2" in evals[-1]
  assert evals[-1]["eval_conn_fc_baseline"] == evals[0]["eval_conn_fc_baseline"] > 0
  meta = ckpt_lib.read_meta(str(tmp_path / "a" / "checkpoints" / "30"))
  assert meta["objective"] == {"objective": "conn", "mae_weight": 0.5, "conn_kind": "deviation",
                               "target_window": 200}

  pretrain.train_and_evaluate(config, str(tmp_path / "b"), stop_at_step=13)
  pretrain.train_and_evaluate(config, str(tmp_path / "b"))
  (step_a, params_a), (step_b, params_b) = _params(tmp_path / "a"), _params(tmp_path / "b")
  assert step_a == step_b == 30
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_a, params_b)

  config.train.objective = "mae"
  with pytest.raises(ValueError, match="train.objective: checkpoint 'conn' vs now 'mae'"):
    pretrain.train_and_evaluate(config, str(tmp_path / "a"))

  from brainlm_jax.transfer import evaluate, probe  # pylint: disable=import-outside-toplevel
  from brainlm_jax.transfer.run import load_pretrained  # pylint: disable=import-outside-toplevel
  pre = load_pretrained(str(tmp_path / "a"))
  res = probe.Probe("subject-id", random_seeds=1, readings=("mean", "patches-fc"),
                    batch_size=8).run(pre, str(tmp_path / "probe"))
  names = {e["name"] for e in res["feature_sets"]}
  assert {"mean", "patches-fc", "random-patches-fc", "fc", "model"} <= names
  rec = evaluate.Evaluate(batch_size=8).run(pre, str(tmp_path / "eval"))
  assert rec["methods"][0]["name"] == "model" and np.isfinite(rec["methods"][0]["mse"])


def test_a_planted_group_difference_in_connectivity_is_read_better_after_pretraining(tmp_path):
  """80 synthetic subjects, each with its own persistent connectivity (a random mixing of 8
  sources), half of them with one more shared source between parcels 0 and 1. After 600 steps of
  the connectivity objective, the encoder's patches-fc separates the groups better than the same
  network at random init (3 seeds): on the planted pair, and for a linear probe."""
  from brainlm_jax.data.datasets import load_recordings  # pylint: disable=import-outside-toplevel
  from brainlm_jax.transfer import clinical, features  # pylint: disable=import-outside-toplevel
  from brainlm_jax.transfer.run import load_pretrained  # pylint: disable=import-outside-toplevel
  from configs import pretrain as presets  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  n_sub, p, length = 80, 8, 100
  group = np.tile([0, 1], n_sub // 2)
  data = tmp_path / "data"
  data.mkdir()
  for s in range(n_sub):
    mix = np.eye(p) + 0.4 * rng.standard_normal((p, p))
    mix[1, 0] += group[s]
    np.save(data / f"sub-{s:02d}_bold.npy",
            (rng.standard_normal((length, p)) @ mix.T).astype(np.float32))
  c = presets.get_config("tiny")
  c.data.path, c.data.window, c.model.patch_len, c.data.val_fraction = str(data), 20, 10, 0.2
  c.model.hidden_size = c.model.decoder_hidden_size = 32
  c.model.mlp_dim = c.model.decoder_mlp_dim = 64
  c.model.num_layers = 1
  c.train.objective, c.train.target_window, c.masking.ratio = "conn", 40, 0.0
  c.train.num_steps, c.train.batch_size, c.train.warmup_steps = 600, 16, 10
  c.train.learning_rate, c.train.eval_every, c.train.log_every = 3e-3, 600, 100
  c.train.checkpoint_every, c.train.async_checkpoints, c.mesh.num_devices = 1000, False, 1
  pretrain.train_and_evaluate(c, str(tmp_path / "run"))
  pre = load_pretrained(str(tmp_path / "run"))
  recs, _ = load_recordings(str(data), window=20)
  f = features.extract_features(pre, recs, readings=("patches-fc",), random_seeds=(0, 1, 2))
  rows = np.arange(len(f.window))

  def separation(name):  # d' of the subjects' mean planted pair (0, 1)
    x = f.reading(name, rows, rows)[:, 0]
    m = np.asarray([x[f.subject == f"sub-{s:02d}"].mean() for s in range(n_sub)])
    a, b = m[group == 0], m[group == 1]
    return (b.mean() - a.mean()) / np.sqrt(0.5 * (a.var() + b.var()))
  randoms = [features.row_name("patches-fc", True, k) for k in range(3)]
  assert separation("patches-fc") > max(separation(r) for r in randoms)
  for r in recs:
    r.site = "A"
  res = clinical.cohort_probe(f, recs, "group", {f"sub-{s:02d}": str(group[s])
                                                 for s in range(n_sub)},
                              cv="kfold", folds=5, tangent=False)
  acc = {e["name"]: e["metrics"]["accuracy"]["mean"] for e in res["feature_sets"]}
  assert acc["patches-fc"] > np.mean([acc[r] for r in randoms]) + 0.05, acc
