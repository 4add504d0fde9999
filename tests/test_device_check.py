"""benchmarks/device_check.py --smoke: the accelerator check runs end to end on CPU at toy
shapes, with TensorFlow, TFDS and nibabel made unimportable (the GPU image has none of them)."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO

# Runs the script with an import hook that refuses the packages the device image lacks.
_BLOCKED = ("tensorflow", "tensorflow_datasets", "nibabel", "nilearn", "apache_beam")
_RUNNER = f"""
import sys, runpy
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in {_BLOCKED!r}:
      raise ImportError(f'{{name}} is not installed on the device image')
sys.meta_path.insert(0, Block())
sys.argv = ['device_check.py'] + sys.argv[1:]
runpy.run_path('benchmarks/device_check.py', run_name='__main__')
"""


def test_device_check_smoke(tmp_path, hcp_dir):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-c", _RUNNER, "--smoke", "--out", str(out),
                         "--data", str(hcp_dir)], cwd=REPO, capture_output=True, text=True,
                        check=False, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((out / "device_check.json").read_text())
  assert not result["tensorflow_loaded"]
  s = result["sections"]
  assert all(v["ok"] for v in s.values()), {k: v.get("error") for k, v in s.items()}
  rows = s["train_steps"]["result"] + s["train_largest"]["result"]
  assert [r["label"] for r in rows] == ["common", "largest"]
  assert all(r["samples_per_s"] > 0 and r["dtype"] == "bfloat16" for r in rows)
  train = s["real_training"]["result"]
  assert train["finite"] and train["steps"] == 5 and train["recordings"] >= 2
  assert [a["xla_grad_s"] > 0 for a in s["attention"]["result"]["shapes"]] == [True, True]
  assert s["peers"]["result"] and result["ratios"][0]["samples_per_s_ratio"] > 0
  prof, = s["profile"]["result"]
  assert prof["step_s"] > 0 and prof["top_ops_s_per_step"] is not None
  assert "| model | batch |" in (out / "device_check.md").read_text()
