"""Fine-tuning: partial restore of an 8-device checkpoint into a 1-device run, a planted signal
learned, exact resume, layer-wise lr / freezing, baselines, and clear errors for bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainlm_jax.data.datasets import load_recordings
from brainlm_jax.data.scaling import RobustScaler
from brainlm_jax.data.windows import WindowBatch
from brainlm_jax.models import build_model, token_grid
from brainlm_jax.models import masking as masking_lib
from brainlm_jax.models.brainlm import ModelConfig
from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.training import sharding
from brainlm_jax.training import state as state_lib
from brainlm_jax.transfer import finetune
from brainlm_jax.transfer import heads
from brainlm_jax.transfer import tasks
from brainlm_jax.transfer.run import load_pretrained
from configs import finetune as finetune_configs
from configs import pretrain
from tests.conftest import shrink_model

SUBJECTS, PARCELS, TIME, WINDOW = 6, 8, 240, 40


def _write_recordings(root, seed=0):
  """Per-subject parcel amplitudes (the planted identity) on 20-timepoint sinusoids + noise."""
  rng = np.random.default_rng(seed)
  amp = rng.uniform(0.3, 3.0, (SUBJECTS, PARCELS))
  t = np.arange(TIME)[:, None]
  for s in range(SUBJECTS):
    x = amp[s] * np.sin(2 * np.pi * t / 20 + rng.uniform(0, 2 * np.pi, PARCELS))
    x += 0.3 * rng.standard_normal((TIME, PARCELS))
    np.save(root / f"sub-{s:02d}_bold.npy", (100 + x).astype(np.float32))


def _pretrain_config(data_dir):
  c = pretrain.get_config("tiny")
  c.data.path = str(data_dir)
  c.data.window = WINDOW
  c.model.patch_len = 10
  shrink_model(c, 16, num_layers=2)
  c.model.attention = "xla"
  return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A pretraining checkpoint written from an 8-device (data=4, fsdp=2) mesh with pretraining's
  create_train_state + Checkpointer (params sharded over fsdp)."""
  root = tmp_path_factory.mktemp("ft")
  data_dir = root / "data"
  data_dir.mkdir()
  _write_recordings(data_dir)
  config = _pretrain_config(data_dir)
  config.mesh.data, config.mesh.fsdp = 4, 2
  recs, _ = load_recordings(str(data_dir), window=WINDOW)
  scaler = RobustScaler().fit(recs)
  mcfg = state_lib.model_config(config, PARCELS, False)
  mesh = sharding.create_mesh(config.mesh)
  assert mesh.devices.size == 8
  state, _ = state_lib.create_train_state(mcfg, state_lib.make_optimizer(config.train), mesh,
                                          seed=3)
  assert not state.params["cls"].sharding.is_fully_replicated  # really sharded over fsdp
  meta = {"config": json.loads(config.to_json_best_effort()), "model": dataclasses.asdict(mcfg),
          "data": {"seed": 0, "next_step": 5}, "scaler": scaler.to_dict(), "coords": None,
          "subjects": {"train": [r.subject for r in recs[:4]],
                       "validation": [r.subject for r in recs[4:]]}}
  ck = ckpt_lib.Checkpointer(str(root / "pre" / "checkpoints"), async_save=False)
  ck.save(5, state, meta)
  ck.close()
  return root, jax.device_get(state.params)


def _ft_config(**train_overrides):
  c = finetune_configs.get_config("tiny")
  c.mesh.num_devices = 1
  c.train.batch_size = 8
  c.train.num_steps = 150
  c.train.warmup_steps = 10
  c.train.learning_rate = 3e-3
  c.train.layer_decay = 1.0
  c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 50
  c.task.head_hidden = 16
  c.task.head_dropout = 0.0
  c.baselines.random_init = False
  c.data.eval_batch_size = 8
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


