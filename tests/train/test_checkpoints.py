"""The checkpoint store and the resume guard without training: the client state's round trip, early stopping's
patience, which tags survive pruning, which tag a run resumes from, which seed's best checkpoint is chosen, and
which config changes a resume refuses."""

import json
from pathlib import Path

import pytest

from fusion_dist.config import load_config, to_yaml
from fusion_dist.errors import UserError
from fusion_dist.rundir import TRAINABLE, RunDir
from fusion_dist.train.checkpoint import COMPLETE, Checkpoints, EarlyStopping, Plateau, TrainState


def test_train_state_round_trips_through_json():
    state = TrainState(epoch=2, step_in_epoch=5, global_step=21, tracking={"parent": "p1", "child": "c1"},
                       early_stopping=EarlyStopping(best=0.75, best_tag="step16", bad_epochs=1),
                       plateau=Plateau(best=0.75, bad_epochs=1, scale=0.1))
    again = TrainState()
    again.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert again == state
    assert again.early_stopping is not state.early_stopping and again.tracking is not state.tracking
    # a dict as older checkpoints hold it (with the keys Checkpoints.save adds) loads the same way
    again.load_state_dict({**state.state_dict(), "world_size": 2, "rng": [None, None]})
    assert again == state


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    es = EarlyStopping()
    for epoch, mae in enumerate([0.9, 0.8, 0.8, 0.7, 0.75, 0.71]):
        assert not es.stop, epoch
        es.update(mae, f"step{epoch}", patience=2)
    # a tie (0.8 after 0.8) is no improvement; an improvement resets the count
    assert (es.best, es.best_tag, es.bad_epochs, es.stop) == (0.7, "step3", 2, True)
    es = EarlyStopping()
    for epoch, mae in enumerate([0.9, 0.95, 0.8, 0.99]):
        es.update(mae, f"step{epoch}", patience=2)
    assert (es.best_tag, es.bad_epochs, es.stop) == ("step2", 1, False)


def make_tags(root: Path, steps, complete=True) -> None:
    for s in steps:
        (root / f"step{s}").mkdir(parents=True)
        if complete:
            (root / f"step{s}" / COMPLETE).touch()


def test_pruning_keeps_the_last_k_and_the_best(tmp_path):
    ck = Checkpoints(tmp_path, keep_last=2)
    make_tags(tmp_path, [3, 6, 9, 12, 15])
    ck._prune(keep={"step15", "step6"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step12", "step15", "step6"]
    Checkpoints(tmp_path, keep_last=0)._prune(keep={"step15", "step6"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step15", "step6"]


def test_resume_tag_falls_back_to_the_newest_complete_one(tmp_path):
    ck = Checkpoints(tmp_path, keep_last=2)
    assert ck.latest() is None
    make_tags(tmp_path, [3, 10])
    make_tags(tmp_path, [12], complete=False)  # the save that was killed
    assert ck.tags() == ["step3", "step10"]  # by step number, not by name
    (tmp_path / "latest").write_text("step10\n")
    assert ck.latest() == "step10"
    for gone in ("step12", "step99"):
        (tmp_path / "latest").write_text(gone)
        assert ck.latest() == "step10"
    for tag in ("step3", "step10"):
        (tmp_path / tag / COMPLETE).unlink()
    with pytest.raises(UserError, match="no complete checkpoint is left"):
        ck.latest()


def test_checkpoints_without_latest_are_refused(tmp_path):
    ck = Checkpoints(tmp_path, keep_last=2)
    ck.check()  # nothing there: a fresh start
    make_tags(tmp_path, [4, 8])
    with pytest.raises(UserError, match="latest: missing, but checkpoints step4, step8 survive"):
        ck.check()
    (tmp_path / "latest").write_text("step8")
    ck.check()


def finish_seed(run_dir: Path, seed: int, mae: float | None) -> None:
    d = run_dir / "checkpoints" / f"seed{seed}"
    make_tags(d, [5])
    (d / "step5" / TRAINABLE).touch()
    (d / "result.json").write_text(json.dumps({"seed": seed, "stage": "train", "best_tag": "step5",
                                               "valid": {"MAE": mae}, "test": {"MAE": 1.0}}))


def test_best_checkpoint_is_the_seed_with_the_lowest_validation_mae(tmp_path):
    with pytest.raises(UserError, match="no finished training"):
        RunDir(tmp_path).best_checkpoint(None)
    finish_seed(tmp_path, 0, 0.4)
    finish_seed(tmp_path, 1, 0.0)  # a perfect score is the best, not a missing one
    finish_seed(tmp_path, 2, None)  # not finite: never chosen
    stage, path = RunDir(tmp_path).best_checkpoint(None)
    assert stage == "train" and path == tmp_path / "checkpoints/seed1/step5" / TRAINABLE
    assert RunDir(tmp_path).best_checkpoint(0)[1].parts[-3] == "seed0"
    with pytest.raises(UserError, match="no finished seed 7; finished: \\[0, 1, 2\\]"):
        RunDir(tmp_path).best_checkpoint(7)


def test_the_resume_guard_names_what_a_resume_cannot_take(tmp_path):
    base = ["data.root=/d", "model.backbone=/b", f"run.dir={tmp_path}", "model.mm_layers=[1,3]"]
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(None, base)))
    (tmp_path / "stage").write_text("train")
    changed = load_config(None, [*base, "train.lr=5e-3", "model.n_fusion=4", "train.patience=3"])
    assert RunDir(tmp_path).check_resumable(changed, "train") == []  # no checkpoint yet: anything goes
    make_tags(tmp_path / "checkpoints/seed0", [5])
    with pytest.raises(UserError, match=r"model\.n_fusion: 8 -> 4, train\.lr: 0\.0001 -> 0\.005"):
        RunDir(tmp_path).check_resumable(changed, "train")
    applied = load_config(None, [*base, "train.patience=3", "train.keep_last=5", "data.root=/moved", "run.seeds=[0,1]"])
    assert RunDir(tmp_path).check_resumable(applied, "train") == ["train.patience", "train.keep_last"]
    # evaluation only needs the model to be the same
    assert RunDir(tmp_path).check_resumable(load_config(None, [*base, "train.lr=5e-3"]), "train", training=False) == []
    with pytest.raises(UserError, match="holds a 'train' run, not 'pretrain-av'"):
        RunDir(tmp_path).check_resumable(applied, "pretrain-av")


def test_plateau_scales_the_lr_after_more_than_patience_epochs_without_improvement():
    p = Plateau()
    scales = []
    for mae in [0.9, 0.8, 0.8, 0.79995, 0.81, 0.7, 0.75, 0.75, 0.75]:  # 0.79995: within 1e-4 of 0.8, no improvement
        p.update(mae, patience=2, factor=0.1)
        scales.append(p.scale)
    assert scales == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01])
    assert (p.best, p.bad_epochs) == (0.7, 0)
