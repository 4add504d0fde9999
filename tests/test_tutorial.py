"""docs/tutorial.md runs as written: every ```bash block, in order, on the bundled real data.

`runs/tutorial` is replaced by a temporary folder, so the repository stays clean. Then every
`runs/tutorial/...` path the tutorial names must exist, and the outputs must hold what it says.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import HCP_DIR, REPO, SHARED_DATA

TUTORIAL = REPO / "docs" / "tutorial.md"
RUNS = "runs/tutorial"
_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
_PATH = re.compile(re.escape(RUNS) + r"(?:/[\w./-]*[\w/])?")
_ENTRYPOINTS = ("brainlm-prepare parcellate", "brainlm-prepare build", "brainlm-pretrain",
                "brainlm-probe", "brainlm-evaluate", "brainlm-visualize")


def bash_blocks(markdown: str) -> list[str]:
  """The bodies of the ```bash fenced blocks, in order."""
  return _BLOCK.findall(markdown)


def named_outputs(markdown: str) -> list[str]:
  """Every `runs/tutorial/...` path the text names (commands, prose and links)."""
  return sorted(set(_PATH.findall(markdown)))


def test_parsers():
  md = ("x `runs/tutorial/a.npy`, and [y](../runs/tutorial/b/c.png).\n"
        "```bash\necho 1 \\\n  2\n```\n```text\nno\n```\n```bash\nls runs/tutorial/d/\n```\n")
  assert bash_blocks(md) == ["echo 1 \\\n  2\n", "ls runs/tutorial/d/\n"]
  assert named_outputs(md) == ["runs/tutorial/a.npy", "runs/tutorial/b/c.png", "runs/tutorial/d/"]


def _env() -> dict:
  """The user's shell: the venv's console scripts on PATH, one CPU device (no test XLA_FLAGS)."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  return env


@pytest.mark.slow
def test_tutorial_commands(tmp_path):
  if not (HCP_DIR.is_dir() and (SHARED_DATA / "nitime_sample").is_dir()):
    pytest.skip(f"real data not found at {SHARED_DATA}")
  markdown = TUTORIAL.read_text(encoding="utf-8")
  blocks = bash_blocks(markdown)
  text = "\n".join(blocks)
  positions = [text.find(e) for e in _ENTRYPOINTS]
  assert -1 not in positions and positions == sorted(positions), (
      f"the tutorial must run {_ENTRYPOINTS} in this order")
  out = str(tmp_path / "tutorial")
  stdouts = []
  for i, block in enumerate(blocks):
    command = block.replace(RUNS, out)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, (
        f"block {i} exited {proc.returncode}:\n{block}\n--- stdout\n{proc.stdout[-3000:]}\n"
        f"--- stderr\n{proc.stderr[-5000:]}")
    stdouts.append(proc.stdout)

  missing = [p for p in named_outputs(markdown) if not os.path.exists(p.replace(RUNS, out))]
  assert not missing, f"the tutorial names outputs that were not written: {missing}"

  # 1. Both nitime scans parcellated with the 96-box atlas: 40 timepoints, TR 1.35 s.
  manifest = [json.loads(line) for line in open(f"{out}/parcels/manifest.jsonl", encoding="utf-8")]
  assert [(r["subject"], r["status"], r["shape"]) for r in manifest] == [
      ("fmri1", "ok", [40, 96]), ("fmri2", "ok", [40, 96])]
  assert all(abs(r["tr"] - 1.35) < 1e-3 for r in manifest)
  shown = next(o for b, o in zip(blocks, stdouts) if "manifest.jsonl" in b)
  assert "2 converted" in shown and '"subject": "fmri1"' in shown  # the manifest was printed
  # 3. Pretraining reached its last step and its loss went down from the first logged step.
  metrics = [json.loads(line) for line in open(f"{out}/pretrain/metrics.jsonl", encoding="utf-8")]
  evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
  assert metrics[-1]["step"] == 150 and evals[-1] < evals[0]
  # 4. Subject fingerprinting from FC is far above chance (7 subjects).
  probe = json.load(open(f"{out}/probe/probe.json", encoding="utf-8"))
  acc = {f["name"]: f["metrics"]["accuracy"]["mean"] for f in probe["feature_sets"]}
  assert probe["n_subjects"] == 7 and set(acc) >= {"cls", "mean", "random-mean", "fc"}
  assert acc["fc"] > 3 * probe["chance"]["accuracy"]
  # 5. Evaluation on the held-out subject only, model and baselines on the same masked tokens.
  ev = json.load(open(f"{out}/evaluate/evaluate.json", encoding="utf-8"))
  assert ev["split"] == "validation" and ev["n_recordings"] == 1
  assert {"model", "train-median", "interpolation"} <= {m["name"] for m in ev["methods"]}
