"""``fusion-dist prepare`` / ``verify`` through the real CLI: round trips, and every bad input the issue lists."""

import json
import os
import pickle
import re
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from data_prep import synth
from fusion_dist.cli import main as cli
from fusion_dist.data import ShardDataset


@pytest.fixture(scope="module")
def mosi(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "mosi.pkl"
    assert cli(["synth", "--dataset", "mosi", "--out", str(path), "--samples", "48", "--seed", "1"]) == 0
    return path


def run_err(capsys, args, *needles):
    """Run the CLI expecting exit 2 and a one-line error containing every needle."""
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(out.name + ".staging-*"))


def write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return str(path)


@pytest.mark.parametrize("scheme", ["", "file://", "memory://"])
def test_round_trip(tmp_path, mosi, scheme):
    root = f"memory://rt-{uuid.uuid4().hex}/shards" if scheme == "memory://" else f"{scheme}{tmp_path}/shards"
    assert cli(["prepare", str(mosi), root, "--rows-per-shard", "13"]) == 0
    assert cli(["verify", root]) == 0
    with open(mosi, "rb") as f:
        src = pickle.load(f)
    for split in ("train", "valid", "test"):
        ds = ShardDataset(root, split, verify=True)
        s = src[split]
        assert len(ds) == len(s["id"])
        for i in range(len(ds)):
            row = ds[i]
            la, lv = s["audio_lengths"][i], s["vision_lengths"][i]
            expected = np.where(np.isneginf(s["audio"][i, :la]), 0, s["audio"][i, :la])
            np.testing.assert_array_equal(row["audio"], expected)
            np.testing.assert_array_equal(row["vision"], s["vision"][i, :lv])
            assert row["id"] == s["id"][i] and row["raw_text"] == s["raw_text"][i]
            assert row["label"] == pytest.approx(float(s["regression_labels"][i]))
    m = ds.manifest
    assert m["dataset"] == "mosi" and m["metrics"] == "mosi" and m["label_range"] == [-3.0, 3.0]
    assert m["features"]["audio"]["dim"] == 5 and m["features"]["vision"]["dim"] == 20
    assert not m["unimodal_labels"] and len(m["splits"]["train"]["shards"]) == 3


def test_sims_unimodal_labels(tmp_path):
    src = tmp_path / "sims.pkl"
    synth.main(["--dataset", "sims", "--out", str(src), "--samples", "12"])
    assert cli(["prepare", str(src), str(tmp_path / "out")]) == 0
    ds = ShardDataset(str(tmp_path / "out"), "train")
    assert ds.manifest["metrics"] == "sims" and ds.manifest["unimodal_labels"]
    assert {"label_T", "label_A", "label_V"} <= set(ds[0]) and ds[0]["vision"].shape[1] == 709


