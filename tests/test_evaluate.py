"""brainlm-evaluate: baselines against hand-computed values, an AR fit recovering a known process,
model and baselines scored on the same masked tokens of the real held-out HCP subjects, clear
errors."""

import json

import jax
import numpy as np
import pytest

from brainlm_jax.data import datasets
from brainlm_jax.data.readers import load_coordinates
from brainlm_jax.data.windows import iter_windows
from brainlm_jax.models.brainlm import masked_loss
from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.transfer import baselines
from brainlm_jax.transfer import evaluate
from brainlm_jax.transfer import functions
from brainlm_jax.transfer import plots
from brainlm_jax.transfer.run import load_pretrained
from tests.conftest import A424_COORDS, run_cli_report
from tests.test_probe import workdir  # noqa: F401  pylint: disable=unused-import


def _toy():
  """patches [1, 2, 4, 2]: parcel 0 = 0..7 with patches 1 and 3 masked; parcel 1 all masked."""
  patches = np.stack([np.arange(8.0), np.arange(8.0) + 100]).reshape(1, 2, 4, 2)
  mask = np.asarray([[[0, 1, 0, 1], [1, 1, 1, 1]]], np.float32)
  return patches.astype(np.float32), mask


def test_reconstruction_baselines_by_hand():
  x, m = _toy()
  np.testing.assert_array_equal(baselines.no_visible_parcels(m), [[False, True]])
  # Visible timepoints 0, 1, 4, 5 with values 0, 1, 4, 5.
  np.testing.assert_allclose(baselines.parcel_mean(x, m)[0, 0], np.full((4, 2), 2.5))
  np.testing.assert_allclose(baselines.interpolation(x, m)[0, 0],
                             [[0, 1], [2, 3], [4, 5], [5, 5]])  # flat after the last visible
  np.testing.assert_allclose(baselines.nearest_patch(x, m)[0, 0],
                             [[0, 1], [0, 1], [4, 5], [4, 5]])  # tie at patch 1: the earlier
  np.testing.assert_allclose(baselines.persistence(x, m, last="value")[0, 0, [1, 3]],
                             [[1, 1], [5, 5]])
  np.testing.assert_allclose(baselines.persistence(x, m, last="patch")[0, 0, [1, 3]],
                             [[0, 1], [4, 5]])
  fns = {**baselines.baseline_fns("parcel"), **baselines.baseline_fns("forecast")}
  for name, fn in fns.items():
    if name != "ar":  # parcel 1 has nothing visible: the training median, 0
      np.testing.assert_array_equal(fn(x, m)[0, 1], 0.0, err_msg=name)
  # Interpolation between visible patches that are further apart, and leading masked patches.
  m2 = np.asarray([[[1, 0, 1, 1], [0, 1, 1, 0]]], np.float32)
  np.testing.assert_allclose(baselines.interpolation(x, m2)[0, 0], [[2, 2], [2, 3], [3, 3], [3, 3]])
  x2 = x.copy()
  x2[0, 1] = (100 + np.arange(8.0) ** 2).reshape(4, 2)  # visible: t 0, 1, 6, 7
  np.testing.assert_allclose(baselines.interpolation(x2, m2)[0, 1].ravel(),
                             [100, 101, 108, 115, 122, 129, 136, 149], rtol=1e-6)
  np.testing.assert_allclose(baselines.persistence(x, m2)[0, 0, 0], [0, 0])  # nothing before


def test_ar_recovers_a_known_process():
  rng = np.random.default_rng(0)
  n, a1, a2, c = 6000, 0.6, -0.3, 0.5
  x = np.zeros((3, n))
  for t in range(2, n):
    x[:, t] = a1 * x[:, t - 1] + a2 * x[:, t - 2] + c + rng.standard_normal(3)
  coef = baselines.fit_ar(x, order=2)
  np.testing.assert_allclose(coef, np.tile([a1, a2, c], (3, 1)), atol=0.05)
  coef5 = baselines.fit_ar(x, order=5)  # higher lags are ~0
  np.testing.assert_allclose(coef5[:, 2:5], 0.0, atol=0.05)

  # Noise-free AR(2) windows with a forecast mask: the rollout continues them exactly.
  t = np.arange(40)
  series = np.stack([np.cos(0.3 * t + ph) * 0.97 ** t + 2.0 for ph in (0.0, 1.0, 2.0)])
  patches = series.reshape(1, 3, 4, 10).astype(np.float64)
  mask = np.zeros((1, 3, 4), np.float32)
  mask[..., 2:] = 1
  pred = baselines.autoregressive(patches, mask, order=2)
  np.testing.assert_allclose(pred, patches, atol=1e-4)
  assert np.abs(baselines.persistence(patches, mask)[..., 2:, :] - patches[..., 2:, :]).max() > 0.5
  with pytest.raises(ValueError, match="needs forecast masks"):
    baselines.autoregressive(patches, np.asarray([[[0, 1, 0, 1]] * 3], np.float32))
  with pytest.raises(ValueError, match=r"AR\(5\) needs at least 12 context timepoints, got 10"):
    baselines.fit_ar(series[:, :10], order=5)


