"""Every launcher's dry run prints the command it would run (and runs nothing)."""

import os
import shlex
import subprocess

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


def test_tpu_vm():
  cmds = _dry("tpu_vm.sh", "pod", "us-east5-a", "650m", "gs://b/r", "--project", "p", "--setup",
              "--dry-run", "--config.data.path=gs://b/data dir")
  assert len(cmds) == 2  # setup, then the run
  run = cmds[1]
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
  (cmd,) = _dry("gke_xpk.sh", "cl", "wl", "650m", "gs://b/r", "--device-type", "v5p-128",
                "--docker-image", "img", "--num-slices", "2", "--dry-run")
  assert cmd[:3] == ["xpk", "workload", "create"]
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
