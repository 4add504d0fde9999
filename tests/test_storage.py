"""Workdirs in a bucket: every run file goes through `training.storage` (etils.epath).

The non-local scheme here is TensorFlow's in-memory filesystem, ram:// (tf.io.gfile, no
network): the trainer's own files and the TensorBoard writer reach it the way they reach gs:// in
a real run (epath sends gs:// to tf.io.gfile as well, TensorFlow being installed).

Orbax is not tested on a non-local scheme: offline there is none it can write. It writes arrays
through TensorStore, which it opens with the `file` driver (local paths) or the `gcs` driver
(gs://: real Cloud Storage with credentials, which would mean network); TensorStore has no driver
for TensorFlow's ram://, Orbax builds no spec for TensorStore's own `memory://` kvstore, and epath
(Orbax's directory operations) knows neither scheme. So the checkpoints of the run below go to a
local directory, and `Checkpointer` refuses ram:// with one line.
"""

import json
import os
import uuid

import numpy as np
import pytest
import tensorflow as tf

from brainlm_jax.cli import common
from brainlm_jax.data.scaling import RobustScaler
from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.training import pretrain
from brainlm_jax.training import storage
from brainlm_jax.transfer import plots
from brainlm_jax.transfer import report
from brainlm_jax.transfer.visualize import read_metrics
from tests.conftest import tiny_config


def _ram(name):
  """A fresh ram:// directory (the in-memory filesystem lives as long as the process)."""
  return f"ram://{name}-{uuid.uuid4().hex[:8]}"


def test_paths_local_and_in_a_bucket(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.resolve("runs/a") == str(tmp_path / "runs" / "a")  # local: absolute, as before
  assert storage.resolve("file:///x/y") == "/x/y"
  assert storage.resolve("gs://bucket/runs/a/") == "gs://bucket/runs/a"  # a URI: as given
  assert storage.join("gs://bucket/runs/a", "checkpoints", "40") == (
      "gs://bucket/runs/a/checkpoints/40")
  assert storage.dirname("gs://bucket/runs/a/checkpoints") == "gs://bucket/runs/a"
  assert storage.basename("gs://bucket/runs/a/checkpoints/40/") == "40"
  assert storage.scheme("gs://b/x") == "gs" and storage.is_local("/x") and storage.is_local("x")
  with pytest.raises(ValueError, match=r"nope://x: no filesystem for 'nope://' \(a local path "
                                       r"or one of .*gs://.*ram://"):
    storage.resolve("nope://x")


def test_files_in_memory_and_clear_errors(tmp_path):
  run = _ram("files")
  storage.makedirs(storage.join(run, "sub"))
  storage.write_text(storage.join(run, "config.json"), '{"a": 1}')
  for line in ("1\n", "2\n"):  # metrics.jsonl's appends, each in its own open
    with storage.open_file(storage.join(run, "metrics.jsonl"), "a") as f:
      f.write(line)
  assert storage.listdir(run) == ["config.json", "metrics.jsonl", "sub"]
  assert storage.isdir(storage.join(run, "sub"))
  assert storage.isfile(storage.join(run, "config.json"))
  assert tf.io.gfile.GFile(f"{run}/metrics.jsonl").read() == "1\n2\n"  # the same filesystem
  with pytest.raises(FileNotFoundError, match=f"{run}/missing.json: no such file"):
    storage.read_text(storage.join(run, "missing.json"))

  (tmp_path / "file").write_text("")
  with pytest.raises(storage.StorageError, match=r"file/sub: cannot create the directory: "
                                                 r"NotADirectoryError"):
    storage.makedirs(tmp_path / "file" / "sub")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"Orbax checkpoints need a local directory "
                                                     r"or gs://, not ram://"):
    ckpt_lib.Checkpointer(storage.join(run, "checkpoints"))


def test_bad_workdirs_are_one_line(tmp_path):
  """What brainlm-pretrain's main prints for a workdir it cannot use: one line, no traceback."""
  (tmp_path / "file").write_text("")
  for workdir, expected in (("nope://bucket/run", "no filesystem for 'nope://'"),
                            (str(tmp_path / "file" / "run"), "cannot create the directory")):
    main = common.main_with_clear_errors(
        lambda argv, w=workdir: pretrain.train_and_evaluate(tiny_config("unused"), w),
        "brainlm-pretrain")
    with pytest.raises(SystemExit) as exit_:
      main(["brainlm-pretrain"])
    message = str(exit_.value.code)
    assert message.startswith(f"brainlm-pretrain: error: {workdir}") and expected in message
    assert "\n" not in message


def test_a_report_with_figures_in_memory():
  """A transfer job's output directory (e.g. an evaluator's WORKDIR/evals/NAME/step_N)."""
  out = storage.join(_ram("report"), "evals", "probe", "step_4")

  def draw(path):
    fig = plots.figure(2, 2)
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    return plots.save(fig, path)

  paths = report.write_report({"score": np.float32(0.5)}, out, "probe", "# probe",
                              figures={"png": ("probe.png", draw)})
  assert json.loads(storage.read_text(paths["json"])) == {"score": 0.5}
  assert storage.read_text(paths["md"]) == "# probe\n"
  with storage.open_file(paths["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  plots.write_tensorboard_images({"probe": paths["png"]}, storage.join(out, "tensorboard"), 4)
  assert tf.io.gfile.glob(f"{out}/tensorboard/events.out.tfevents.*")


def test_pretraining_with_its_workdir_in_memory(hcp_dir, tmp_path, monkeypatch):
  """A short `tiny` run, stopped and resumed, with WORKDIR=ram://...: every run file is there
  (read back through storage and tf.io.gfile), metrics.jsonl has both invocations' rows, nothing
  leaked to a local 'ram:' folder. Checkpoints: a local directory (see the module docstring)."""
  workdir = _ram("run")
  seen = []

  class LocalCheckpoints(ckpt_lib.Checkpointer):
    def __init__(self, directory, **kw):
      seen.append(directory)
      super().__init__(str(tmp_path / "checkpoints"), **kw)

  monkeypatch.setattr(ckpt_lib, "Checkpointer", LocalCheckpoints)
  monkeypatch.chdir(tmp_path)
  config = tiny_config(hcp_dir, steps=4)
  config.train.log_every = config.train.eval_every = 2
  pretrain.train_and_evaluate(config, workdir, stop_at_step=2)
  last = pretrain.train_and_evaluate(config, workdir + "/")  # resumes at step 2
  assert seen == [f"{workdir}/checkpoints"] * 2
  ckpt = LocalCheckpoints(f"{workdir}/checkpoints", async_save=False)
  assert ckpt.all_steps() == [2, 4]
  ckpt.close()

  assert {"config.json", "data_report.json", "metrics.jsonl", "normalization.json",
          "tensorboard"} <= set(storage.listdir(workdir))
  rows = [json.loads(l) for l in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows] == [0, 2, 4] and rows[-1]["eval_loss"] == last["eval_loss"]
  assert read_metrics(f"{workdir}/metrics.jsonl")["train_loss"][0].tolist() == [2, 4]
  saved = json.loads(tf.io.gfile.GFile(f"{workdir}/config.json").read())
  assert saved["train"]["num_steps"] == 4 and saved["model"] == json.loads(
      config.to_json_best_effort())["model"]
  assert json.loads(storage.read_text(f"{workdir}/data_report.json"))["train"]
  assert RobustScaler.load(f"{workdir}/normalization.json").num_parcels == 94
  assert tf.io.gfile.glob(f"{workdir}/tensorboard/events.out.tfevents.*")
  assert not os.path.exists(tmp_path / "ram:")