def test_masks_depend_only_on_seed_and_window():
  kw = dict(mode="parcel", ratio=0.5)
  whole = functions.window_maskings(3, 0, 8, (5, 10), **kw)
  parts = [functions.window_maskings(3, 0, 3, (5, 10), **kw),
           functions.window_maskings(3, 3, 5, (5, 10), **kw)]
  np.testing.assert_array_equal(whole.mask, np.concatenate([p.mask for p in parts]))
  np.testing.assert_array_equal(whole.mask.sum(-1), 5.0)  # parcel mode: 5 of 10 in each parcel
  assert np.abs(np.diff(np.asarray(whole.mask), axis=0)).sum() > 0  # windows differ
  other = functions.window_maskings(4, 0, 8, (5, 10), **kw)
  assert np.abs(np.asarray(other.mask) - np.asarray(whole.mask)).sum() > 0


def _evaluate_checkpoint(checkpoint, out_dir, **options):
  """What brainlm-evaluate does: restore the params (only), run the Evaluate job into out_dir."""
  job = evaluate.Evaluate(**options)  # options are checked before the checkpoint is read
  return job.run(load_pretrained(checkpoint), out_dir)


def test_reconstruction_on_held_out_hcp(workdir, tmp_path):  # noqa: F811
  wd = workdir[0]
  res = _evaluate_checkpoint(str(wd), str(tmp_path / "rec"), batch_size=8)
  saved = json.load(open(tmp_path / "rec" / "evaluate.json"))
  assert saved["split"] == "validation" and saved["n_recordings"] == 2
  assert len(saved["subjects"]) == 2 and saved["n_windows"] == 12  # 1200 timepoints: 6 windows
  assert saved["masking"] == {"mode": "uniform", "ratio": 0.5, "forecast_patches": 2, "seed": 0}
  names = [m["name"] for m in saved["methods"]]
  assert names == ["model", *baselines.RECONSTRUCTION_BASELINES]
  assert saved["n_masked_tokens"] == 12 * 94 * 5 and saved["fallback_tokens"] == 0
  for m in saved["methods"]:  # every method scored on the same masked values
    assert m["n"] == saved["n_masked_values"] == 12 * 94 * 5 * 20
    assert len(m["per_parcel"]["mse"]) == len(m["per_parcel"]["r2"]) == 94
    per = np.asarray(m["per_parcel"]["mse"])  # uniform masking: counts differ per parcel
    assert per.min() <= m["mse"] <= per.max() and abs(per.mean() - m["mse"]) < 0.01 * m["mse"]
  by = {m["name"]: m for m in saved["methods"]}
  # HCP at TR 0.72 s decorrelates within a patch (a parcel's autocorrelation is ~0 at 20
  # timepoints), so carrying visible values across masked patches does worse than the training
  # median, whose R² is ~0; copying a whole patch is worst (~2x the variance).
  assert abs(by["train-median"]["r2"]) < 0.05
  assert (by["train-median"]["mse"] < by["parcel-mean"]["mse"] < by["interpolation"]["mse"]
          < by["nearest-patch"]["mse"])
  assert by["nearest-patch"]["r2"] < -0.5

  # The model's figure is the masked MSE of an independent forward pass on the same masks.
  pre = load_pretrained(str(wd))
  recs = [r for r in datasets.load_recordings(pre.config["data"]["path"], window=200)[0]
          if r.subject in saved["subjects"]]
  sig = np.concatenate([b.signal[:b.n] for b in iter_windows(recs, pre.scaler, window=200)])
  masking = functions.window_maskings(0, 0, len(sig), (94, 10), mode="uniform", ratio=0.5)
  sig = np.concatenate([sig, np.zeros((4,) + sig.shape[1:], np.float32)])  # two batches of 8
  fn = functions.reconstruct_fn(pre.model_cfg)  # compiled already, for batches of 8
  pred = np.concatenate([fn(pre.params, sig[i:i + 8], None, jax.tree_util.tree_map(
      lambda a: np.resize(a[i:i + 8], (8,) + a.shape[1:]), masking))[0] for i in (0, 8)])[:12]
  shape = (12, 94, 10, 20)  # [B, P, T, L]
  loss = masked_loss(pred.reshape(shape), sig[:12].reshape(shape), masking.mask)
  np.testing.assert_allclose(by["model"]["mse"], float(loss), rtol=1e-4)

  md = (tmp_path / "rec" / "evaluate.md").read_text()
  assert "| model | model |" in md and "| interpolation | baseline |" in md
  for png in ("traces.png", "parcel_r2.png"):
    assert (tmp_path / "rec" / png).stat().st_size > 10_000
  assert set(res["report"]) == {"json", "md", "traces", "parcel_r2"}

  # Uniform masking at a high ratio leaves some parcels without a visible patch: counted.
  uni = evaluate.evaluate(pre, recs[:1], mode="uniform", ratio=0.9, batch_size=8)
  mask = functions.window_maskings(0, 0, 6, (94, 10), mode="uniform", ratio=0.9).mask
  assert uni["fallback_tokens"] == int((np.asarray(mask).sum(-1) == 10).sum()) * 10 > 0


