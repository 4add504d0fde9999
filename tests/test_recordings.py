"""Tests for brainlm_jax.data.readers / datasets (synthetic files in tmp_path + the real shared data)."""

import os
import pathlib
import pickle
import re

import numpy as np
import pytest
import scipy.io

from brainlm_jax.data import datasets as D
from brainlm_jax.data import readers as R
from brainlm_jax.data import run_data

DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
HCP = DATA / "hcp_rest_aal94"
NITIME_CSV = DATA / "nitime_sample" / "fmri_timeseries.csv"
A424 = DATA / "atlases" / "A424" / "A424_Coordinates.dat"
HCP_SUBJECTS = ["101309", "102311", "102816", "131217", "211619", "213522", "377451"]


def need(path):
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def signal(t=60, p=5, seed=0):
    return np.random.default_rng(seed).standard_normal((t, p)).astype(np.float32)


def write_good(directory, n=3, t=60, p=5):
    paths = []
    for i in range(n):
        path = directory / f"sub-{i:02d}_task-rest_bold.npy"
        np.save(path, signal(t, p, seed=i))
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- real data


def test_load_all_hcp_mat():
    recs, skipped = D.load_recordings(need(HCP), window=200)
    assert skipped == []
    assert [r.subject for r in recs] == HCP_SUBJECTS
    for r in recs:
        assert r.signal.shape == (1200, 94) and r.signal.dtype == np.float32
    raw = scipy.io.loadmat(HCP / "101309_REST1_LR.mat")["tc"]  # [regions, time]
    np.testing.assert_allclose(recs[0].signal, raw.T.astype(np.float32))


def test_hcp_num_parcels_orientation():
    path = need(HCP) / "102311_REST1_LR.mat"
    assert R.load_signal(path, num_parcels=94).shape == (1200, 94)
    with pytest.raises(R.RecordingError, match="102311_REST1_LR.mat.*num_parcels=50"):
        R.load_signal(path, num_parcels=50)


def test_nitime_csv_with_header():
    path = need(NITIME_CSV)
    x = R.load_signal(path)
    assert x.shape == (250, 31) and x.dtype == np.float32
    with open(path) as f:
        f.readline()
        first = [float(v) for v in f.readline().split(",")]
    np.testing.assert_allclose(x[0], first, rtol=1e-6)
    recs, skipped = D.load_recordings([path], window=100)
    assert recs[0].subject == "fmri" and not skipped


def test_split_hcp_by_subject():
    recs, _ = D.load_recordings(need(HCP), window=200)
    train, val = D.split_by_subject(recs, val_fraction=0.2, seed=0)
    tr_s, va_s = {r.subject for r in train}, {r.subject for r in val}
    assert tr_s and va_s and not tr_s & va_s and tr_s | va_s == set(HCP_SUBJECTS)
    train2, val2 = D.split_by_subject(list(reversed(recs)), val_fraction=0.2, seed=0)
    assert {r.subject for r in val2} == va_s  # Independent of input order.
    _, val3 = D.split_by_subject(recs, num_val_subjects=3, seed=0)
    assert len({r.subject for r in val3}) == 3


def test_load_a424_coordinates():
    xyz = R.load_coordinates(need(A424))
    assert xyz.shape == (424, 3) and xyz.dtype == np.float32
    np.testing.assert_array_equal(xyz[0], [14, -78, 4])


# ----------------------------------------------------------------------------- formats


def test_formats_round_trip(tmp_path):
    x = signal(40, 4)
    np.save(tmp_path / "a.npy", x)
    np.savetxt(tmp_path / "b.csv", x, delimiter=",", header="r1,r2,r3,r4", comments="")
    np.savetxt(tmp_path / "c.tsv", x, delimiter="\t")
    with open(tmp_path / "d.1D", "w") as f:
        f.write("# AFNI 1D file\n\n")
        for row in x:
            f.write("  ".join(f"{v:.9g}" for v in row) + "  # comment\n")
    np.savetxt(tmp_path / "e.txt", x)
    scipy.io.savemat(tmp_path / "f.mat", {"tc": x.T})  # [regions, time]
    scipy.io.savemat(tmp_path / "g.mat", {"ts": x, "tr": np.array([[0.72]])})
    for name in ["a.npy", "b.csv", "c.tsv", "d.1D", "e.txt", "f.mat", "g.mat"]:
        np.testing.assert_allclose(R.load_signal(tmp_path / name), x, rtol=1e-6, err_msg=name)


