"""Integration tests of the training engine: the real CLI, launched on 1 rank or on 2 CPU ranks (gloo) with
torchrun; the interrupted runs use the ``deepspeed`` launcher, so resuming also crosses launchers."""

import csv
import hashlib
import json
import re
import shutil
import signal
import time

import pytest
import torch

from conftest import (EXACT, base_args, history, last_weights, losses, popen_cli, rank_processes, run_cli,
                      shared_memory_buffers, wait_for_checkpoint)

pytestmark = pytest.mark.slow

def test_preempt_kill_and_resume_match_uninterrupted_run(engine_inputs, ref_run, tmp_path):
    run_dir = tmp_path / "run"
    args = base_args(engine_inputs, run_dir, *EXACT, "train.zero_stage=2")
    shm = shared_memory_buffers()
    # 1. preemption signal mid-epoch: finish the step, save, exit 85
    proc = popen_cli("train", args, ranks=2, launcher="deepspeed")
    wait_for_checkpoint(run_dir, proc, 3)
    for p in rank_processes(proc):
        p.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 85, out[-3000:]
    assert "preempted; saved step" in out
    # 2. rerun resumes; then one rank is SIGKILLed: the whole job exits non-zero within a bound
    proc = popen_cli("train", args, ranks=2, launcher="deepspeed")
    wait_for_checkpoint(run_dir, proc, 6)
    victim = [p for p in rank_processes(proc)][-1]
    victim.kill()
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - t0 < 60, out[-3000:]
    assert "resumed from step" in out
    assert not (run_dir / "metrics.json").exists()
    # 3. rerun resumes and finishes with the uninterrupted run's losses and weights
    r = run_cli("train", args, ranks=2, launcher="deepspeed")
    assert r.returncode == 0, r.stdout[-3000:]
    assert "resumed from step" in r.stdout
    assert losses(run_dir) == pytest.approx(losses(ref_run), rel=1e-6, abs=1e-7)
    a, b = last_weights(run_dir), last_weights(ref_run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert json.loads((run_dir / "metrics.json").read_text())["mean"]["test"] == pytest.approx(
        json.loads((ref_run / "metrics.json").read_text())["mean"]["test"], rel=1e-5)
    # none of the three jobs (preempted, killed, finished) left its ranks' shared memory behind
    assert shared_memory_buffers() <= shm


def test_run_dir_layout_and_export_predict(engine_inputs, ref_run, tmp_path):
    for name in ("config.yaml", "ds_config.json", "metrics.json", "predictions/test.csv", "predictions/valid.csv",
                 "export/model.safetensors", "export/config.yaml", "export/export.json"):
        assert (ref_run / name).is_file(), name
    ds = json.loads((ref_run / "ds_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == 2
    # the logged lr is the LM side's (train.lr 1e-3 with warmup and cosine), not the AV encoder's 1e-4
    assert 1e-4 < max(r["lr"] for r in history(ref_run)) <= 1e-3
    # keep_last=10 keeps all; the run saved every 3 steps and at epoch ends
    assert (ref_run / "checkpoints/seed0/latest").read_text().startswith("step")
    out = tmp_path / "exp"
    r = run_cli("export", [str(ref_run), str(out)])
    assert r.returncode == 0, r.stderr
    pred = tmp_path / "p.csv"
    r = run_cli("predict", [str(out), str(engine_inputs[0]), "--split", "test", "--out", str(pred)])
    assert r.returncode == 0, r.stderr
    mine = list(csv.DictReader(pred.open()))
    theirs = list(csv.DictReader((ref_run / "predictions/test.csv").open()))
    assert [row["id"] for row in mine] == [row["id"] for row in theirs]
    for x, y in zip(mine, theirs):
        assert float(x["prediction"]) == pytest.approx(float(y["prediction"]), abs=1e-5)
    # a different backbone at the recorded path is refused
    other = tmp_path / "bb2"
    assert run_cli("make-backbone", ["--arch", "gpt2", "--preset", "tiny", "--seed", "1", "--out", str(other)]).returncode == 0
    r = run_cli("predict", [str(out), str(engine_inputs[0]), "--backbone", str(other), "--out", str(pred)])
    assert r.returncode == 2 and "other config or weights" in r.stderr
    # the backbone is found by its fingerprint wherever it is: recorded as a relative path that does not resolve
    # here and at an absolute path that is gone, it is refused naming the ways to give it, then found in
    # $FUSION_DIST_BACKBONES, or in the export's own copy
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    meta = json.loads((moved / "export.json").read_text())
    assert meta["backbone"]["path"] == str(engine_inputs[1].resolve())
    meta["backbone"].update(name="demo_out/backbone", path=str(tmp_path / "gone"))
    (moved / "export.json").write_text(json.dumps(meta))
    args = ["predict", str(moved), str(engine_inputs[0]), "--out", str(pred)]
    r = run_cli(args[0], args[1:])
    fp = meta["backbone"]["fingerprint"][:12]
    assert r.returncode == 2 and f"fingerprint {fp}) is not there" in r.stderr and "FUSION_DIST_BACKBONES" in r.stderr
    assert "--backbone DIR" in r.stderr and "model_config=" in r.stderr, r.stderr
    search = {"FUSION_DIST_BACKBONES": f"{tmp_path / 'nothing'}:{engine_inputs[1].parent}"}
    r = run_cli(args[0], args[1:], env=search)
    assert r.returncode == 0, r.stderr
    assert [row["prediction"] for row in csv.DictReader(pred.open())] == [row["prediction"] for row in mine]
    shutil.copytree(engine_inputs[1], moved / "backbone")
    assert run_cli(args[0], args[1:]).returncode == 0


def test_console_shows_rates_eta_and_memory_and_no_start_up_noise(reference_run, engine_inputs, tmp_path):
    run_dir, r = reference_run(zero=2, ranks=2)
    steps = [ln for ln in r.stdout.splitlines() if ln.startswith("step ")]
    assert steps and all(re.search(r"\| [\d.]+ samples/s, \d+ tokens/s \| ETA epoch \S+, run <= \S+ \| "
                                   r"peak mem [\d.]+ GiB$", ln) for ln in steps), steps
    for noise in ("Creating initial MLflow database tables", "Loading weights", "Setting accelerator to CPU"):
        assert noise not in r.stdout + r.stderr, noise
    p = run_cli("predict", [str(run_dir / "export"), str(engine_inputs[0]), "--out", str(tmp_path / "p.csv")])
    n = sum(1 for _ in (tmp_path / "p.csv").open()) - 1
    assert p.returncode == 0 and re.search(rf"predict test: {n}/{n} samples \(100%\) \| .* tokens/s .* done", p.stdout)


def test_hub_backbone_is_recorded_and_loaded_at_its_commit(engine_inputs, ref_run, tmp_path):
    """A hub backbone is exported as name + the commit it resolved to, and loads at that commit after the hub
    moved on (an offline HF cache holding two commits of one repo; the hub is unreachable here)."""
    from fusion_dist.config import from_yaml, to_yaml

    other = tmp_path / "bb2"
    assert run_cli("make-backbone", ["--arch", "gpt2", "--preset", "tiny", "--seed", "1", "--out", str(other)]).returncode == 0
    repo = tmp_path / "hub" / "models--fusion-dist--tiny"
    trained, newer = "a" * 40, "b" * 40
    for commit, files in ((trained, engine_inputs[1]), (newer, other)):
        shutil.copytree(files, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(trained)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    # a run trained on the hub name: the reference run's files, without its record of a local backbone
    shutil.copytree(ref_run, run, ignore=shutil.ignore_patterns("export", "tracking", "mlruns", "*.db", "backbone.json"))
    cfg = from_yaml((run / "config.yaml").read_text())
    cfg.model.backbone = "fusion-dist/tiny"
    (run / "config.yaml").write_text(to_yaml(cfg))
    r = run_cli("export", [str(run), str(tmp_path / "exp")], env=env)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert meta["backbone"] == {"name": "fusion-dist/tiny", "local": False, "revision": trained}
    # --hub: the same export plus a model card naming the base model at that commit, the metrics and the data
    r = run_cli("export", [str(run), str(tmp_path / "hub-exp"), "--hub"], env=env)
    assert r.returncode == 0 and "huggingface-cli upload" in r.stdout, r.stderr
    card = (tmp_path / "hub-exp" / "README.md").read_text()
    front = card.split("---")[1]
    assert 'base_model: "fusion-dist/tiny"' in front and "library_name: fusion-dist" in front
    assert f"at commit `{trained}`" in card and "fusion-dist train config.yaml" in card
    summary = json.loads((run / "metrics.json").read_text())
    assert f"| seed 0 | {summary['seeds']['0']['test']['Has0_acc_2']:.4f} |" in card
    assert f"| mean ± std | {summary['mean']['test']['Has0_acc_2']:.4f} ± " in card
    sha = hashlib.sha256((engine_inputs[0] / "manifest.json").read_bytes()).hexdigest()
    assert f"manifest sha256 `{sha}`" in card
    assert sorted(p.name for p in (tmp_path / "hub-exp").iterdir()) == ["README.md", "config.yaml", "export.json",
                                                                          "model.safetensors"]
    from fusion_dist.hub import model_card
    from fusion_dist.tracking import dataset_input

    local = json.loads((ref_run / "export" / "export.json").read_text())  # a local backbone: no base_model
    card = model_card(cfg, local, summary, dataset_input(str(engine_inputs[0]), json.loads(
        (engine_inputs[0] / "manifest.json").read_text())))
    assert "base_model" not in card and f"fingerprint `{local['backbone']['fingerprint']}`" in card

    (repo / "refs" / "main").write_text(newer)  # the hub repo moved on
    want = [float(row["prediction"]) for row in csv.DictReader((ref_run / "predictions/test.csv").open())]
    preds = {}
    for commit in (trained, newer):
        meta["backbone"]["revision"] = commit
        (tmp_path / "exp" / "export.json").write_text(json.dumps(meta))
        r = run_cli("predict", [str(tmp_path / "exp"), str(engine_inputs[0]), "--out", str(tmp_path / "p.csv")], env=env)
        assert r.returncode == 0, r.stderr
        preds[commit] = [float(row["prediction"]) for row in csv.DictReader((tmp_path / "p.csv").open())]
    assert preds[trained] == pytest.approx(want, abs=1e-5)
    assert preds[newer] != pytest.approx(want, abs=1e-3)  # the other commit's weights: what loading by name gives


def test_a_run_keeps_the_backbone_it_started_with(engine_inputs, ref_run, tmp_path):
    """RUN_DIR/backbone.json: a hub backbone is used at the commit it had when the run started, by a rerun, by
    ``evaluate`` and by a later ``export``, after the hub moved on to a commit the run does not fit; a local backbone
    directory whose content changed is refused by a resume and an export, naming the file."""
    from fusion_dist.config import from_yaml, to_yaml

    repo = tmp_path / "hub" / "models--fusion-dist--tiny"
    trained, newer = "a" * 40, "b" * 40
    for commit in (trained, newer):
        shutil.copytree(engine_inputs[1], repo / "snapshots" / commit)
    shallow = json.loads((repo / "snapshots" / newer / "config.json").read_text())
    shallow["n_layer"] = 2  # model.mm_layers=[1, 3] does not fit: whatever loads this commit fails
    (repo / "snapshots" / newer / "config.json").write_text(json.dumps(shallow))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(trained)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    args = base_args(engine_inputs, run, *EXACT, "train.epochs=1", "model.backbone=fusion-dist/tiny")
    r = run_cli("train", args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "backbone.json").read_text()) == {"name": "fusion-dist/tiny", "local": False,
                                                              "revision": trained}
    assert from_yaml((run / "config.yaml").read_text()).model.backbone == "fusion-dist/tiny"  # as given
    metrics = json.loads((run / "metrics.json").read_text())

    (repo / "refs" / "main").write_text(newer)  # the hub moved on
    shutil.rmtree(run / "export")
    r = run_cli("train", args, env=env)  # a rerun (every seed finished): checked and exported at the run's commit
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("evaluate", args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["mean"]["test"] == pytest.approx(metrics["mean"]["test"], rel=1e-5)
    r = run_cli("export", [str(run), str(tmp_path / "exp")], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for export in (run / "export", tmp_path / "exp"):
        assert json.loads((export / "export.json").read_text())["backbone"]["revision"] == trained
    (run / "backbone.json").unlink()
    assert run_cli("evaluate", args, env=env).returncode != 0  # by name alone: the newer commit, which does not fit

    local, copy = tmp_path / "bb-local", tmp_path / "run-local"
    shutil.copytree(engine_inputs[1], local)
    shutil.copytree(ref_run, copy, ignore=shutil.ignore_patterns("export", "tracking", "mlruns", "*.db"))
    cfg = from_yaml((copy / "config.yaml").read_text())
    cfg.model.backbone, cfg.run.dir = str(local), str(copy)
    (copy / "config.yaml").write_text(to_yaml(cfg))
    changed = json.loads((local / "config.json").read_text())
    changed["layer_norm_epsilon"] = 1e-6
    (local / "config.json").write_text(json.dumps(changed))
    args = base_args(engine_inputs, copy, *EXACT, "train.zero_stage=2", f"model.backbone={local}")
    r = run_cli("train", args)
    assert r.returncode == 2 and f"{local} holds other config or weights" in r.stderr, r.stderr[-3000:]
    assert "backbone.json" in r.stderr
    r = run_cli("export", [str(copy), str(tmp_path / "exp-local")])  # nor exported as if trained on it
    assert r.returncode == 2 and f"{local} holds other config or weights" in r.stderr, r.stderr[-3000:]


def test_two_rank_evaluation_equals_one_rank(engine_inputs, ref_run, tmp_path):
    args = base_args(engine_inputs, ref_run, *EXACT, "train.zero_stage=2", "train.eval_batch_size=5")
    r1 = run_cli("evaluate", args, ranks=1)
    assert r1.returncode == 0, r1.stderr[-3000:]
    one = json.loads((ref_run / "metrics.json").read_text()), list(csv.DictReader((ref_run / "predictions/test.csv").open()))
    r2 = run_cli("evaluate", args, ranks=2)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    two = json.loads((ref_run / "metrics.json").read_text()), list(csv.DictReader((ref_run / "predictions/test.csv").open()))
    # same samples, once each, same order; predictions equal up to float noise from other batch padding
    assert [(r["id"], r["label"]) for r in one[1]] == [(r["id"], r["label"]) for r in two[1]]
    assert [float(r["prediction"]) for r in one[1]] == pytest.approx([float(r["prediction"]) for r in two[1]], abs=1e-6)
    for split in ("valid", "test"):
        assert one[0]["mean"][split] == pytest.approx(two[0]["mean"][split], rel=1e-6)
    assert "Has0_acc_2" in r1.stdout


def test_one_rank_same_global_batch_matches_two_ranks(reference_run, ref_run):
    """World-size-aware batch settings: the same global and micro batch on 1 rank derive twice the
    accumulation, the sampler deals the same micro-batches and each micro-batch draws the same dropout
    noise, so BatchNorm batch statistics, gradients and therefore every step's loss match the 2-rank run
    up to float summation order. Evaluation uses BatchNorm running statistics, an exponential average
    that each rank updates over its own micro-batches; the ranks average them before every evaluation, which
    comes close to, but is not exactly, the 1-rank average: metrics agree within a tolerance."""
    run_dir, r = reference_run(zero=2, ranks=1)
    assert "accumulation 4 x world 1" in r.stdout
    assert json.loads((ref_run / "ds_config.json").read_text())["gradient_accumulation_steps"] == 2
    one, two = losses(run_dir), losses(ref_run)
    assert sorted(one) == sorted(two)  # the same steps (the incomplete final global batch dropped on both)
    assert one == pytest.approx(two, rel=1e-4)
    m1 = json.loads((run_dir / "metrics.json").read_text())["mean"]["test"]
    m2 = json.loads((ref_run / "metrics.json").read_text())["mean"]["test"]
    print("test metrics, 1 rank:", m1, "\n2 ranks:", m2)
    assert m1["MAE"] == pytest.approx(m2["MAE"], rel=1e-2)  # the running statistics differ (above), nothing else
    assert m1["Corr"] == pytest.approx(m2["Corr"], abs=0.02)  # 62 test samples, a barely trained model


@pytest.mark.parametrize("stage", ["0", "1", "3", "2+offload"])
def test_zero_stages_train_and_agree(engine_inputs, ref_run, tmp_path, stage):
    extra = ["train.zero_stage=2", "train.offload_optimizer=true"] if stage == "2+offload" else [f"train.zero_stage={stage}"]
    run_dir = tmp_path / "run"
    r = run_cli("train", base_args(engine_inputs, run_dir, *EXACT, "train.epochs=1", *extra), ranks=2)
    assert r.returncode == 0, r.stdout[-4000:]
    mine, ref = losses(run_dir), losses(ref_run)
    first = sorted(mine)[:3]
    assert [mine[s] for s in first] == pytest.approx([ref[s] for s in first], rel=1e-4)
    assert (run_dir / "metrics.json").is_file()


BAD = [
    (["train.global_batch_size=0"], "train.global_batch_size=0 and train.micro_batch_size=4 must both be >= 1"),
    (["model.av.init=pretrained+tune"], "model.av.checkpoint"),
    (["model.backbone=/nonexistent/bb"], "model.backbone"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_is_refused_before_writing(engine_inputs, tmp_path, extra, message):
    run_dir = tmp_path / "run"
    r = run_cli("train", base_args(engine_inputs, run_dir, *extra))
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert not run_dir.exists()


def test_data_root_without_manifest(engine_inputs, tmp_path):
    r = run_cli("train", base_args(engine_inputs, tmp_path / "run", f"data.root={tmp_path}"))
    assert r.returncode == 2 and "manifest" in r.stderr


def test_resume_with_changed_model_config_names_keys(engine_inputs, ref_run):
    r = run_cli("train", base_args(engine_inputs, ref_run, *EXACT, "model.n_fusion=5", "model.head_hidden=8"))
    assert r.returncode == 2
    assert "model.n_fusion: 3 -> 5" in r.stderr and "model.head_hidden: 16 -> 8" in r.stderr
