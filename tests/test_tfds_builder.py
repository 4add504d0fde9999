"""The `brainlm_fmri` TFDS builder (`tfds build`, Beam DirectRunner) and its reader."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from brainlm_jax.data import datasets
from brainlm_jax.data import readers
from brainlm_jax.data import tfds_source
from brainlm_jax.data.scaling import RobustScaler
from tests.conftest import REPO

TR = 0.72


@pytest.fixture(scope="module")
def hcp_dataset(tmp_path_factory):
  """`tfds build` (the TFDS CLI) of the bundled HCP folder with the hcp_aal94 config."""
  if not importlib.util.find_spec("mlcroissant") or not importlib.util.find_spec("apache_beam"):
    pytest.skip("the `tfds` CLI of tensorflow-datasets 4.9 imports apache_beam and mlcroissant; "
                "pip install -e '.[beam]'")
  from tests.conftest import HCP_DIR  # pylint: disable=import-outside-toplevel
  if not HCP_DIR.is_dir():
    pytest.skip(f"real data not found at {HCP_DIR}")
  data_dir = tmp_path_factory.mktemp("tfds")
  proc = subprocess.run(
      [sys.executable, "-m", "tensorflow_datasets.scripts.cli.main", "build",
       "data_pipelines/brainlm_fmri", f"--manual_dir={HCP_DIR}", f"--data_dir={data_dir}",
       "--config=hcp_aal94"], cwd=REPO, capture_output=True, text=True, timeout=400,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return HCP_DIR, data_dir


def test_hcp_build_splits_features_and_scaler(hcp_dataset):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  import data_pipelines.brainlm_fmri  # pylint: disable=import-outside-toplevel,unused-import  # registers
  hcp_dir, data_dir = hcp_dataset
  path = data_dir / "brainlm_fmri" / "hcp_aal94" / "1.0.0"
  assert sorted(p.name for p in path.glob("*.array_record-*")) == [
      f"brainlm_fmri-{s}.array_record-00000-of-00001" for s in ("test", "train", "validation")]

  splits = {s: tfds_source.load_split(str(data_dir), s) for s in ("train", "validation", "test")}
  subjects = {s: {r.subject for r in recs} for s, (recs, _) in splits.items()}
  assert [len(subjects[s]) for s in ("train", "validation", "test")] == [5, 1, 1]
  assert not (subjects["train"] & subjects["validation"] or subjects["train"] & subjects["test"]
              or subjects["validation"] & subjects["test"])
  everything, _ = datasets.load_recordings(hcp_dir, window=200)
  assert set().union(*subjects.values()) == {r.subject for r in everything}

  train, info = splits["train"]
  by_subject = {r.subject: r for r in everything}
  for r in train:  # Features: the raw recording, TR, site, no coordinates / phenotypes.
    np.testing.assert_array_equal(r.signal, by_subject[r.subject].signal)
    assert r.signal.shape == (1200, 94) and r.tr == pytest.approx(TR)
  assert set(info["site"]) == {"hcp_rest_aal94"} and info["phenotypes"] == [{}] * 5
  assert info["coords"] is None and info["num_parcels"] == 94
  assert info["subjects"]["train"] == sorted(subjects["train"])

  # The stored statistics are RobustScaler's on exactly the training subjects.
  expected = RobustScaler().fit([by_subject[s] for s in sorted(subjects["train"])])
  stored = RobustScaler.from_dict(info["scaler"])
  np.testing.assert_allclose(stored.median, expected.median, rtol=1e-6)
  np.testing.assert_allclose(stored.iqr, expected.iqr, rtol=1e-6)

  # Standard TFDS readers see the same data (ArrayRecord: random access, tfds.data_source).
  ds = tfds.data_source("brainlm_fmri/hcp_aal94", split="validation", data_dir=str(data_dir))
  (ex,) = list(ds)
  assert ex["subject"].decode() in subjects["validation"] and ex["signal"].shape == (1200, 94)
  assert tfds.builder_from_directory(str(path)).info.metadata["scaler"] == info["scaler"]


def _parcellated_folder(d, n_subjects=6, parcels=5):
  """`brainlm-prepare parcellate`-style output: .npy + manifest + coordinates + participants."""
  d.mkdir()
  rng = np.random.default_rng(0)
  rows = []
  for s in range(n_subjects):
    for run in (1, 2):
      name = f"sub-{s:02d}_run-{run}_bold.npy"
      np.save(d / name, rng.standard_normal((60 + 10 * s, parcels)).astype(np.float32))
      rows.append({"path": f"/raw/{name}", "subject": f"sub-{s:02d}", "output": name,
                   "status": "ok", "reason": "", "shape": [60 + 10 * s, parcels], "tr": 2.0})
  rows.append({"path": "/raw/bad.nii.gz", "subject": "sub-99", "output": "sub-99_bold.npy",
               "status": "skipped", "reason": "truncated", "shape": None, "tr": None})
  (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (d / "coordinates.dat").write_text("".join(f"{i + 1} {i} {2 * i} {-i}\n"
                                             for i in range(parcels)))
  (d / "participants.tsv").write_text(
      "participant_id\tage\tsite\n" + "".join(f"sub-{s:02d}\t{20 + s}\tsite{s % 2}\n"
                                               for s in range(n_subjects)))
  return d


def _build(source, data_dir, beam=False, **fields):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from data_pipelines.brainlm_fmri import Builder, BrainLMConfig  # pylint: disable=import-outside-toplevel
  config = BrainLMConfig(name="tiny", num_parcels=5, window=40, **fields)
  download = {"manual_dir": str(source)}
  if beam:
    import apache_beam  # pylint: disable=import-outside-toplevel
    download["beam_options"] = apache_beam.options.pipeline_options.PipelineOptions(
        ["--runner=DirectRunner"])
  builder = Builder(config=config, data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**download))
  return builder


def _examples(data_dir):
  out = {}
  for split in ("train", "validation", "test"):
    recs, info = tfds_source.load_split(str(data_dir), split)
    for r, start, pheno, site in zip(recs, info["start"], info["phenotypes"], info["site"]):
      out[(split, os.path.basename(r.path), start)] = (r.signal, r.subject, pheno, site, r.tr)
  return out, info


def test_windows_phenotypes_coordinates(tmp_path):
  source = _parcellated_folder(tmp_path / "parcels")
  _build(source, tmp_path / "data", stride=20)
  examples, info = _examples(tmp_path / "data")
  np.testing.assert_array_equal(info["coords"], [[i, 2 * i, -i] for i in range(5)])
  assert info["phenotype_columns"] == ["age", "site"]
  # Recording s has 60 + 10 s timepoints: windows of 40 every 20.
  for s in range(6):
    starts = sorted(k[2] for k in examples if k[1] == f"sub-{s:02d}_run-1_bold.npy")
    assert starts == list(range(0, 60 + 10 * s - 40 + 1, 20))
  key = next(k for k in examples if k[1] == "sub-03_run-2_bold.npy" and k[2] == 20)
  signal, subject, pheno, site, tr = examples[key]
  full = np.load(source / "sub-03_run-2_bold.npy")
  np.testing.assert_array_equal(signal, full[20:60])
  assert (subject, pheno, site, tr) == ("sub-03", {"age": "23", "site": "site1"}, "site1", 2.0)
  split_of = {}
  for split, name, _ in examples:  # Both runs of a subject land in the same split.
    split_of.setdefault(name[:6], set()).add(split)
  assert all(len(v) == 1 for v in split_of.values()) and len(split_of) == 6


def test_target_tr_resamples_every_recording(tmp_path):
  """target_tr=1.0: the manifest's TR-2.0 recordings come out twice as long, resampled."""
  source = _parcellated_folder(tmp_path / "parcels")
  _build(source, tmp_path / "data", target_tr=1.0)
  examples, _ = _examples(tmp_path / "data")
  key = next(k for k in examples if k[1] == "sub-03_run-2_bold.npy")
  signal, _, _, _, tr = examples[key]
  full = np.load(source / "sub-03_run-2_bold.npy")
  assert tr == 1.0 and signal.shape == (2 * len(full), 5)
  np.testing.assert_allclose(signal, readers.resample_tr(full, 2.0, 1.0), rtol=1e-6)