def test_rerun_is_noop_and_other_dataset_refused(tmp_path, mosi, capsys):
    out = tmp_path / "out"
    assert cli(["prepare", str(mosi), str(out)]) == 0
    before = (out / "manifest.json").stat().st_mtime_ns
    assert cli(["prepare", str(mosi), str(out)]) == 0
    assert "already holds this dataset" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == before
    other = tmp_path / "mosei.pkl"
    synth.main(["--dataset", "mosei", "--out", str(other), "--samples", "8"])
    run_err(capsys, ["prepare", str(other), str(out)], str(out), "mosi", "--overwrite")
    assert json.loads((out / "manifest.json").read_text())["dataset"] == "mosi"
    assert cli(["prepare", str(other), str(out), "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["dataset"] == "mosei"
    assert not list(tmp_path.glob("out.staging-*"))
    # a pickle not named after its dataset is known by its release's feature dims (synth imitates them)
    for dataset in ("mosi", "sims"):
        unnamed = tmp_path / f"features-{dataset[::-1]}.pkl"
        synth.main(["--dataset", dataset, "--out", str(unnamed), "--samples", "12"])
        assert cli(["prepare", str(unnamed), str(tmp_path / f"u-{dataset}")]) == 0
        assert json.loads((tmp_path / f"u-{dataset}" / "manifest.json").read_text())["dataset"] == dataset


def test_missing_file_and_not_a_pickle(tmp_path, capsys):
    out = tmp_path / "out"
    run_err(capsys, ["prepare", str(tmp_path / "nope.pkl"), str(out)], "nope.pkl", "not found")
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"this is not a pickle at all")
    run_err(capsys, ["prepare", str(junk), str(out)], "junk.pkl", "not a readable pickle")
    assert_nothing_written(out)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_reduce_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    src = write_pickle(tmp_path / "evil.pkl", {"train": Evil(marker), "valid": {}, "test": {}})
    out = tmp_path / "out"
    run_err(capsys, ["prepare", src, str(out)], "evil.pkl", "refused", "system")
    assert not marker.exists()
    assert_nothing_written(out)


def _good(n=4):
    rng = np.random.default_rng(0)
    return {
        "raw_text": np.array(["a b"] * n, dtype=object), "id": np.array([f"v$_${i}" for i in range(n)], dtype=object),
        "audio": rng.standard_normal((n, 6, 3)).astype(np.float32), "vision": rng.standard_normal((n, 5, 2)).astype(np.float32),
        "audio_lengths": np.full(n, 6), "vision_lengths": np.full(n, 5),
        "regression_labels": np.zeros(n, dtype=np.float32),
    }


def _bad(split_edit):
    data = {s: _good() for s in ("train", "valid", "test")}
    split_edit(data)
    return data


BAD_LAYOUTS = {
    "missing split": (lambda d: d.pop("valid"), ["missing split", "valid"]),
    "wrong top-level keys": (lambda d: d.update(bogus=d.pop("test")), ["missing split", "test", "bogus"]),
    "missing field": (lambda d: d["train"].pop("vision"), ["'train'", "vision"]),
    "N disagrees": (lambda d: d["test"].update(id=d["test"]["id"][:3]), ["'test'", "disagree", "N"]),
    "wrong ndim": (lambda d: d["train"].update(audio=d["train"]["audio"][:, :, 0]), ["'train'", "'audio'", "3 dimensions"]),
    "NaN label": (lambda d: d["valid"]["regression_labels"].__setitem__(2, np.nan), ["'valid'", "regression_labels", "row 2", "nan"]),
    "length too long": (lambda d: d["train"]["vision_lengths"].__setitem__(1, 9), ["'train'", "vision_lengths", "row 1", "padded length 5"]),
}


@pytest.mark.parametrize("case", sorted(BAD_LAYOUTS))
def test_bad_layout(tmp_path, capsys, case):
    edit, needles = BAD_LAYOUTS[case]
    src = write_pickle(tmp_path / "bad.pkl", _bad(edit))
    out = tmp_path / "out"
    run_err(capsys, ["prepare", src, str(out)], "bad.pkl", *needles)
    assert_nothing_written(out)


def test_failure_midway_leaves_nothing(tmp_path, capsys):
    data = _bad(lambda d: d["test"]["audio"].__setitem__((3, 0, 0), np.nan))  # found while writing the last split
    src = write_pickle(tmp_path / "late.pkl", data)
    out = tmp_path / "out"
    run_err(capsys, ["prepare", src, str(out)], "'test'", "audio", "NaN")
    assert_nothing_written(out)


@pytest.fixture
def prepared(tmp_path, mosi):
    out = tmp_path / "shards"
    assert cli(["prepare", str(mosi), str(out), "--rows-per-shard", "10"]) == 0
    return out


def test_verify_names_corrupted_shard(prepared, capsys):
    shard = prepared / "train" / "shard-00001-of-00003.arrow"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    run_err(capsys, ["verify", str(prepared)], "shard-00001-of-00003.arrow", "sha256 mismatch")
    with pytest.raises(Exception, match="shard-00001"):
        ShardDataset(str(prepared), "train", verify=True)


def test_verify_names_truncated_shard(prepared, capsys):
    shard = prepared / "test" / "shard-00000-of-00002.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    run_err(capsys, ["verify", str(prepared)], "test/shard-00000-of-00002.arrow", "truncated")


def test_directory_without_manifest_refused(prepared, capsys):
    (prepared / "manifest.json").unlink()
    run_err(capsys, ["verify", str(prepared)], "manifest.json", "not found")
    with pytest.raises(Exception, match="manifest.json"):
        ShardDataset(str(prepared), "train")


def test_unknown_config_key_is_an_error(tmp_path, capsys):
    from fusion_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.rooot"):
        load_config(None, ["data.root=x", "model.backbone=y", "data.rooot=z"])


def _own_data(tmp_path, fmt="jsonl", bad=None):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(9):
        a, v = tmp_path / f"a{i}.npy", tmp_path / f"v{i}.npy"
        np.save(a, rng.standard_normal((3 + i, 4)).astype(np.float32))
        np.save(v, rng.standard_normal((2 + i, 7 if bad != "dim" or i != 5 else 6)))
        rows.append({"id": f"clip{i}", "split": ("train", "valid", "test")[i % 3], "text": f"words {i}",
                     "label": float(i % 5 - 2), "audio": a.name, "vision": v.name})
    if bad == "missing":
        rows[4]["audio"] = "gone.npy"
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        keys = list(rows[0])
        path.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_own_data_round_trip(tmp_path, fmt):
    src = _own_data(tmp_path, fmt)
    root = f"memory://own-{uuid.uuid4().hex}"
    assert cli(["prepare", str(src), root]) == 0 and cli(["verify", root]) == 0
    ds = ShardDataset(root, "valid")
    assert len(ds) == 3 and ds.manifest["dataset"] == "data"
    row = ds[0]
    assert row["id"] == "clip1" and row["audio"].shape == (4, 4) and row["vision"].shape == (3, 7)
    np.testing.assert_array_equal(row["audio"], np.load(tmp_path / "a1.npy"))


def test_own_data_missing_npy(tmp_path, capsys):
    src = _own_data(tmp_path, bad="missing")
    run_err(capsys, ["prepare", str(src), str(tmp_path / "out")], "data.jsonl", "line 5", "'audio'", "gone.npy", "not found")
    assert_nothing_written(tmp_path / "out")


def test_own_data_dim_disagrees(tmp_path, capsys):
    src = _own_data(tmp_path, bad="dim")
    run_err(capsys, ["prepare", str(src), str(tmp_path / "out")], "data.jsonl", "line 6", "'vision'", "dim 6", "7")
    assert_nothing_written(tmp_path / "out")


def test_the_served_model_applies_the_same_sample_rules():
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from fusion_dist.registry import frame_to_samples

    dims = {"audio": 5, "vision": 20}
    good = {"id": "c1", "text": "fine", "audio": np.zeros((3, 5)).tolist(), "vision": np.ones((2, 20)).tolist()}
    (sample,) = frame_to_samples(pd.DataFrame([good]), dims)
    assert sample["audio"].shape == (3, 5) and sample["audio"].dtype == np.float32
    for bad, needle in [({"audio": np.full((3, 5), np.nan).tolist()}, "NaN or +inf"),
                        ({"text": None}, "'text': None is not a string"),
                        ({"vision": np.ones((2, 7)).tolist()}, "feature dim 7, expected 20"),
                        ({"audio": [["x"] * 5] * 3}, "not numeric")]:
        with pytest.raises(MlflowException, match=re.escape(needle)):
            frame_to_samples(pd.DataFrame([{**good, **bad}]), dims)
