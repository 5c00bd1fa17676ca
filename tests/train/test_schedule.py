"""Training length as the paper trains: warmup, then the LR schedule over its own horizon, early stopping as the
normal end of a run and ``epochs`` only a cap. Stage 1 (the AV encoder alone) on one rank keeps it fast; stage 2 runs
the same loop."""

import math
import re

from conftest import base_args, history, run_cli

CAP, LR, MIN_LR = 40, 0.05, 1e-4


def stage1(engine_inputs, run_dir, *extra):
    args = base_args(engine_inputs, run_dir, f"pretrain.epochs={CAP}", "pretrain.global_batch_size=16",
                     "pretrain.micro_batch_size=16", f"pretrain.lr={LR}", f"train.min_lr={MIN_LR}", *extra)
    r = run_cli("pretrain-av", args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = history(run_dir)
    epochs = sorted({row["epoch"] for row in rows})
    return r, rows, epochs, sum(row["epoch"] == 0 for row in rows)


def test_early_stopping_ends_the_run_before_the_cap_and_the_lr_is_warmup_then_cosine(engine_inputs, tmp_path):
    r, rows, epochs, spe = stage1(engine_inputs, tmp_path / "run", "pretrain.schedule=cosine",
                                  "pretrain.warmup_epochs=1", "pretrain.schedule_epochs=2", "pretrain.patience=2")
    assert len(epochs) < CAP and re.search(r"early stop after 2 epochs without improvement", r.stderr + r.stdout)
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "export").is_dir()
    assert len(epochs) >= 4, epochs  # past the warmup and a cosine period
    period = 2 * spe
    for row in rows:  # the lr logged after step s is the one step s + 1 trains at: factor(s)
        s = row["step"]
        t = (s - spe) % period
        want = LR * (s + 1) / spe if s < spe else MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * t / period))
        assert math.isclose(row["lr"], want, rel_tol=1e-6), (s, row["lr"], want)


def test_plateau_schedule_drops_the_lr_at_epoch_ends_without_improvement(engine_inputs, tmp_path):
    r, rows, epochs, spe = stage1(engine_inputs, tmp_path / "run", "pretrain.schedule=plateau",
                                  "pretrain.plateau_patience=0", "pretrain.plateau_factor=0.5", "pretrain.patience=3")
    per_epoch = [[row["lr"] for row in rows if row["epoch"] == e] for e in epochs]
    assert all(len(set(lrs)) == 1 for lrs in per_epoch[:-1]), per_epoch  # the last step's row already has the next
    firsts = [lrs[0] for lrs in per_epoch]
    ratios = [b / a for a, b in zip(firsts, firsts[1:])]
    assert firsts[0] == LR and all(math.isclose(x, 1.0) or math.isclose(x, 0.5) for x in ratios), firsts
    assert any(math.isclose(x, 0.5) for x in ratios), firsts