def test_beam_direct_runner_matches_plain_build(tmp_path):
  pytest.importorskip("apache_beam", reason="apache_beam not installed (pip install -e '.[beam]')")
  source = _parcellated_folder(tmp_path / "parcels")
  _build(source, tmp_path / "plain")
  _build(source, tmp_path / "beam", beam=True)
  plain, plain_info = _examples(tmp_path / "plain")
  beam, beam_info = _examples(tmp_path / "beam")
  assert sorted(plain) == sorted(beam) and len(plain) == 12
  for k, v in plain.items():
    np.testing.assert_array_equal(v[0], beam[k][0])
    assert v[1:] == beam[k][1:]
  assert plain_info["scaler"] == beam_info["scaler"]
  shutil.rmtree(tmp_path / "beam")


def test_build_config_overrides_get_their_own_name():
  """TFDS refuses a custom config named like a built-in one; `brainlm-prepare build
  --builder-config hcp_aal94 --target-tr 1.44` (or --coords/--tr/--phenotypes) gets a name of its own."""
  from data_pipelines.brainlm_fmri import build_config  # pylint: disable=import-outside-toplevel
  assert build_config("hcp_aal94").name == "hcp_aal94"
  assert build_config("hcp_aal94", tr=None).name == "hcp_aal94"
  a, b = build_config("hcp_aal94", target_tr=1.44), build_config("hcp_aal94", target_tr=2.0)
  assert a.name.startswith("hcp_aal94_") and a.target_tr == 1.44 and a.name != b.name
  assert build_config("hcp_aal94", target_tr=1.44).name == a.name  # deterministic
  assert build_config('{"name": "a424", "window": 100}').name.startswith("a424_")