def test_partial_restore_8_devices_to_1(pretrained, tmp_path):
  root, saved = pretrained
  config = _ft_config()
  pre = finetune.restore_pretrained(str(root / "pre"), config.model)
  recs = finetune.Finetune(config).select(pre).recordings
  task = tasks.prepare_task(config, pre, recs)
  # Step 1 of the warmup has learning rate 0: the params after it are the restored ones (and the
  # compiled step is the one the next test reuses).
  out = finetune.run_training(config, task, pre, str(tmp_path / "wd"), stop_at_step=1)
  assert not out["finished"] and out["steps"] == 1
  params = out["params"]
  assert set(params) == {"brainlm", "head_hidden", "head_out"}
  # Exactly BrainLM.encode's params: no decoder weights are restored or trained.
  assert set(params["brainlm"]) == {"patch_embed", "spatial", "cls", "mask_token", "encoder"}
  for leaf in jax.tree_util.tree_leaves(params):
    assert len(leaf.sharding.device_set) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(params["brainlm"]),
                         {k: saved[k] for k in params["brainlm"]})
  # A config expecting another shape: the mismatching parameters are named.
  config.model.hidden_size = 32
  with pytest.raises(ckpt_lib.CheckpointError, match="do not match the ModelConfig") as e:
    finetune.restore_pretrained(str(root / "pre"), config.model)
  assert "cls: checkpoint shape (1, 1, 16) vs model shape (1, 1, 32)" in str(e.value)


def test_subject_id_learns_planted_signal(pretrained, tmp_path):
  root, _ = pretrained
  config = _ft_config()
  res = finetune.finetune(config, str(root / "pre"), str(tmp_path / "wd"))
  rows = {(r["name"], r["source"]): r["metrics"] for r in res["rows"]}
  acc = rows[("fine-tuned", "pretrained")]["accuracy"]["mean"]
  assert res["n_test_windows"] == SUBJECTS * 3 and res["classes"] == [
      f"sub-{s:02d}" for s in range(SUBJECTS)]
  assert abs(res["chance"]["balanced_accuracy"] - 1 / SUBJECTS) < 1e-9
  assert acc >= 0.5, res["rows"]  # chance 0.17
  assert rows[("fc linear probe", "fc")]["accuracy"]["mean"] >= 0.0
  lines = [json.loads(l) for l in open(tmp_path / "wd" / "metrics.jsonl")]
  losses = [l["train_loss"] for l in lines if "train_loss" in l]
  assert losses[-1] < 0.8 * np.log(SUBJECTS) and losses[-1] < losses[0], losses  # chance: log 6
  assert lines[0]["step"] == 0 and "test_accuracy" in lines[0]
  md = (tmp_path / "wd" / "finetune.md").read_text()
  assert "| fine-tuned | pretrained |" in md and "*chance / majority*" in md


def test_forecast_resume_is_exact_and_baselines(pretrained, tmp_path):
  root, _ = pretrained
  config = _ft_config(num_steps=6, log_every=2, eval_every=6, checkpoint_every=6)
  config.task.target = "forecast"
  config.train.async_checkpoints = False
  full = finetune.finetune(config, str(root / "pre"), str(tmp_path / "a"))
  first = finetune.finetune(config, str(root / "pre"), str(tmp_path / "b"), stop_at_step=3)
  assert first == {"finished": False, "steps": 3}
  resumed = finetune.finetune(config, str(root / "pre"), str(tmp_path / "b"))
  rows = _means(full)
  assert _means(resumed) == rows
  assert set(rows) == {"fine-tuned", "before fine-tuning", "persistence", "context-mean"}
  assert full["test_subjects"] and not set(full["test_subjects"]) & set(full["train_subjects"])
  # The fine-tuned model moved away from the pretrained one, on the same held-out windows.
  assert rows["fine-tuned"]["mse"] != rows["before fine-tuning"]["mse"]
  saved = json.load(open(tmp_path / "b" / "finetune.json"))
  assert saved["rows"][0]["metrics"]["mse"]["mean"] == pytest.approx(rows["fine-tuned"]["mse"])


def _means(results):
  return {r["name"]: {m: v["mean"] for m, v in r["metrics"].items()} for r in results["rows"]}


