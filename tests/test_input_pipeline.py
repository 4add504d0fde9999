"""Tests for brainlm_jax.data: scaling, stateless tf.data training batches (input_pipeline),
evaluation windows (windows.iter_windows)."""

import json
import pathlib

import numpy as np
import pytest

from brainlm_jax.data import datasets as D
from brainlm_jax.data import input_pipeline as P
from brainlm_jax.data import readers as R
from brainlm_jax.data import windows as W
from brainlm_jax.data.scaling import RobustScaler

DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
HCP = DATA / "hcp_rest_aal94"

IDENTITY = RobustScaler.from_dict(
    {"median": [0.0] * 3, "iqr": [1.0] * 3, "center_recordings": False})


def coded(lengths, parcels=3):
    """Recordings whose values encode (recording, time, parcel): r*1e4 + t*10 + p."""
    return [np.array([[r * 1e4 + t * 10 + p for p in range(parcels)] for t in range(n)],
                     np.float32) for r, n in enumerate(lengths)]


def decode(window):
    """[parcels, window] of `coded` data -> (recording, start)."""
    v = int(round(window[0, 0]))
    return v // 10000, (v % 10000) // 10


def batches(ds):
    return [b["signal"] for b in ds.as_numpy_iterator()]


def eval_batches(recordings, **kw):
    """Every evaluation window batch of `windows.iter_windows`, as a list."""
    return list(W.iter_windows(recordings, **kw))


@pytest.fixture(scope="module")
def hcp_split():
    if not HCP.exists():
        pytest.skip(f"shared data not available: {HCP}")
    recs, _ = D.load_recordings(HCP, window=100)
    return D.split_by_subject(recs, val_fraction=0.3, seed=0)


# ----------------------------------------------------------------------------- scaler


def test_scaler_on_real_hcp(hcp_split):
    train, val = hcp_split
    assert min(float(np.median(r.signal)) for r in train) > 1000  # Raw BOLD baseline.
    scaler = RobustScaler().fit(train)
    pooled = np.concatenate([scaler.transform(r.signal) for r in train])
    assert pooled.dtype == np.float32 and pooled.shape == (1200 * len(train), 94)
    q25, q50, q75 = np.percentile(pooled, [25, 50, 75], axis=0)
    np.testing.assert_allclose(q50, 0, atol=1e-4)
    np.testing.assert_allclose(q75 - q25, 1, atol=1e-4)
    for r in val:  # Unseen subjects: baseline removed, comparable spread.
        x = scaler.transform(r.signal)
        q25, q50, q75 = np.percentile(x, [25, 50, 75], axis=0)
        assert np.abs(q50).max() < 0.5
        assert 0.2 < np.median(q75 - q25) < 5


def test_scaler_without_centering_keeps_baselines():
    a = np.random.default_rng(0).standard_normal((200, 2)) + [100, -50]
    b = np.random.default_rng(1).standard_normal((200, 2)) + [110, -40]
    s = RobustScaler().fit([a, b], center_recordings=False)
    assert 100 < s.median[0] < 110 and not s.center_recordings
    x = s.transform(a)
    assert np.median(x[:, 0]) < -0.5  # Subject offset survives without centering.


def test_scaler_recordings_in_different_units(hcp_split, caplog):
    """Real HCP recordings rescaled as if from other scanners/pipelines (x50 raw units, % signal
    change-like /100): dataset-level scaling warns, naming the files; per-recording scaling
    brings every recording to a comparable spread."""
    train, val = hcp_split
    units = [50.0, 1.0, 0.01] + [1.0] * (len(train) - 3)
    mixed = [R.Recording(path=f"{r.path}#x{u}", subject=r.subject, signal=r.signal * u)
             for r, u in zip(train, units)]
    with caplog.at_level("WARNING"):
        RobustScaler().fit(mixed)
    assert any("differ" in m and "#x50" in m and "#x0.01" in m for m in caplog.messages)

    scaler = RobustScaler().fit(mixed, scale_recordings=True)
    assert RobustScaler.from_dict(scaler.to_dict()).scale_recordings
    caplog.clear()
    for r in mixed + [R.Recording(path="val#x1000", subject="v", signal=val[0].signal * 1000)]:
        x = scaler.transform(r)
        spread = np.median(np.subtract(*np.percentile(x, [75, 25], axis=0)))
        assert 0.5 < spread < 2, (r.path, spread)
    assert not caplog.messages  # nothing to warn about once each recording is scaled itself

    dataset_level = RobustScaler().fit(train)
    with caplog.at_level("WARNING"):
        dataset_level.transform(val[0].signal * 1000, "val#x1000")
    assert any("val#x1000" in m and "scale_recordings" in m for m in caplog.messages)


