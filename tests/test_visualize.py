"""brainlm-visualize: per-parcel R² and CLS attention against references, network grouping, PCA,
metrics reading, and an end-to-end run on a few-step checkpoint trained on the real HCP data."""

import dataclasses
import glob
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import r2_score

from brainlm_jax.models import masking as masking_lib
from brainlm_jax.models.brainlm import BrainLM, ModelConfig, sinusoid_table
from brainlm_jax.training import metrics as metrics_lib
from brainlm_jax.training.state import init_params
from brainlm_jax.transfer import functions
from brainlm_jax.transfer import plots
from brainlm_jax.transfer import visualize
from brainlm_jax.transfer.run import load_pretrained
from tests.conftest import run_cli_report
from tests.test_probe import STEP, workdir  # noqa: F401  (a pytest fixture)

TINY = ModelConfig(num_parcels=6, window=40, patch_len=10, hidden_size=16, num_layers=2,
                   num_heads=2, mlp_dim=32, decoder_hidden_size=16, decoder_num_layers=1,
                   decoder_num_heads=2, decoder_mlp_dim=32, spatial="learned", attention="xla")


def _parcel_sums(pred, target, mask, weight=None):
  """Per-parcel masked statistics, as visualize's reconstruction pass sums them (float32)."""
  return metrics_lib.to_host(metrics_lib.masked_sums(
      jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), jnp.asarray(mask),
      None if weight is None else jnp.asarray(weight, jnp.float32), per_parcel=True))


def test_parcel_r2_matches_sklearn_on_masked_values():
  rng = np.random.default_rng(0)
  target = rng.standard_normal((5, 4, 3, 2))
  noise = np.array([0.1, 0.5, 1.0, 2.0])[None, :, None, None]
  pred = target + noise * rng.standard_normal(target.shape)
  mask = (rng.uniform(size=(5, 4, 3)) < 0.6).astype(np.float32)
  weight = np.array([1, 1, 1, 1, 0.0])  # the last window is padding
  sums = _parcel_sums(pred, target, mask, weight)
  assert sums["n"].shape == (4,)
  r2 = metrics_lib.reduce_sums(sums)["r2"]
  for p in range(4):
    sel = (mask[:4, p] > 0)  # [4, T]
    ref = r2_score(target[:4, p][sel].ravel(), pred[:4, p][sel].ravel())
    np.testing.assert_allclose(r2[p], ref, rtol=1e-5)  # float32 sums
  assert r2[0] > 0.9 > r2[1] > r2[2] > r2[3]  # more noise, lower R²
  # Summed over parcels, the statistics give the pooled R² of metrics.masked_sums.
  pooled = metrics_lib.reduce_sums({k: v.sum() for k, v in sums.items()})
  ref = metrics_lib.reduce_sums(metrics_lib.to_host(metrics_lib.masked_sums(
      jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), jnp.asarray(mask),
      jnp.asarray(weight, jnp.float32))))
  np.testing.assert_allclose(pooled["r2"], ref["r2"], rtol=1e-5)
  # A parcel with no masked value has no R² (NaN), not a crash.
  mask[:, 0] = 0
  assert np.isnan(metrics_lib.reduce_sums(_parcel_sums(pred, target, mask))["r2"][0])