def test_persistence_and_context_mean_baselines():
  rng = np.random.default_rng(0)
  sig = rng.standard_normal((3, 2, 40)).astype(np.float32)
  cfg = ModelConfig(num_parcels=2, window=40, patch_len=10, hidden_size=16, num_layers=1,
                    num_heads=2, mlp_dim=32, decoder_hidden_size=16, decoder_num_layers=1,
                    decoder_num_heads=2, decoder_mlp_dim=32)
  # Two batches: the first window alone, then the second beside a padding row (not scored).
  live = np.ones((3, 2), np.float32)
  batches = [WindowBatch(sig[:1], 1, np.zeros(1, np.int64), np.zeros(1, np.int64), live[:1]),
             WindowBatch(sig[1:], 1, np.zeros(1, np.int64), np.ones(1, np.int64), live[1:])]
  rows = {r["name"]: r for r in finetune.forecast_baselines(batches, cfg, 2)}
  assert list(rows) == ["persistence", "context-mean"]
  assert {r["source"] for r in rows.values()} == {"baseline"}
  got = {m: v["mean"] for m, v in rows["persistence"]["metrics"].items()}
  y = sig[:2, :, 20:]
  pred = np.concatenate([sig[:2, :, 10:20]] * 2, axis=-1)  # the last visible patch, twice
  assert got["mse"] == pytest.approx(np.mean((pred - y) ** 2), rel=1e-5)
  assert got["r2"] == pytest.approx(1 - np.sum((pred - y) ** 2) / np.sum((y - y.mean()) ** 2),
                                    rel=1e-5)
  got = {m: v["mean"] for m, v in rows["context-mean"]["metrics"].items()}
  mean = sig[:2, :, :20].mean(-1, keepdims=True)
  assert got["mse"] == pytest.approx(np.mean((mean - y) ** 2), rel=1e-5)


@pytest.mark.parametrize("variant", ["brainlm", "brainlm_nystrom", "vitmae_image"])
def test_encoder_head_wraps_every_variant(variant):
  """Converted checkpoints (brainlm-convert) fine-tune too: the head's 'brainlm' subtree is the
  variant's encode() params, and the head's output is a function of its encoding."""
  cfg = ModelConfig(num_parcels=6, window=40, patch_len=10, hidden_size=16, num_layers=2,
                    num_heads=2, mlp_dim=32, decoder_hidden_size=16, decoder_num_layers=1,
                    decoder_num_heads=2, decoder_mlp_dim=32, attention="xla", variant=variant,
                    num_landmarks=0, image_size=40 if variant == "vitmae_image" else 0)
  signal = np.random.default_rng(0).normal(size=(2, 6, 40)).astype(np.float32)
  coords = np.random.default_rng(1).uniform(-50, 50, (6, 3)).astype(np.float32)
  masking = masking_lib.no_masking(2, *token_grid(cfg))
  head = heads.EncoderHead(cfg, 3, head_hidden=0, pooling="cls")
  params = head.init(jax.random.PRNGKey(0), signal, coords, masking)["params"]
  model = build_model(cfg)
  enc = model.init(jax.random.PRNGKey(0), signal, coords, masking, method=model.encode)["params"]
  assert jax.tree_util.tree_structure(params["brainlm"]) == jax.tree_util.tree_structure(enc)
  out = head.apply({"params": params}, signal, coords, masking)
  latent = model.apply({"params": params["brainlm"]}, signal, coords, masking, method=model.encode)
  want = latent[:, 0] @ params["head_out"]["kernel"] + params["head_out"]["bias"]
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_layer_decay_and_freezing():
  params = {"brainlm": {"cls": jnp.zeros((1, 1, 4)), "patch_embed": {"kernel": jnp.zeros((2, 4))},
                        "encoder": {"layer_0": {"w": jnp.zeros(3)}, "layer_1": {"w": jnp.zeros(3)},
                                    "ln_final": {"scale": jnp.zeros(4)}}},
            "head_out": {"kernel": jnp.zeros((4, 2))}}
  scale, trainable = heads.layer_scales(params, 2, 0.5, "top:1")
  b = scale["brainlm"]
  assert float(b["cls"]) == 0.125 and float(b["encoder"]["layer_0"]["w"]) == 0.25
  assert float(b["encoder"]["layer_1"]["w"]) == 0.5 and float(scale["head_out"]["kernel"]) == 1
  assert float(b["encoder"]["ln_final"]["scale"]) == 1
  t = trainable["brainlm"]
  assert [float(t["cls"]), float(t["encoder"]["layer_0"]["w"]),
          float(t["encoder"]["layer_1"]["w"]), float(trainable["head_out"]["kernel"])] == [0, 0,
                                                                                          1, 1]
  # Scanned blocks: one scale per layer along the stacked axis.
  stacked = {"encoder": {"layers": {"w": jnp.zeros((3, 5, 2))}}}
  s, m = heads.layer_scales(stacked, 3, 0.5, "top:2")
  np.testing.assert_allclose(np.broadcast_to(s["encoder"]["layers"]["w"], (3, 5, 2))[:, 0, 0],
                             [0.125, 0.25, 0.5])
  np.testing.assert_array_equal(np.ravel(m["encoder"]["layers"]["w"]), [0, 1, 1])
  _, m = heads.layer_scales(stacked, 3, 0.5, "bottom:1")
  np.testing.assert_array_equal(np.ravel(m["encoder"]["layers"]["w"]), [1, 0, 0])
  _, m = heads.layer_scales(params, 2, 0.5, "bottom:1")
  assert [float(m["brainlm"]["cls"]), float(m["brainlm"]["encoder"]["layer_0"]["w"]),
          float(m["brainlm"]["encoder"]["layer_1"]["w"]),
          float(m["brainlm"]["encoder"]["ln_final"]["scale"])] == [1, 1, 0, 1]
  _, m = heads.layer_scales(params, 2, 0.5, "head")
  assert float(m["brainlm"]["encoder"]["layer_1"]["w"]) == 0 and float(m["head_out"]["kernel"]) == 1
  # Through the optimizer: frozen leaves never move (weight decay included), the others do.
  c = _ft_config()
  c.train.trainable, c.train.warmup_steps, c.train.weight_decay = "top:1", 0, 0.5
  tx = heads.make_optimizer(c.train, params, 2)
  ones = jax.tree_util.tree_map(jnp.ones_like, params)
  new = jax.tree_util.tree_map(lambda p: p + 1.0, params)
  upd, _ = tx.update(ones, tx.init(new), new)
  assert float(jnp.abs(upd["brainlm"]["cls"]).max()) == 0
  assert float(jnp.abs(upd["brainlm"]["encoder"]["layer_0"]["w"]).max()) == 0
  assert float(jnp.abs(upd["brainlm"]["encoder"]["layer_1"]["w"]).max()) > 0