def test_num_parcels_transposes_npy(tmp_path):
    x = signal(40, 4)
    np.save(tmp_path / "a.npy", x.T)  # Stored [parcels, time].
    assert R.load_signal(tmp_path / "a.npy").shape == (4, 40)  # Default: time x parcels.
    np.testing.assert_array_equal(R.load_signal(tmp_path / "a.npy", num_parcels=4), x)


def test_ambiguous_mat(tmp_path):
    scipy.io.savemat(tmp_path / "a.mat", {"x": signal(), "y": signal()})
    with pytest.raises(R.RecordingError, match=r"a\.mat.*ambiguous"):
        R.load_signal(tmp_path / "a.mat")


def test_subject_of():
    assert D.subject_of("/d/sub-01/func/sub-01_task-rest_bold.npy") == "sub-01"
    assert D.subject_of("102311_REST1_LR.mat") == "102311"
    assert D.subject_of("subjA.csv") == "subjA"
    assert D.subject_of("s12-run1.npy", pattern=r"^s(\d+)") == "12"
    # multi-site names (ABIDE): the site comes first, the subject is the 5+-digit token
    assert D.subject_of("CMU_a_0050642_rois_cc200.1D") == "0050642"
    assert D.subject_of("UM_1_0050272_rois_cc200.npy") == "0050272"
    assert D.subject_of("sub-01_20200101_bold.npy") == "sub-01"


def test_glob_and_list_inputs(tmp_path):
    paths = write_good(tmp_path)
    recs, _ = D.load_recordings(str(tmp_path / "*.npy"), window=10)
    assert [r.subject for r in recs] == ["sub-00", "sub-01", "sub-02"]
    recs, _ = D.load_recordings([paths[2], paths[0]], window=10)
    assert [r.subject for r in recs] == ["sub-02", "sub-00"]
    with pytest.raises(FileNotFoundError, match="nomatch"):
        D.load_recordings(str(tmp_path / "nomatch*.npy"), window=10)


def test_recursive_directory_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "b" / "sub-1_bold.npy", signal())
    np.save(tmp_path / "a" / "sub-2_bold.npy", signal())
    (tmp_path / "notes.md").write_text("ignored")
    recs, skipped = D.load_recordings(tmp_path, window=10)
    assert [r.subject for r in recs] == ["sub-2", "sub-1"] and not skipped


# ----------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        D.load_recordings(tmp_path / "does_not_exist", window=10)


def test_empty_folder(tmp_path):
    (tmp_path / "README.md").write_text("no data")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        D.load_recordings(tmp_path, window=10)


def _bad_1d(p):
    np.save(p / "bad.npy", np.arange(60.0))


def _bad_3d(p):
    np.save(p / "bad.npy", np.zeros((60, 5, 2)))


def _bad_nan(p):
    x = signal()
    x[7, 3] = np.nan
    x[9, 1] = np.nan
    np.save(p / "bad.npy", x)


def _bad_inf(p):
    x = signal()
    x[11, 2] = -np.inf
    np.save(p / "bad.npy", x)


def _bad_constant(p):
    x = signal()
    x[:, 4] = 3.0
    np.save(p / "bad.npy", x)


def _bad_parcels(p):
    np.save(p / "bad.npy", signal(60, 7))


def _bad_short(p):
    np.save(p / "bad.npy", signal(8, 5))


def _bad_csv(p):
    (p / "bad.csv").write_text("a,b,c,d,e\n1,2,3,4,5\n1,2,x,4,5\n2,3,4,5,6\n")


def _bad_mat(p):
    (p / "bad.mat").write_bytes(b"MATLAB 5.0 MAT-file garbage" + os.urandom(300))


def _bad_empty_npy(p):
    np.save(p / "bad.npy", np.zeros((0, 5)))


