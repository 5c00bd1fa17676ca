"""Bad input and faults through the real CLI: every case is refused before anything is written, with exit 2 and
one line naming the file, key or field; commands never destroy what they did not write; a resumed run either
does what its config says or refuses naming old -> new; a run that dies leaves its MLflow runs FAILED."""

import json
import shutil
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import base_args, popen_cli, run_cli

pytestmark = pytest.mark.slow

ONE_EPOCH = ["train.epochs=1", "train.global_batch_size=16", "train.micro_batch_size=8",
             "train.checkpoint_every_steps=3", "train.keep_last=10"]


def refused(r, *needles: str) -> None:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    err = r.stderr.strip()
    assert err.count("\n") == 0 and "error:" in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def copy_root(engine_inputs, tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    shutil.copytree(engine_inputs[0], root)
    return root


def edit_manifest(root: Path, edit) -> Path:
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def first_shard(root: Path, split: str = "train") -> Path:
    return root / json.loads((root / "manifest.json").read_text())["splits"][split]["shards"][0]["file"]


def test_bad_training_input_is_refused_before_anything_is_written(engine_inputs, tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- data\n- model\n")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("train: 5\n")
    empty_valid = edit_manifest(copy_root(engine_inputs, tmp_path, "empty"),
                                lambda m: m["splits"]["valid"].update(rows=0, shards=[]))
    deleted = copy_root(engine_inputs, tmp_path, "deleted")
    first_shard(deleted).unlink()
    header = copy_root(engine_inputs, tmp_path, "header")
    flip(first_shard(header, "test"), 2)
    flipped = copy_root(engine_inputs, tmp_path, "flipped")
    flip(first_shard(flipped), first_shard(flipped).stat().st_size // 2)
    (tmp_path / "backbones").mkdir()
    cases = {  # name: (extra arguments, config file or None, needles of the one-line message)
        "negative lr": (["train.lr=-1e-3"], None, ["train.lr=-0.001", "> 0"]),
        "no epochs": (["train.epochs=0"], None, ["train.epochs=0", ">= 1"]),
        "no seeds": (["run.seeds=[]"], None, ["run.seeds=[]", "non-empty"]),
        "unsorted mm_layers": (["model.mm_layers=[3,1]"], None, ["model.mm_layers=[3, 1]", "increasing"]),
        "top level a list": ([], listed, [str(listed), "top level must be a mapping", "list"]),
        "section a scalar": ([], scalar, [str(scalar), "section 'train'", "got 5"]),
        "batch above the split": (["train.global_batch_size=1024"], None, ["train.global_batch_size=1024", "larger"]),
        "empty split": ([f"data.root={empty_valid}"], None, ["manifest.json", "split 'valid' is empty"]),
        "deleted shard": ([f"data.root={deleted}"], None, [str(first_shard(deleted)), "missing"]),
        "corrupt header, cheap checks": ([f"data.root={header}", "data.verify_checksums=false"], None,
                                         [str(first_shard(header, "test")), "not an Arrow file"]),
        "flipped byte": ([f"data.root={flipped}"], None, [str(first_shard(flipped)), "sha256 mismatch"]),
        "missing backbone dir": (["model.backbone=backbones/nope"], None, ["model.backbone", "backbones/nope",
                                                                          "not a model directory"]),
    }

    def attempt(name: str):
        extra, config, _ = cases[name]
        run_dir = tmp_path / "runs" / name.replace(" ", "-").replace(",", "")
        # tracking on: the MLflow store lives in the run dir, so no run dir means no MLflow run left RUNNING
        args = [a for a in base_args(engine_inputs, run_dir, *extra) if a != "tracking.enabled=false"]
        args.append(f"tracking.uri=sqlite:///{run_dir}/mlflow.db")
        if config is not None:
            args[0] = str(config)
        t0 = time.monotonic()
        r = run_cli("train", args, timeout=120, cwd=tmp_path)
        return r, time.monotonic() - t0, run_dir

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(cases, pool.map(attempt, cases)))
    for name, (r, seconds, run_dir) in results.items():
        refused(r, *cases[name][2])
        assert not run_dir.exists(), name
        assert seconds < 60, (name, seconds)  # found up front, not after building or training


def test_prepare_refuses_empty_splits_and_repeated_ids(engine_inputs, tmp_path):
    import pickle

    src = engine_inputs[0].parent / "s.pkl"
    data = pickle.loads(src.read_bytes())
    empty = {s: {k: v[:0] for k, v in d.items()} if s == "test" else d for s, d in data.items()}
    (tmp_path / "empty.pkl").write_bytes(pickle.dumps(empty))
    refused(run_cli("prepare", [str(tmp_path / "empty.pkl"), str(tmp_path / "a")]), "no rows for split(s) ['test']")
    twice = {s: dict(d) for s, d in data.items()}
    twice["valid"]["id"] = twice["valid"]["id"].copy()
    twice["valid"]["id"][1] = twice["valid"]["id"][0]
    (tmp_path / "twice.pkl").write_bytes(pickle.dumps(twice))
    refused(run_cli("prepare", [str(tmp_path / "twice.pkl"), str(tmp_path / "b")]), "split 'valid'", "id used twice")
    for out in ("a", "b"):
        assert not (tmp_path / out).exists() and not list(tmp_path.glob(f"{out}.staging-*"))
    (tmp_path / "c.staging-0123456789ab").mkdir()  # left by a conversion that crashed
    assert run_cli("prepare", [str(src), str(tmp_path / "c")]).returncode == 0
    assert not list(tmp_path.glob("c.staging-*"))


@pytest.fixture(scope="module")
def finished(engine_inputs, tmp_path_factory) -> Path:
    """One finished 1-rank epoch (118 samples: 7 steps of 16) with checkpoints at steps 3, 6 and 7 (the epoch end)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    r = run_cli("train", base_args(engine_inputs, run_dir, *ONE_EPOCH))
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def test_export_never_replaces_what_is_not_an_export(engine_inputs, finished, tmp_path):
    before, shards = tree(finished), tree(engine_inputs[0])
    refused(run_cli("export", [str(finished), str(finished)]), "run directory")
    refused(run_cli("export", [str(finished), str(finished.parent)]), "a folder above it")
    refused(run_cli("export", [str(finished), "."], cwd=tmp_path), "current directory")
    refused(run_cli("export", [str(finished), str(engine_inputs[0])]), "is not an export (no export.json)")
    assert tree(finished) == before and tree(engine_inputs[0]) == shards
    out = tmp_path / "exp"
    (tmp_path / "exp.staging-0123456789ab").mkdir()  # left by an export that crashed
    for _ in range(2):  # a previous export is replaced
        r = run_cli("export", [str(finished), str(out)])
        assert r.returncode == 0, r.stderr
    assert (out / "export.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_predict_takes_what_prepare_takes_and_refuses_the_rest(engine_inputs, finished, tmp_path):
    import numpy as np

    export = finished / "export"
    feats = tmp_path / "feats"
    feats.mkdir()
    arrays = {"a.npy": np.zeros((3, 5)), "v.npy": np.ones((4, 20)), "nan.npy": np.full((3, 5), np.nan),
              "str.npy": np.array([["a"] * 5] * 3), "flat.npy": np.zeros(5), "narrow.npy": np.zeros((3, 4))}
    for name, arr in arrays.items():
        np.save(feats / name, arr)
    good = {"id": "c1", "text": "a fine film", "audio": "feats/a.npy", "vision": "feats/v.npy"}
    cases = {  # name: (rows, needles; none: accepted)
        "label null": ([{**good, "label": None}], None),
        "NaN features": ([{**good, "audio": "feats/nan.npy"}], ["line 1", "'audio'", "NaN or +inf"]),
        "text null": ([{**good, "text": None}], ["line 1", "missing field(s) ['text']"]),
        "label true": ([{**good, "label": True}], ["line 1", "'label'", "boolean"]),
        "string dtype": ([{**good, "audio": "feats/str.npy"}], ["'audio'", "not numeric"]),
        "audio a number": ([{**good, "audio": 5}], ["'audio'", "5 is not a string"]),
        "1-D array": ([{**good, "audio": "feats/flat.npy"}], ["line 1", "shape (5,)"]),
        "wrong dim later": ([good, {**good, "id": "c2", "audio": "feats/narrow.npy"}], ["line 2", "feature dim 4"]),
        "repeated id": ([good, good], ["line 2", "'c1' already used on line 1"]),
    }

    def attempt(name: str):
        path = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in cases[name][0]))
        return run_cli("predict", [str(export), str(path), "--out", str(path.with_suffix(".out.csv"))])

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(cases, pool.map(attempt, cases)))
    for name, r in results.items():
        if cases[name][1] is None:
            assert r.returncode == 0, (name, r.stderr[-2000:])
        else:
            refused(r, *cases[name][1])
    # and a .csv, as prepare takes it
    (tmp_path / "clips.csv").write_text("id,text,audio,vision\nc1,a fine film,feats/a.npy,feats/v.npy\n")
    r = run_cli("predict", [str(export), str(tmp_path / "clips.csv"), "--out", str(tmp_path / "clips.out.csv")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "clips.out.csv").read_text().splitlines()[1].startswith("c1,")


def copy_run(finished: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


def test_resume_refuses_values_its_checkpoints_cannot_take(engine_inputs, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    before = tree(run_dir)
    # a finished seed is not trained again in silence: a key a resume would apply is named, others refused
    r = run_cli("train", base_args(engine_inputs, run_dir, *ONE_EPOCH, "train.patience=3"))
    assert r.returncode == 0 and "already finished; train.patience changed" in r.stdout + r.stderr, r.stderr[-2000:]
    refused(run_cli("train", base_args(engine_inputs, run_dir, *ONE_EPOCH, "train.epochs=2")),  # nor longer
            "train.epochs: 1 -> 2", "--restart")
    (run_dir / "checkpoints/seed0/result.json").unlink()
    refused(run_cli("train", base_args(engine_inputs, run_dir, *ONE_EPOCH, "train.lr=5e-3")),
            "train.lr: 0.001 -> 0.005")
    # checkpoints without 'latest' are never trained over or pruned
    (run_dir / "checkpoints/seed0/latest").unlink()
    refused(run_cli("train", base_args(engine_inputs, run_dir, *ONE_EPOCH)), "latest: missing", "step3, step6, step7")
    assert {k: v for k, v in tree(run_dir).items() if k.startswith("checkpoints/seed0/step")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints/seed0/step")}
    # --restart trains from scratch, with the new values
    r = run_cli("train", [*base_args(engine_inputs, run_dir, *ONE_EPOCH, "train.lr=5e-3"), "--restart"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints/seed0").glob("step*")) == ["step3", "step6", "step7"]


def test_resume_falls_back_to_the_newest_complete_checkpoint(engine_inputs, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    ck = run_dir / "checkpoints/seed0"
    (ck / "result.json").unlink()
    (ck / "step7/complete").unlink()  # killed while saving step7, after the shards, before 'latest'
    (ck / "latest").write_text("step7")
    r = run_cli("train", base_args(engine_inputs, run_dir, *ONE_EPOCH))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "names step7, which is missing or incomplete; resuming from step6" in r.stdout + r.stderr
    assert "resumed from step6" in r.stdout
    shutil.rmtree(ck / "step7")  # and a tag that is gone entirely
    (ck / "result.json").unlink()
    (ck / "latest").write_text("step7")
    r = run_cli("train", base_args(engine_inputs, run_dir, *ONE_EPOCH))
    assert r.returncode == 0 and "resumed from step6" in r.stdout, r.stderr[-3000:]


def test_a_run_that_dies_leaves_its_mlflow_runs_failed_and_a_resume_reopens_them(engine_inputs, tmp_path):
    root = copy_root(engine_inputs, tmp_path, "shards")
    valid = first_shard(root, "valid")
    kept = valid.read_bytes()
    run_dir = tmp_path / "run"
    args = [a for a in base_args(engine_inputs, run_dir, *ONE_EPOCH, f"data.root={root}",
                                 f"tracking.uri=sqlite:///{run_dir}/mlflow.db") if a != "tracking.enabled=false"]
    proc = popen_cli("train", [*args, "train.log_every_steps=1"], ranks=1)
    out = ""
    t0 = time.monotonic()
    while "step 1 " not in out:
        assert time.monotonic() - t0 < 120 and proc.poll() is None, out[-3000:]
        out += proc.stdout.readline()
    valid.unlink()  # the validation at the epoch end cannot read it: the run dies after setup
    out += proc.communicate(timeout=120)[0]
    assert proc.returncode not in (0, 2) and "FileNotFoundError" in out, out[-3000:]
    assert "Creating initial MLflow database tables" not in out  # the embedded store's start-up noise

    def statuses() -> set[str]:
        with sqlite3.connect(run_dir / "mlflow.db") as db:
            return {row[0] for row in db.execute("select status from runs")}

    assert statuses() == {"FAILED"}  # parent and seed run
    valid.write_bytes(kept)
    r = run_cli("train", args)
    assert r.returncode == 0 and "resumed from step6" in r.stdout, r.stderr[-3000:]
    assert statuses() == {"FINISHED"}