def test_forecast_cli_on_hcp(workdir, tmp_path, capsys):  # noqa: F811
  out = tmp_path / "fc"
  argv = ["brainlm-evaluate", f"--checkpoint={workdir[0]}", f"--out={out}", "--mode=forecast",
          "--forecast-patches=2", "--batch-size=8", "--split=all"]
  printed, res = run_cli_report("evaluate", argv, capsys)
  assert "| persistence-value | baseline |" in printed and "| ar | baseline |" in printed
  assert res["split"] == "all" and res["n_windows"] == 42 and res["ar_order"] == 5
  assert [m["name"] for m in res["methods"]] == ["model", *baselines.FORECAST_BASELINES]
  assert res["n_masked_tokens"] == 42 * 94 * 2
  by = {m["name"]: m for m in res["methods"]}
  for name in ("persistence-value", "ar"):  # a good guess one step ahead, worse 40 steps ahead
    h = by[name]["horizon_mse"]
    assert len(h) == 40 and h[0] < 0.75 * by["train-median"]["horizon_mse"][0] and h[0] < h[-1]
  assert (out / "horizon.png").stat().st_size > 10_000
  assert "MSE by forecast horizon" in (out / "evaluate.md").read_text()


def test_glass_brain_with_coordinates(tmp_path):
  if not A424_COORDS.is_file():
    pytest.skip(f"{A424_COORDS} not found")
  coords = load_coordinates(str(A424_COORDS))
  r2 = np.linspace(-0.2, 0.6, len(coords))
  # What evaluate's report draws with coordinates (parcel_r2_brain.png).
  lim = float(np.abs(r2).max())
  plots.plot_parcel_map(r2, coords, str(tmp_path / "brain.png"), title="model per-parcel R² "
                        "(parcel)", label="R² of masked values", cmap="RdBu_r", vmin=-lim,
                        vmax=lim)
  assert (tmp_path / "brain.png").stat().st_size > 20_000


def test_bad_inputs_are_clear_errors(workdir, tmp_path):  # noqa: F811
  out = str(tmp_path / "o")
  with pytest.raises(ckpt_lib.CheckpointError, match="no such checkpoint directory"):
    _evaluate_checkpoint(str(tmp_path / "nope"), out)
  other = tmp_path / "other"
  other.mkdir()
  np.save(other / "sub-01.npy", np.random.default_rng(0).standard_normal((300, 50)))
  with pytest.raises(ValueError, match=r"the checkpoint .* \(pretrained on 94 parcels") as e:
    _evaluate_checkpoint(str(workdir[0]), out, data=str(other))
  assert "shape (300, 50) has no axis with num_parcels=94" in str(e.value)
  np.save(other / "sub-01.npy", np.random.default_rng(0).standard_normal((300, 94)))
  with pytest.raises(ValueError, match="none of the checkpoint's validation subjects"):
    _evaluate_checkpoint(str(workdir[0]), out, data=str(other), split="validation")
  with pytest.raises(ValueError, match="forecast_patches=10 must be in"):
    _evaluate_checkpoint(str(workdir[0]), out, mode="forecast", forecast_patches=10)
  with pytest.raises(FileNotFoundError, match="data not found"):
    _evaluate_checkpoint(str(workdir[0]), out, data=str(tmp_path / "missing"))