def test_scaler_per_recording_flat_parcel_stays_finite():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((100, 3)) * 7, rng.standard_normal((100, 3)) * 0.1
    a[:, 2] = 3.0  # outside this scan's field of view
    s = RobustScaler().fit([a, b], scale_recordings=True)
    x = s.transform(a)
    assert np.isfinite(x).all() and np.all(x[:, 2] == x[0, 2])


def test_scaler_save_load(tmp_path):
    rng = np.random.default_rng(0)
    recs = [rng.standard_normal((50, 4)) * [1, 2, 3, 4] + 9000 for _ in range(3)]
    s = RobustScaler().fit(recs)
    s.save(tmp_path / "scaler.json")
    state = json.loads((tmp_path / "scaler.json").read_text())
    assert state["num_parcels"] == 4 and state["center_recordings"] is True
    s2 = RobustScaler.load(tmp_path / "scaler.json")
    np.testing.assert_array_equal(s2.transform(recs[0]), s.transform(recs[0]))
    np.testing.assert_array_equal(RobustScaler.from_dict(s.to_dict()).iqr, s.iqr)


def test_scaler_errors():
    x = np.random.default_rng(0).standard_normal((40, 3))
    x[:, 1] = 5.0
    with pytest.raises(ValueError, match="parcel index 1"):
        RobustScaler().fit([x])
    with pytest.raises(ValueError, match="4 parcels"):
        IDENTITY.transform(np.zeros((10, 4)))
    with pytest.raises(ValueError, match="not fitted"):
        RobustScaler().transform(x)
    with pytest.raises(ValueError, match="parcel index 2"):
        RobustScaler.from_dict({"median": [0, 0, 0], "iqr": [1, 1, 0]})


# ----------------------------------------------------------------------------- train_dataset


def test_train_shapes_and_values(hcp_split):
    train, _ = hcp_split
    scaler = RobustScaler().fit(train)
    ds = P.train_dataset(train, scaler=scaler, batch_size=4, window=100, seed=0, num_steps=3)
    assert ds.element_spec["signal"].shape == (4, 94, 100)
    out = batches(ds)
    assert len(out) == 3
    assert all(b.shape == (4, 94, 100) and b.dtype == np.float32 for b in out)
    scaled = [scaler.transform(r.signal) for r in train]
    for w in out[0]:  # Every sample is a real window of a scaled recording.
        hits = [(i, t) for i, s in enumerate(scaled) for t in np.flatnonzero(s[:, 0] == w[0, 0])
                if t + 100 <= len(s) and np.array_equal(s[t:t + 100].T, w)]
        assert hits


def test_train_windows_are_contiguous_and_proportional():
    recs = coded([30, 300])
    ds = P.train_dataset(recs, scaler=IDENTITY, batch_size=256, window=20, seed=5, num_steps=4)
    counts = np.zeros(2)
    for b in batches(ds):
        for w in b:
            r, t = decode(w)
            np.testing.assert_array_equal(w, recs[r][t:t + 20].T)
            counts[r] += 1
    # P(recording) is proportional to its number of starts: 11 vs 281.
    assert abs(counts[0] / counts.sum() - 11 / 292) < 0.03


def test_train_determinism_and_seed():
    recs = coded([50, 80, 65])
    kw = dict(scaler=IDENTITY, batch_size=8, window=16, num_steps=4)
    a = batches(P.train_dataset(recs, seed=1, **kw))
    b = batches(P.train_dataset(recs, seed=1, **kw))
    c = batches(P.train_dataset(recs, seed=2, **kw))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not np.array_equal(a[0], a[1])  # Steps differ.