def test_bad_input_is_a_clear_error(pretrained, tmp_path):
  root, _ = pretrained
  pre = load_pretrained(str(root / "pre"))
  config = _ft_config()
  recs = finetune.Finetune(config).select(pre).recordings
  pheno = tmp_path / "participants.tsv"
  pheno.write_text("participant_id\tage\tsite\n" + "".join(
      f"sub-{s:02d}\t{20.5 + 7 * s}\tA\n" for s in range(SUBJECTS)))
  config.data.phenotypes = str(pheno)
  config.task.target = "iq"
  with pytest.raises(ValueError, match=r"participants.tsv: no target column .*'iq'.*available "
                     "columns: participant_id, age, site"):
    tasks.prepare_task(config, pre, recs)
  config.task.target = "site"
  with pytest.raises(ValueError, match="'site' is constant: all 6 subject"):
    tasks.prepare_task(config, pre, recs)
  config.task.target, config.data.folds = "age", 10
  with pytest.raises(ValueError, match=r"only 6 subject\(s\) have a 'age' value but "
                     "data.folds=10"):
    tasks.prepare_task(config, pre, recs)
  config.data.folds = 3
  task = tasks.prepare_task(config, pre, recs)
  assert task.kind == "regression" and len({r.subject for r in task.test}) == 2
  assert not {r.subject for r in task.test} & {r.subject for r in task.train}
  config.task.type = "classification"  # six classes of one subject each
  with pytest.raises(ValueError, match="cannot split the 6 subjects .* into data.folds=3"):
    tasks.prepare_task(config, pre, recs)
  config.data.phenotypes = ""
  with pytest.raises(ValueError, match="needs --config.data.phenotypes"):
    tasks.prepare_task(config, pre, recs)
  config.task.target, config.data.train_fraction = "subject-id", 0.9
  with pytest.raises(ValueError, match="subject-id needs at least 2 subjects"):
    tasks.prepare_task(config, pre, recs)