def _bad_object_npy(p):
    np.save(p / "bad.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)


def _bad_mat_vector(p):
    scipy.io.savemat(p / "bad.mat", {"tc": np.arange(60.0)})


@pytest.mark.parametrize("make_bad, reason", [
    (_bad_1d, "1-D"),
    (_bad_3d, "3-D"),
    (_bad_nan, r"2 NaN and 0 inf .*time index 7, parcel index 3"),
    (_bad_inf, r"0 NaN and 1 inf .*time index 11, parcel index 2"),
    (_bad_constant, r"1 of 5 parcels are constant .*max_dead_fraction=0.1.*\[4\]"),
    (_bad_parcels, r"7 parcels, but most recordings have 5"),
    (_bad_short, r"8 timepoints, shorter than window=10"),
    (_bad_csv, r"non-numeric value 'x' at line 3, column 3"),
    (_bad_mat, r"cannot read MATLAB file"),
    (_bad_empty_npy, r"empty"),
    (_bad_object_npy, r"cannot read \.npy"),
    (_bad_mat_vector, r"vector"),
], ids=lambda v: getattr(v, "__name__", None))
def test_bad_file_is_skipped(tmp_path, make_bad, reason):
    write_good(tmp_path)
    make_bad(tmp_path)
    bad = next(str(p) for p in tmp_path.iterdir() if p.name.startswith("bad"))
    recs, skipped = D.load_recordings(tmp_path, window=10)
    assert [r.subject for r in recs] == ["sub-00", "sub-01", "sub-02"]
    assert all(r.signal.shape == (60, 5) for r in recs)
    assert len(skipped) == 1 and skipped[0]["path"] == bad
    assert bad in skipped[0]["reason"]
    assert re.search(reason, skipped[0]["reason"]), skipped[0]["reason"]


def test_missing_file_in_list_is_skipped(tmp_path):
    paths = write_good(tmp_path, n=1)
    recs, skipped = D.load_recordings([paths[0], tmp_path / "gone.npy"], window=10)
    assert len(recs) == 1
    assert "gone.npy" in skipped[0]["reason"] and "not found" in skipped[0]["reason"]


def test_num_parcels_mismatch_skipped(tmp_path):
    write_good(tmp_path, n=2, p=5)
    np.save(tmp_path / "sub-09_bold.npy", signal(60, 6))
    recs, skipped = D.load_recordings(tmp_path, window=10, num_parcels=6)
    assert [r.subject for r in recs] == ["sub-09"]
    assert len(skipped) == 2 and all("num_parcels=6" in s["reason"] for s in skipped)


def test_all_bad_raises_with_reasons(tmp_path):
    _bad_nan(tmp_path)
    _bad_csv(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)no usable recordings.*bad\.csv.*bad\.npy"):
        D.load_recordings(tmp_path, window=10)


def test_recording_error_message_and_pickle(tmp_path):
    with pytest.raises(R.RecordingError) as e:
        R.load_signal(tmp_path / "nope.npy")
    assert str(e.value).startswith(str(tmp_path / "nope.npy")) and isinstance(e.value, ValueError)
    again = pickle.loads(pickle.dumps(e.value))
    assert str(again) == str(e.value) and again.path == e.value.path


# ----------------------------------------------------------------------------- split


def _recs(subjects):
    return [R.Recording(path=f"{s}_{i}.npy", subject=s, signal=signal(12, 2))
            for i, s in enumerate(subjects)]


def test_runs_of_several_seeds_hold_out_the_same_subjects():
    """data.split_seed (fixed by the presets) chooses the validation subjects, not the run's
    seed: pretraining runs of seeds 0, 1, 2 are compared on the same held-out subjects; -1 ties
    the split to the seed."""
    if not HCP.is_dir():
        pytest.skip(f"shared data not available: {HCP}")
    from configs import pretrain  # pylint: disable=import-outside-toplevel

    def val(seed, split_seed):
        c = pretrain.get_config("tiny")
        c.seed, c.data.split_seed = seed, split_seed
        return D.subjects_of(run_data.prepare_data(c).val)

    assert pretrain.get_config("tiny").data.split_seed == 0
    assert val(0, 0) == val(1, 0) == val(2, 0)
    assert len({tuple(val(s, -1)) for s in range(4)}) > 1


def test_split_keeps_subject_runs_together_and_is_deterministic():
    recs = _recs(["a", "a", "b", "c", "c", "c", "d", "e"])
    train, val = D.split_by_subject(recs, val_fraction=0.4, seed=3)
    assert not {r.subject for r in train} & {r.subject for r in val}
    assert len({r.subject for r in val}) == 2
    assert len(train) + len(val) == len(recs)
    again = D.split_by_subject(recs, val_fraction=0.4, seed=3)
    assert [r.path for r in again[1]] == [r.path for r in val]
    seeds = {tuple(sorted({r.subject for r in D.split_by_subject(recs, seed=s)[1]}))
             for s in range(10)}
    assert len(seeds) > 1  # The seed matters.


def test_split_edge_cases():
    two = _recs(["a", "b"])
    train, val = D.split_by_subject(two, val_fraction=0.01)
    assert len(train) == 1 and len(val) == 1  # At least one subject per side.
    train, val = D.split_by_subject(_recs(["a", "b", "c"]), val_fraction=0.9)
    assert len({r.subject for r in train}) == 1
    with pytest.raises(ValueError, match="at least 2"):
        D.split_by_subject(_recs(["a", "a"]), val_fraction=0.2)
    one = _recs(["a"])
    assert D.split_by_subject(one, val_fraction=0.0) == (one, [])
    with pytest.raises(ValueError, match="num_val_subjects"):
        D.split_by_subject(two, num_val_subjects=2)


# ----------------------------------------------------------------------------- coordinates


def test_coordinates_formats_and_errors(tmp_path):
    (tmp_path / "xyz.txt").write_text("# x y z\n1 2 3\n\n4.5 -5 6\n")
    np.testing.assert_array_equal(R.load_coordinates(tmp_path / "xyz.txt"),
                                  [[1, 2, 3], [4.5, -5, 6]])
    (tmp_path / "bad.dat").write_text("1 2 3 4\n2 5 6\n")
    with pytest.raises(R.RecordingError, match=r"bad\.dat.*line 2"):
        R.load_coordinates(tmp_path / "bad.dat")
    (tmp_path / "bad2.dat").write_text("1 2 x 4\n")
    with pytest.raises(R.RecordingError, match=r"bad2\.dat.*non-numeric"):
        R.load_coordinates(tmp_path / "bad2.dat")
    with pytest.raises(R.RecordingError, match="missing.dat"):
        R.load_coordinates(tmp_path / "missing.dat")
    # Schaefer-style centroid CSV (header, label, name with no spaces, R A S) and a TSV.
    (tmp_path / "schaefer.csv").write_text(
        "ROI Label,ROI Name,R,A,S\n1,7Networks_LH_Vis_1,-33,-42,-21\n2,7Networks_LH_Vis_2,-30,-33,-19\n")
    np.testing.assert_array_equal(R.load_coordinates(tmp_path / "schaefer.csv"),
                                  [[-33, -42, -21], [-30, -33, -19]])
    labels, _ = R.load_coordinates(tmp_path / "schaefer.csv", with_labels=True)
    np.testing.assert_array_equal(labels, [1, 2])
    assert R.load_coordinates(tmp_path / "xyz.txt", with_labels=True)[0] is None
    (tmp_path / "c.tsv").write_text("name\tx\ty\tz\nLeft Amygdala\t-23\t-5\t-18\n")
    np.testing.assert_array_equal(R.load_coordinates(tmp_path / "c.tsv"), [[-23, -5, -18]])
    (tmp_path / "two.txt").write_text("1 2\n")
    with pytest.raises(R.RecordingError, match="line 1 has 2 column"):
        R.load_coordinates(tmp_path / "two.txt")
    (tmp_path / "hdr.csv").write_text("x,y,z\n")
    with pytest.raises(R.RecordingError, match="no coordinate rows"):
        R.load_coordinates(tmp_path / "hdr.csv")


def test_resample_tr_keeps_slow_signals_and_duration():
  """A 0.03 Hz + 0.08 Hz mixture (resting-state band) sampled at TR 2.0 s, 0.72 s and 0.8 s:
  resampled to another TR it matches the same mixture sampled there (edges aside)."""
  def sampled(tr, n):
    t = np.arange(n)[:, None] * tr
    return (np.sin(2 * np.pi * 0.03 * t + np.arange(3)) + 0.5 * np.cos(2 * np.pi * 0.08 * t)
            + 900.0)  # a scanner baseline: the edges are padded by a line, not zeros
  for tr, target, n in [(2.0, 0.72, 150), (0.72, 2.0, 600), (0.8, 0.72, 400)]:
    out = R.resample_tr(sampled(tr, n), tr, target)
    expect_len = int(np.ceil(n * tr / target))
    assert R.resampled_length(n, tr, target) == expect_len
    assert out.dtype == np.float32 and out.shape == (expect_len, 3)
    ref = sampled(target, expect_len)
    edge = int(np.ceil(20 / target))  # 20 s at each end
    np.testing.assert_allclose(out[edge:-edge], ref[edge:-edge], atol=0.02)
  assert R.resampled_length(40, 1.35, 0.9) == 60  # not ceil(60.00000000000001)
  x = sampled(0.72, 50)
  np.testing.assert_array_equal(R.resample_tr(x, 0.72, 0.72), x.astype(np.float32))
  with pytest.raises(R.RecordingError, match="scan.npy.*TR None"):
    R.resample_tr(x, None, 0.72, "scan.npy")


def test_recordings_stored_parcels_by_time_are_transposed(tmp_path):
    """A site exporting [parcels, time]: with the parcel count unknown, the majority's count
    decides and such files are transposed rather than skipped as 'too short'."""
    write_good(tmp_path)  # three [60, 5]
    x = signal(60, 5)
    np.save(tmp_path / "sub-09_bold.npy", x.T)  # [5, 60]
    recs, skipped = D.load_recordings(tmp_path, window=10)
    assert not skipped and [r.signal.shape for r in recs] == [(60, 5)] * 4
    np.testing.assert_array_equal(recs[-1].signal, x)


def test_site_first_file_names_warn_about_the_subject_pattern(tmp_path, caplog):
    """ABIDE-style names (SITE_SUBJECT_...): the default pattern takes the 7-digit subject id.
    Names whose first token is shared by many (not all: see the next test) and hold no such id
    map to one subject; that is flagged, and the suggested pattern recovers the subjects."""
    for i in range(6):
        np.save(tmp_path / f"Pitt_00500{i:02d}_rois_cc200.npy", signal(60, 5, seed=i))
    recs, _ = D.load_recordings(tmp_path, window=10)
    assert sorted(r.subject for r in recs) == [f"00500{i:02d}" for i in range(6)]
    for f in tmp_path.iterdir():
        f.rename(tmp_path / f.name.replace("_00500", "_s"))
    np.save(tmp_path / "NYU_s99_rois_cc200.npy", signal(60, 5, seed=9))
    with caplog.at_level("WARNING"):
        recs, _ = D.load_recordings(tmp_path, window=10)
    assert sorted({r.subject for r in recs}) == ["NYU", "Pitt"]
    assert any("'Pitt'" in m and "covers 6 recordings" in m and "subject_pattern" in m
               for m in caplog.messages)
    recs, _ = D.load_recordings(tmp_path, window=10, subject_pattern="^[^_]+_([^_]+)")
    assert sorted(r.subject for r in recs) == [f"s{i:02d}" for i in range(6)] + ["s99"]


def test_distinct_name_prefixes():
    assert D.distinct_name_prefixes(["NAP_001_rest.mat", "NAP_002_rest.mat"]) == [
        "NAP_001", "NAP_002"]
    assert D.distinct_name_prefixes(
        ["d/NAP_001_rest1.mat", "d/NAP_001_rest2.mat", "d/NAP_002_rest1.mat"]) == [
            "NAP_001", "NAP_001", "NAP_002"]
    assert D.distinct_name_prefixes(["a/x.npy", "b/x.npy"]) is None  # nothing tells them apart


def test_one_shared_first_token_falls_back_to_the_file_names(tmp_path, caplog):
    """`NAP_001_rest.mat`, `NAP_002_rest.mat`, ... (a real cohort's naming) all map to `NAP`
    under the default pattern: the ids then come from the file names (one INFO line says so).
    A user's pattern, and one subject's runs named by a 5+-digit or BIDS id, are kept."""
    for s in (1, 2, 3):
        scipy.io.savemat(tmp_path / f"NAP_{s:03d}_rest.mat", {"tc": signal(60, 5, seed=s).T})
    with caplog.at_level("INFO"):
        recs, _ = D.load_recordings(tmp_path, window=10)
    assert [r.subject for r in recs] == ["NAP_001", "NAP_002", "NAP_003"]
    assert sum("subject ids are taken from the file names" in m and "'NAP'" in m
               for m in caplog.messages) == 1
    assert not [m for m in caplog.messages if "covers" in m]  # no crowded-subject warning
    train, val = D.split_by_subject(recs, val_fraction=0.3)
    assert train and val
    recs, _ = D.load_recordings(tmp_path, window=10, subject_pattern=r"^([^_]+)")
    assert {r.subject for r in recs} == {"NAP"}  # a user-given pattern is never overridden

    runs = tmp_path / "runs"
    runs.mkdir()
    for name in ("NAP_001_rest1", "NAP_001_rest2", "NAP_002_rest1"):
        np.save(runs / f"{name}.npy", signal(60, 5))
    recs, _ = D.load_recordings(runs, window=10)
    assert [r.subject for r in recs] == ["NAP_001", "NAP_001", "NAP_002"]

    one = tmp_path / "one_subject"
    one.mkdir()
    for name in ("102311_REST1_LR", "102311_REST2_LR", "sub-01_run-1_bold", "sub-01_run-2_bold"):
        np.save(one / f"{name}.npy", signal(60, 5))
    recs, _ = D.load_recordings([one / "102311_REST1_LR.npy", one / "102311_REST2_LR.npy"],
                                window=10)
    assert {r.subject for r in recs} == {"102311"}
    recs, _ = D.load_recordings(str(one / "sub-01_*.npy"), window=10)
    assert {r.subject for r in recs} == {"sub-01"}


def test_transfer_jobs_pass_their_subject_pattern(tmp_path):
    """`--subject-pattern` of the transfer CLIs: Evaluator(subject_pattern=...) ->
    select_recordings -> load_recordings; default: the run's data.subject_pattern."""
    import types  # pylint: disable=import-outside-toplevel
    from brainlm_jax.transfer import run  # pylint: disable=import-outside-toplevel
    for s in (1, 2):
        np.save(tmp_path / f"NAP_{s:03d}_rest.npy", signal(60, 5, seed=s))
    pre = types.SimpleNamespace(path="ckpt", subjects={}, data_config={"subject_pattern": "^(N)"},
                                model_cfg=types.SimpleNamespace(window=10, num_parcels=5))
    assert run.Evaluator(data=str(tmp_path)).select(pre).subjects == ["N"]
    job = run.Evaluator(data=str(tmp_path), subject_pattern=r"^[^_]+_([^_]+)")
    assert job.select(pre).subjects == ["001", "002"]
    pre.data_config = {}  # no pattern stored: the default one, then the file-name fallback
    assert run.Evaluator(data=str(tmp_path)).select(pre).subjects == ["NAP_001", "NAP_002"]
    with pytest.raises(ValueError, match="subject pattern '\\(' is not a regex"):
        run.Evaluator(subject_pattern="(")


def test_region_name_list_beside_recordings_is_left_out(tmp_path, caplog):
    """A `region_names.txt` (one name per line) is not a recording: left out with an INFO line,
    neither skipped nor warned about. Numeric text files, and tables, are still recordings."""
    write_good(tmp_path)
    (tmp_path / "region_names.txt").write_text("ctx-lh-bankssts\nctx-lh-cuneus\n\nLeft_Amygdala\n")
    (tmp_path / "labels.csv").write_text("name\nV1\nV2\n")
    np.savetxt(tmp_path / "sub-07_bold.txt", signal(60, 5, seed=7))
    assert R.is_name_list(tmp_path / "region_names.txt") and R.is_name_list(tmp_path / "labels.csv")
    assert not R.is_name_list(tmp_path / "sub-07_bold.txt")
    with caplog.at_level("INFO"):
        recs, skipped = D.load_recordings(tmp_path, window=10)
    assert len(recs) == 4 and not skipped
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("region_names.txt" in m and "labels.csv" in m for m in caplog.messages)
    table = tmp_path / "roi.csv"  # a recording with a header row of ROI names
    table.write_text("V1,V2\n0.5,1.5\n0.25,2.5\n")
    assert not R.is_name_list(table)