def test_train_resume_is_exact():
    recs = coded([50, 80, 65])
    kw = dict(scaler=IDENTITY, batch_size=8, window=16, seed=7)
    full = batches(P.train_dataset(recs, num_steps=7, **kw))
    resumed = batches(P.train_dataset(recs, start_step=3, num_steps=4, **kw))
    assert len(resumed) == 4
    for x, y in zip(full[3:], resumed):
        np.testing.assert_array_equal(x, y)
    infinite = P.train_dataset(recs, start_step=3, **kw).take(2)
    for x, y in zip(full[3:5], batches(infinite)):
        np.testing.assert_array_equal(x, y)


def test_train_process_index_differs():
    recs = coded([50, 80, 65])
    kw = dict(scaler=IDENTITY, batch_size=8, window=16, seed=0, num_steps=2, process_count=2)
    p0 = batches(P.train_dataset(recs, process_index=0, **kw))
    p1 = batches(P.train_dataset(recs, process_index=1, **kw))
    assert not any(np.array_equal(x, y) for x, y in zip(p0, p1))
    with pytest.raises(ValueError, match="process_index"):
        P.train_dataset(recs, process_index=2, **kw)


def test_train_rejects_short_recording():
    with pytest.raises(ValueError, match="recording 1 has 10 timepoints"):
        P.train_dataset(coded([50, 10]), scaler=IDENTITY, batch_size=2, window=16, seed=0)


# ----------------------------------------------------------------------------- iter_windows


def test_eval_batches_cover_every_window_once():
    recs = coded([50, 35, 20, 9 + 10])  # 5 + 3 + 2 + 1 windows of 10.
    out = eval_batches(recs, scaler=IDENTITY, batch_size=4, window=10)
    assert len(out) == 3
    for b in out:
        assert b.signal.shape == (4, 3, 10) and b.signal.dtype == np.float32
        assert b.weight.shape == (4,) and b.weight.dtype == np.float32
    np.testing.assert_array_equal(out[-1].weight, [1, 1, 1, 0])
    np.testing.assert_array_equal(out[-1].signal[3], 0)
    seen = [decode(w) for b in out for w, wt in zip(b.signal, b.weight) if wt]
    expected = [(r, t) for r, n in enumerate([50, 35, 20, 19]) for t in range(0, n - 9, 10)]
    assert seen == expected  # In order, each exactly once.
    assert [(int(r), int(j) * 10) for b in out for r, j in zip(b.recording, b.window)] == expected
    for b in out:
        for w, wt in zip(b.signal, b.weight):
            if wt:
                r, t = decode(w)
                np.testing.assert_array_equal(w, recs[r][t:t + 10].T)
    again = eval_batches(recs, scaler=IDENTITY, batch_size=4, window=10)
    assert all(np.array_equal(x.signal, y.signal) for x, y in zip(out, again))


def test_eval_batches_stride_and_max_windows():
    recs = coded([30, 25])
    out = eval_batches(recs, scaler=IDENTITY, batch_size=4, window=10, stride=5)
    seen = [decode(w) for b in out for w, wt in zip(b.signal, b.weight) if wt]
    assert seen == [(0, 0), (0, 5), (0, 10), (0, 15), (0, 20), (1, 0), (1, 5), (1, 10), (1, 15)]
    out = eval_batches(recs, scaler=IDENTITY, batch_size=4, window=10, max_windows=5)
    assert len(out) == 2 and out[1].weight.sum() == 1


