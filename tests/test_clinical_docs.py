"""docs/clinical.md runs as written: every ```bash block, in order, on the bundled ABIDE folder
(`runs/clinical` replaced by a temporary folder), and its outputs hold what it says."""

import json
import os
import re
import subprocess

import pytest

from tests.conftest import REPO, SHARED_DATA
from tests.test_tutorial import _env, bash_blocks

PAGE = REPO / "docs" / "clinical.md"
RUNS = "runs/clinical"
ABIDE = SHARED_DATA / "abide_cc200"
_PATH = re.compile(re.escape(RUNS) + r"(?:/[\w./-]*[\w/])?")


@pytest.mark.slow
def test_clinical_page_commands(tmp_path):
  if not ABIDE.is_dir():
    pytest.skip(f"real data not found at {ABIDE}")
  markdown = PAGE.read_text(encoding="utf-8")
  out = str(tmp_path / "clinical")
  stdouts = []
  for i, block in enumerate(bash_blocks(markdown)):
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.replace(RUNS, out)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, (f"block {i} exited {proc.returncode}:\n{block}\n--- stdout\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    stdouts.append(proc.stdout)
  missing = [p for p in sorted(set(_PATH.findall(markdown)))
             if not os.path.exists(p.replace(RUNS, out))]
  assert not missing, f"the page names outputs that were not written: {missing}"
  assert "pretrain_sites 699 subjects, 13 sites" in stdouts[0]
  assert "new_sites 90 subjects, 3 sites" in stdouts[0]

  dx = json.load(open(f"{out}/probe_dx/probe.json", encoding="utf-8"))
  rows = {r["name"]: r for r in dx["feature_sets"]}
  assert {"cls", "mean", "tokens-fc", "tokens-pca", "masked-cls", "masked-mean",
          "masked-tokens-fc", "model", "random-cls", "random-mean", "random-tokens-fc",
          "random-model", "random-tokens-fc@3", "random-model@3", "fc", "tangent", "mean+fc",
          "site"} <= set(rows)
  for r in rows.values():
    assert {"accuracy", "roc_auc"} <= set(r["metrics"])
  assert sorted(f["name"] for f in dx["folds"]) == ["OHSU", "OLIN", "SBL"]
  assert dx["n_subjects"] == 90 and dx["paired_test"]["a"] == "model"
  assert [t["b"] for t in dx["paired_tests"]] == [
      "fc", "random-model + random-model@2 + random-model@3"]
  assert rows["fc"]["metrics"]["roc_auc"]["mean"] > 0.5  # FC carries the diagnosis here too
  report = json.load(open(f"{out}/model/data_report.json", encoding="utf-8"))
  seen = {r["site"] for part in ("train", "validation") for r in report[part]}
  assert len(seen) == 13 and not seen & {"OHSU", "SBL", "OLIN"}  # pretraining never saw them
  assert any(r.get("dead_parcels") for r in report["train"] + report["validation"])
  assert "model vs fc" in stdouts[3]

  age = json.load(open(f"{out}/probe_age/probe.json", encoding="utf-8"))
  assert age["task"] == "regression" and age["n_folds"] == 5
  assert {"r2", "mae", "pearson_r"} <= set(age["feature_sets"][0]["metrics"])
