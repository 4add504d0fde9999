"""Every launcher's dry run prints the command it would run (and runs nothing)."""

import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

LAUNCH = REPO / "launch"


def _dry(script, *args, env=None):
  r = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                     env={**os.environ, "XLA_FLAGS": "", **(env or {})}, timeout=30, check=False, cwd="/")
  assert r.returncode == 0, r.stderr
  return [shlex.split(l[2:]) for l in r.stdout.splitlines() if l.startswith("+ ")]


def _pretrain_tail(cmd, preset, workdir):
  i = cmd.index("brainlm-pretrain")
  assert cmd[i + 1:i + 5] == ["--config", f"configs/pretrain.py:{preset}", "--workdir", workdir]
  return cmd[i + 5:]


def test_local():
  (cmd,) = _dry("local.sh", "tiny", "runs/t", "--cpu-devices", "8", "--dry-run",
                "--config.mesh.fsdp=2")
  assert _pretrain_tail(cmd, "tiny", "runs/t") == ["--config.mesh.fsdp=2"]


def test_multiprocess_cpu():
  cmds = _dry("multiprocess_cpu.sh", "3", "2", "tiny", "runs/m", "--port", "4321", "--dry-run",
              "--config.train.num_steps=5")
  assert len(cmds) == 3
  for i, cmd in enumerate(cmds):
    assert cmd[:2] == ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2"]
    assert _pretrain_tail(cmd, "tiny", "runs/m")[:4] == [
        "--coordinator_address=localhost:4321", "--num_processes=3", f"--process_id={i}",
        "--config.train.num_steps=5"]


def _preflight(cmd, preset, topology, slices):
  i = cmd.index("brainlm-bench")
  assert "JAX_PLATFORMS=cpu" in cmd[:i]
  tail = cmd[i + 1:]
  assert tail[:7] == ["--config", f"configs/pretrain.py:{preset}", "--topology", topology,
                      "--slices", str(slices), "--preflight"]
  return tail[7:]


def test_tpu_vm():
  cmds = _dry("tpu_vm.sh", "pod", "us-east5-a", "650m", "gs://b/r", "--project", "p", "--setup",
              "--topology", "v5p-64", "--dry-run", "--config.data.path=gs://b/data dir")
  assert len(cmds) == 3  # preflight compile here, setup, then the run
  assert _preflight(cmds[0], "650m", "v5p-64", 1) == ["--config.data.path=gs://b/data dir"]
  run = cmds[2]
  assert run[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
  assert run[5] == "pod" and "--worker=all" in run and run[run.index("--zone") + 1] == "us-east5-a"
  assert run[run.index("--project") + 1] == "p"
  remote = shlex.split(run[run.index("--command") + 1].split("&&")[-1])
  assert _pretrain_tail(remote, "650m", "gs://b/r") == [
      "--distributed=on", "--config.data.path=gs://b/data dir"]  # quoting survives


def test_slurm():
  cmds = _dry("slurm_gpu.sbatch", "111m", "/shared/r", "--config.model.dtype=bfloat16",
              env={"DRY_RUN": "1", "SLURM_JOB_ID": ""})
  sbatch, srun = cmds
  assert sbatch[:2] == ["sbatch", "--nodes=2"]
  assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
  assert _pretrain_tail(srun, "111m", "/shared/r") == ["--config.model.dtype=bfloat16"]


def test_gke_xpk():
  check, cmd = _dry("gke_xpk.sh", "cl", "wl", "650m", "gs://b/r", "--device-type", "v5p-128",
                     "--docker-image", "img", "--num-slices", "2", "--dry-run")
  assert _preflight(check, "650m", "v5p-128", 2) == []
  assert cmd[:3] == ["xpk", "workload", "create"]
  # GPU node pools have no TPU compile to check; --no-preflight skips it.
  (gpu,) = _dry("gke_xpk.sh", "cl", "wl", "111m", "r", "--device-type", "h100-80gb-8",
                "--docker-image", "img", "--dry-run")
  (skip,) = _dry("gke_xpk.sh", "cl", "wl", "111m", "r", "--device-type", "v5e-16",
                 "--docker-image", "img", "--no-preflight", "--dry-run")
  assert gpu[0] == skip[0] == "xpk"
  for flag, value in (("--cluster", "cl"), ("--workload", "wl"), ("--device-type", "v5p-128"),
                      ("--num-slices", "2"), ("--docker-image", "img")):
    assert cmd[cmd.index(flag) + 1] == value
  remote = shlex.split(cmd[cmd.index("--command") + 1].split("&&")[-1])
  assert _pretrain_tail(remote, "650m", "gs://b/r") == ["--distributed=on"]


@pytest.mark.parametrize("script", ["local.sh", "multiprocess_cpu.sh", "tpu_vm.sh", "gke_xpk.sh"])
def test_usage_without_arguments(script):
  r = subprocess.run(["bash", str(LAUNCH / script)], capture_output=True, text=True, timeout=30,
                     check=False)
  assert r.returncode == 2 and script.split(".")[0] in r.stdout


@pytest.mark.slow  # 4 min: the refusal compiles the batch search
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (.[tpu])")
def test_preflight_refuses_a_step_that_does_not_fit(tmp_path):
  """A real preflight: the tiny preset at a batch that cannot fit 4 v5e chips' HBM is refused
  before anything is launched, in one line naming a batch that fits (found by compiling)."""
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "xpk").write_text("#!/bin/sh\necho launched > " + str(tmp_path / "launched") + "\n")
  (fake / "xpk").chmod(0o755)
  env = {**os.environ, "PATH": f"{fake}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
         "XLA_FLAGS": ""}
  r = subprocess.run(
      ["bash", str(LAUNCH / "gke_xpk.sh"), "cl", "wl", "tiny", "r", "--device-type", "v5e:2x2",
       "--docker-image", "img", "--config.train.batch_size=40000",
       "--config.model.num_parcels=94"], capture_output=True, text=True, env=env, timeout=600,
      check=False)
  assert r.returncode == 1, r.stderr[-2000:]
  (line,) = [l for l in r.stderr.splitlines() if l.startswith("preflight:")]
  assert "does not fit" in line and "--config.train.batch_size=" in line
  assert not (tmp_path / "launched").exists()