def test_cls_attention_to_parcels_sums_per_parcel():
  # 2 parcels x 3 patches; visible tokens 0, 2 (parcel 0) and 4 (parcel 1).
  cls_row = np.array([[0.2, 0.1, 0.3, 0.4]])
  out = visualize.cls_attention_to_parcels(cls_row, np.array([[0, 2, 4]]), 2, 3)
  np.testing.assert_allclose(out, [[0.5, 0.5]])  # (0.1 + 0.3) / 0.8, 0.4 / 0.8


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _ln(x, p, eps):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _brute_force_cls_attention(params, signal, cfg):
  """NumPy forward of the unmasked encoder up to the last layer's attention probabilities."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  b, t = signal.shape[0], cfg.num_patches
  x = signal.reshape(b, cfg.num_parcels, t, cfg.patch_len) @ p["patch_embed"]["kernel"]
  x = x + p["patch_embed"]["bias"] + p["spatial"]["table"][None, :, None]
  x = (x + sinusoid_table(t, cfg.hidden_size)[None, None]).reshape(b, -1, cfg.hidden_size)
  x = np.concatenate([np.broadcast_to(p["cls"], (b, 1, cfg.hidden_size)), x], axis=1)

  def probs(layer, h):
    a = layer["attention"]
    q = np.einsum("bsd,dhk->bshk", h, a["query"]["kernel"]) + a["query"]["bias"]
    k = np.einsum("bsd,dhk->bshk", h, a["key"]["kernel"]) + a["key"]["bias"]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  for i in range(cfg.num_layers):
    layer = p["encoder"][f"layer_{i}"]
    h = _ln(x, layer["ln_attention"], cfg.layer_norm_eps)
    if i == cfg.num_layers - 1:
      return probs(layer, h)[:, :, 0].mean(axis=1)  # CLS row, mean over heads [B, 1 + N]
    a = layer["attention"]
    v = np.einsum("bsd,dhk->bshk", h, a["value"]["kernel"]) + a["value"]["bias"]
    o = np.einsum("bhqk,bkhd->bqhd", probs(layer, h), v)
    x = x + np.einsum("bqhd,hdo->bqo", o, a["out"]["kernel"]) + a["out"]["bias"]
    h = _ln(x, layer["ln_mlp"], cfg.layer_norm_eps)
    h = _gelu(h @ layer["mlp_in"]["kernel"] + layer["mlp_in"]["bias"])
    x = x + h @ layer["mlp_out"]["kernel"] + layer["mlp_out"]["bias"]


def test_analysis_matches_brute_force_attention_and_direct_reconstruction():
  params = init_params(TINY, seed=3)
  signal = np.random.default_rng(1).standard_normal((3, 6, 40)).astype(np.float32)
  cls_row = jax.device_get(functions.attention_fn(TINY)(params, signal, None))
  ref = _brute_force_cls_attention(params, signal, TINY)
  np.testing.assert_allclose(cls_row, ref, atol=2e-5)
  np.testing.assert_allclose(cls_row.sum(-1), 1.0, atol=1e-5)
  per_parcel = visualize.cls_attention_to_parcels(
      cls_row, np.broadcast_to(np.arange(24), (3, 24)), 6, 4)
  np.testing.assert_allclose(per_parcel.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(per_parcel, ref[:, 1:].reshape(3, 6, 4).sum(-1)
                             / ref[:, 1:].sum(-1, keepdims=True), atol=2e-5)
  # The reconstruction is the model's own forward pass with the same masking, in the signal's
  # layout [B, P, W]; its mask repeats the token mask over each patch's values.
  m = masking_lib.make_masking(jax.random.PRNGKey(7), 3, 6, 4, mode="parcel", ratio=0.5)
  pred, mask = jax.device_get(functions.reconstruct_fn(TINY)(params, signal, None, m))
  direct, _ = BrainLM(TINY).apply({"params": params}, signal, None, m)
  assert pred.shape == mask.shape == (3, 6, 40)
  np.testing.assert_allclose(pred.reshape(direct.shape), direct, atol=1e-5)
  np.testing.assert_array_equal(mask.reshape(3, 6, 4, 10), np.repeat(
      np.asarray(m.mask)[..., None], 10, axis=-1))
  assert (np.asarray(m.mask).sum(-1) == 2).all()  # parcel masking: half of each parcel's patches


def test_unscanned_unstacks_layer_params():
  scanned = dataclasses.replace(TINY, scan_layers=True, remat="dots")
  stacked = {"w": np.arange(6.0).reshape(2, 3), "ln": {"scale": np.ones((2, 4))}}
  params = {"cls": np.zeros(3), "encoder": {"layers": stacked, "ln_final": {"scale": 1.0}},
            "decoder": {"layers": jax.tree_util.tree_map(lambda a: a[:1], stacked)}}
  cfg, out = functions.unscanned(scanned, params)
  assert cfg == dataclasses.replace(TINY, remat="none")
  assert sorted(out["encoder"]) == ["layer_0", "layer_1", "ln_final"]
  np.testing.assert_array_equal(out["encoder"]["layer_1"]["w"], [3.0, 4.0, 5.0])
  assert out["encoder"]["layer_0"]["ln"]["scale"].shape == (4,)
  assert sorted(out["decoder"]) == ["layer_0"] and "layers" in params["encoder"]  # not mutated
  assert functions.unscanned(TINY, params) == (TINY, params)


def test_group_by_network_orders_yeo7_and_keeps_values():
  values = np.arange(7.0)
  nets = ["Default", "Vis", "SomMot", "Default", "Subcortical", "Cont", "visual"]
  groups = visualize.group_by_network(values, nets)
  assert [n for n, _ in groups] == ["Visual", "Somatomotor", "Frontoparietal", "Default",
                                    "Subcortical"]
  got = {n: sorted(v.tolist()) for n, v in groups}
  assert got == {"Visual": [1.0, 6.0], "Somatomotor": [2.0], "Frontoparietal": [5.0],
                 "Default": [0.0, 3.0], "Subcortical": [4.0]}
  with pytest.raises(ValueError, match="3 network labels for 7 parcels"):
    visualize.group_by_network(values, nets[:3])


def test_embedding_pca_separates_planted_groups():
  rng = np.random.default_rng(0)
  subjects = np.repeat([f"s{i}" for i in range(6)], 4)
  shift = np.repeat([0, 0, 0, 5, 5, 5], 4)[:, None] * np.eye(8)[0]
  emb = rng.standard_normal((24, 8)) * 0.3 + shift
  pc = visualize.embedding_pca(emb, subjects)
  assert pc.fit_on == "subject means" and pc.subjects == [f"s{i}" for i in range(6)]
  assert pc.windows.shape == (24, 2) and pc.means.shape == (6, 2)
  assert pc.explained[0] > 0.9
  gap = abs(pc.means[:3, 0].mean() - pc.means[3:, 0].mean())
  assert gap > 4 and np.ptp(pc.means[:3, 0]) < 1.5
  # The subject means' projection is the mean of their windows' projections (linear map).
  np.testing.assert_allclose(pc.means[0], pc.windows[:4].mean(0), atol=1e-9)
  two = visualize.embedding_pca(emb[:8], subjects[:8])  # 2 subjects: fit on windows
  assert two.fit_on == "windows" and two.means.shape == (2, 2)


def test_readers_and_parcel_parsing(tmp_path):
  m = tmp_path / "metrics.jsonl"
  m.write_text('{"step": 0, "eval_loss": 0.9, "eval_r2": -0.4}\n'
               '{"step": 25, "train_loss": 0.7, "grad_norm": 0.2}\nnot json\n'
               '{"step": 25, "train_loss": 0.6, "grad_norm": 0.1}\n'  # a resumed run
               '{"step": 50, "train_loss": 0.5, "eval_loss": 0.6, "eval_r2": 0.1}\n')
  got = visualize.read_metrics(str(m))
  np.testing.assert_array_equal(got["train_loss"][0], [25, 50])
  np.testing.assert_allclose(got["train_loss"][1], [0.6, 0.5])
  np.testing.assert_allclose(got["eval_r2"][1], [-0.4, 0.1])
  lab = tmp_path / "yeo.tsv"
  lab.write_text("parcel\tnetwork\nV1\tVisual\nM1\tSomMot\nPCC\tDefault\n")
  names, nets = visualize.read_network_labels(str(lab), 3)
  assert names == ["V1", "M1", "PCC"] and nets == ["Visual", "SomMot", "Default"]
  with pytest.raises(ValueError, match=r"yeo.tsv: 3 parcel rows, but the model has 4"):
    visualize.read_network_labels(str(lab), 4)
  assert visualize.parse_parcels("pcc, 0", names) == [2, 0]
  assert visualize.parse_parcels(None, names, np.array([0.1, 0.5, -0.2])) == [1, 0, 2]
  with pytest.raises(ValueError, match="'7' is neither a parcel index in \\[0, 2\\]"):
    visualize.parse_parcels("7", names)


def _non_white(png):
  from matplotlib import image  # pylint: disable=import-outside-toplevel
  img = image.imread(png)[..., :3]
  return float((img.min(-1) < 0.9).mean())


def test_parcel_map_without_coordinates_is_a_titled_bar_plot(tmp_path):
  path = plots.plot_parcel_map(np.linspace(-0.2, 0.6, 94), None, str(tmp_path / "m.png"),
                                   title="R² per parcel", label="R²")
  assert _non_white(path) > 0.03


@pytest.fixture(scope="module")
def run_dir(workdir):
  """(workdir, subjects): test_probe's checkpoint of the tiny model on the real HCP data, plus the
  metrics.jsonl that train_and_evaluate would have written beside it."""
  wd = workdir[0]
  writer = metrics_lib.MetricWriter(str(wd))
  for step in range(0, STEP + 1):
    writer.write(step, {"train_loss": 1 / (1 + step), "grad_norm": 0.1,
                        "eval_loss": 0.9 / (1 + step), "eval_r2": step / 10})
  writer.close()
  subjects = load_pretrained(str(wd)).subjects
  return wd, sorted(subjects["train"] + subjects["validation"])


def test_end_to_end_on_hcp(run_dir, tmp_path, capsys):
  """The CLI (in-process) on the real recordings: every figure, TensorBoard images, the JSON."""
  rng = np.random.default_rng(0)
  coords = tmp_path / "coords.txt"  # made-up MNI points, for the glass-brain path
  coords.write_text("".join(f"{i + 1} {x:.1f} {y:.1f} {z:.1f}\n" for i, (x, y, z) in enumerate(
      rng.uniform([-60, -90, -30], [60, 60, 70], (94, 3)))))
  labels = tmp_path / "networks.csv"
  labels.write_text("".join(f"roi{i},{visualize.YEO7[i % 7]}\n" for i in range(94)))
  run_dir, subjects = run_dir
  pheno = tmp_path / "participants.tsv"
  pheno.write_text("participant_id\tage\n" + "".join(f"{s}\t{22 + 2 * i}\n"
                                                     for i, s in enumerate(subjects)))
  out = tmp_path / "viz"
  argv = ["brainlm-visualize", f"--checkpoint={run_dir}", f"--out={out}", "--split=all",
          f"--coords={coords}", f"--network-labels={labels}", f"--phenotypes={pheno}",
          "--color-by=age", "--parcels=roi5,17", "--max-windows=24", "--tr=0.72"]
  printed, s = run_cli_report("visualize", argv, capsys)
  assert "pooled R²" in printed and "traced parcels: roi5, roi17" in printed
  assert s["checkpoint"]["step"] == STEP and s["n_windows"] == 24 and len(s["subjects"]) == 7
  assert s["coordinates"] == "from --coords" and s["mask_ratio"] == 0.5
  att = np.array([p["cls_attention"] for p in s["parcels"]])
  np.testing.assert_allclose(att.sum(), 1.0, atol=1e-5)
  r2 = np.array([p["r2"] for p in s["parcels"]])
  assert np.isfinite(r2).all() and (r2 < 1).all()
  expected = {"traces", "r2_map", "cls_attention_map", "cls_attention_networks",
              "embeddings_pca", "training_curves"}
  assert set(s["png"]) == expected
  for name, png in s["png"].items():
    assert _non_white(png) > 0.02, name  # drawn, not blank
  events = glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
  assert events
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=C0415
  acc = event_accumulator.EventAccumulator(str(out / "tensorboard"),
                                           size_guidance={"images": 0, "tensors": 0})
  acc.Reload()
  tags = set(acc.Tags()["images"]) | set(acc.Tags()["tensors"])
  assert expected <= tags, tags


def test_masked_r2_does_not_depend_on_the_batch_size(workdir):  # noqa: F811
  """Window i is masked from (seed, i) whatever batch it falls in, and padding is not scored:
  the reconstruction pass gives the same R² for any --batch-size (5 leaves a padded last batch
  of 4; 16 one of 8). Equal up to float32 rounding: XLA compiles each batch shape on its own
  and the float32 per-batch sums add the same values in another order (~1e-6 relative), where
  other masks change the masked values themselves (checked with another seed)."""
  pre = load_pretrained(str(workdir[0]))
  recs = visualize.Visualize(split="all").select(pre).recordings
  a, b = [visualize.analyse(pre, recs, batch_size=bs, max_windows=24) for bs in (5, 16)]
  for run in (a, b):
    assert run.n_windows == 24 and run.r2.shape == (94,) and np.isfinite(run.r2).all()
  np.testing.assert_array_equal(a.example["mask"], b.example["mask"])
  # XLA compiles each batch shape on its own: the predictions agree to float32 rounding.
  np.testing.assert_allclose(a.example["pred"], b.example["pred"], atol=1e-5)
  np.testing.assert_array_equal(a.sums["n"], b.sums["n"])  # counts: exact in float32
  for k in ("sy", "syy", "sse"):  # the same masked values of the same windows
    np.testing.assert_allclose(a.sums[k], b.sums[k], rtol=2e-5, atol=1e-3, err_msg=k)
  print("max |R² difference| over parcels:", np.abs(a.r2 - b.r2).max())
  np.testing.assert_allclose(a.r2, b.r2, rtol=0, atol=1e-5)
  assert abs(a.r2.mean() - b.r2.mean()) < 1e-6
  # Masks drawn per batch (what the old visualize did) would not pass: another seed's masks
  # change the masked values.
  other = visualize.analyse(pre, recs, batch_size=16, max_windows=24, seed=1)
  assert np.abs(other.sums["sy"] - b.sums["sy"]).max() > 1.0