def test_eval_windows_spread_over_every_recording():
    """per_recording: k windows of every recording (the review's finding 2: the first N windows
    in file order covered 46 of ABIDE's validation recordings, from 5 of 16 sites), chosen by a
    seeded draw that does not depend on the other recordings; a recording with fewer keeps all."""
    recs = coded([100, 100, 100, 30])  # 10, 10, 10 and 3 windows of 10
    out = eval_batches(recs, scaler=IDENTITY, batch_size=4, window=10, per_recording=4, seed=1)
    seen = [decode(w) for b in out for w, wt in zip(b.signal, b.weight) if wt]
    by_rec = {r: [t for q, t in seen if q == r] for r in range(4)}
    assert [len(by_rec[r]) for r in range(4)] == [4, 4, 4, 3]
    assert all(t % 10 == 0 and t == sorted(by_rec[r])[i] for r in range(4)
               for i, t in enumerate(by_rec[r]))
    assert len({tuple(v) for v in by_rec.values() if len(v) == 4}) > 1  # not the same starts
    assert [(int(r), int(j) * 10) for b in out for r, j in zip(b.recording, b.window)] == seen
    other = eval_batches(recs, scaler=IDENTITY, batch_size=4, window=10, per_recording=4, seed=2)
    assert [decode(w) for b in other for w, wt in zip(b.signal, b.weight) if wt] != seen
    again = eval_batches(recs, scaler=IDENTITY, batch_size=4, window=10, per_recording=4, seed=1)
    assert [decode(w) for b in again for w, wt in zip(b.signal, b.weight) if wt] == seen


def test_spread_starts_depends_on_the_recording_not_its_neighbours():
    from brainlm_jax.data.windows import spread_starts
    starts = list(range(0, 1000, 10))
    a = spread_starts(starts, 5, "site1/sub-01.npy", seed=0)
    assert a == spread_starts(starts, 5, "site1/sub-01.npy", seed=0) and a == sorted(a)
    assert a != spread_starts(starts, 5, "site1/sub-02.npy", seed=0)
    assert spread_starts(starts[:3], 5, "x", seed=0) == starts[:3]


def test_eval_batches_real_hcp(hcp_split):
    _, val = hcp_split
    scaler = RobustScaler().fit(val)
    out = eval_batches(val, scaler=scaler, batch_size=16, window=200)
    assert sum(b.weight.sum() for b in out) == 6 * len(val)
    assert out[0].signal.shape == (16, 94, 200)


# ----------------------------------------------------------------------------- masks in tf.data


@pytest.mark.parametrize("mode", ["parcel", "uniform", "forecast"])
def test_pipeline_masks_follow_the_masking_contract(mode):
    from brainlm_jax.models import masking as M
    recs = coded([120, 90], parcels=5)
    cfg = {"mode": mode, "ratio": 0.75, "forecast_patches": 2, "patch_len": 10}
    ds = P.train_dataset(recs, scaler=None, batch_size=6, window=40, seed=3, num_steps=2,
                         with_positions=True, masking=cfg)
    b = next(ds.as_numpy_iterator())
    parcels, patches = 5, 4
    keep = M.num_visible(mode, parcels, patches, 0.75, 2)
    assert b["ids_keep"].shape == (6, keep) and b["ids_keep"].dtype == np.int32
    assert b["mask"].shape == (6, parcels, patches)
    assert np.all(np.diff(b["ids_keep"], axis=1) > 0)  # ascending, no repeats
    for ids, mask in zip(b["ids_keep"], b["mask"]):
        visible = np.zeros(parcels * patches)
        visible[ids] = 1
        np.testing.assert_array_equal(mask.reshape(-1), 1 - visible)
    if mode == "parcel":  # the same count in every parcel, different patches across parcels
        assert np.all(b["mask"].sum(-1) == patches - keep // parcels)
        assert len({tuple(m) for m in b["mask"][0]}) > 1
    if mode == "forecast":
        assert np.all(b["mask"][..., -2:] == 1) and np.all(b["mask"][..., :-2] == 0)
    # Stateless: the masks of step 1 are reproduced by a pipeline resumed at step 1.
    second = list(ds.as_numpy_iterator())[1]
    resumed = next(P.train_dataset(recs, scaler=None, batch_size=6, window=40, seed=3,
                                   start_step=1, num_steps=1, with_positions=True,
                                   masking=cfg).as_numpy_iterator())
    for k in second:
        np.testing.assert_array_equal(second[k], resumed[k])
    assert np.array_equal(resumed["recording"], second["recording"])