def test_cohort_folder_gives_site_tr_and_phenotypes(tmp_path):
  """An ABIDE-like cohort folder (phenotype table naming the files, site -> TR table): each
  example carries its subject, site, TR (resampled to target_tr) and phenotype row, -9999 left
  out; the tables are not read as recordings; a dead parcel is kept."""
  from tests.test_cohort import _cohort_dir  # pylint: disable=import-outside-toplevel
  (tmp_path / "abide").mkdir()
  root, dx = _cohort_dir(tmp_path / "abide", dead=2)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from data_pipelines.brainlm_fmri import Builder, BrainLMConfig  # pylint: disable=import-outside-toplevel
  builder = Builder(config=BrainLMConfig(name="cohort", num_parcels=6, target_tr=2.0,
                                         max_dead_fraction=0.2), data_dir=str(tmp_path / "data"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(root)))
  assert builder.info.metadata["tr_table"].endswith("site_tr.csv")
  examples, _ = _examples(tmp_path / "data")
  assert len(examples) == 12
  lengths = {"ALPHA": 60, "BETA_1": 120, "GAMMA": 150}  # 120 volumes at TR 1.0 / 2.0 / 2.5 s
  for (_, name, _), (signal, subject, pheno, site, tr) in examples.items():
    assert name.startswith(pheno["FILE_ID"]) and subject == pheno["SUB_ID"]  # subject column
    assert site == pheno["SITE_ID"] and tr == 2.0
    assert signal.shape == (lengths[site], 6) and pheno["DX_GROUP"] == str(dx[pheno["FILE_ID"]])
    assert pheno.get("ADOS_TOTAL") != "-9999"
  first = next(v for k, v in examples.items() if k[1] == "ALPHA_0000501_rois.npy")
  assert readers.dead_parcels(first[0]).tolist() == [2]


def _nap_folder(d, parcels=6, subjects=8):
  """A folder as a new user has it: `NAP_<subject>_rest.npy` recordings (no table; the default
  subject pattern gives them all `NAP`) and a `region_names.txt`."""
  d.mkdir()
  rng = np.random.default_rng(0)
  for s in range(1, subjects + 1):
    np.save(d / f"NAP_{s:03d}_rest.npy", rng.standard_normal((50, parcels)).astype(np.float32))
  (d / "region_names.txt").write_text("".join(f"ctx-lh-region{i}\n" for i in range(parcels)))
  return d


def test_build_without_a_config_takes_the_parcel_count_from_the_data(tmp_path, caplog):
  """No builder config: one named after the source folder, parcel count from the data; the
  subjects are told apart by file name; region_names.txt is left out (not skipped)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from data_pipelines.brainlm_fmri import Builder, build_config  # pylint: disable=import-outside-toplevel
  source = _nap_folder(tmp_path / "NAP cohort-2")
  config = build_config(None, source=str(source))
  assert (config.name, config.num_parcels, config.window) == ("nap_cohort_2", 0, 1)
  builder = Builder(config=config, data_dir=str(tmp_path / "data"))
  with caplog.at_level("INFO"):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(source)))
  assert not [r for r in caplog.records
              if r.levelname == "WARNING" and "region_names" in r.getMessage()]
  assert any("Not recordings" in m and "region_names.txt" in m for m in caplog.messages)
  examples, info = _examples(tmp_path / "data")
  assert info["num_parcels"] == 6 and len(examples) == 8
  assert all(v[0].shape == (50, 6) for v in examples.values())
  assert {v[1] for v in examples.values()} == {f"NAP_{s:03d}" for s in range(1, 9)}
  assert build_config("a424").num_parcels == 424 and build_config("hcp_aal94").name == "hcp_aal94"


def test_named_config_with_another_parcel_count_is_one_clear_error(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from data_pipelines.brainlm_fmri import Builder, build_config  # pylint: disable=import-outside-toplevel
  source = _nap_folder(tmp_path / "nap")
  builder = Builder(config=build_config("a424"), data_dir=str(tmp_path / "data"))
  with pytest.raises(ValueError) as e:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(source)))
  message = str(e.value)
  assert "\n" not in message and "has 6 parcels" in message and "num_parcels=424" in message
  assert """--builder-config '{"name": "nap", "num_parcels": 6}'""" in message
  assert "leave --builder-config out" in message


def test_prepare_build_cli_without_builder_config(tmp_path):
  """`brainlm-prepare build --source DIR --out X` as a new user runs it: builds with the data's
  parcel count and says which config; naming a config that does not fit is one error line."""
  source = _nap_folder(tmp_path / "nap")
  env = dict(os.environ, PYTHONPATH=str(REPO))

  def cli(*args):
    return subprocess.run([sys.executable, "-m", "brainlm_jax.cli.prepare", "build",
                           f"--source={source}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env, check=False)

  proc = cli(f"--out={tmp_path / 'data'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "builder config nap:" in proc.stdout and "6 parcels" in proc.stdout
  assert (tmp_path / "data" / "brainlm_fmri" / "nap").is_dir()
  proc = cli(f"--out={tmp_path / 'other'}", "--builder-config=a424")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert ("brainlm-prepare: error: every recording of " in proc.stderr
          and "has 6 parcels" in proc.stderr and "--builder-config '{" in proc.stderr)
