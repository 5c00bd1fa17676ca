"""One training loop for both stages, on the DeepSpeed engine, on any number of ranks.

    fusion-dist pretrain-av CONFIG [key=value ...] [--restart]   # stage 1: the AV encoder alone (-> model.av.checkpoint)
    fusion-dist train CONFIG [key=value ...] [--restart]         # stage 2: DeepMLF / DMPF
    fusion-dist evaluate CONFIG [key=value ...]      # metrics of each seed's best checkpoint
    launched by any launcher, e.g.  deepspeed --num_gpus 2 $(which fusion-dist) train CONFIG

A step is one optimizer step over the global batch G (micro-batch x accumulation x world size): step s
of an epoch takes samples ``s*G .. (s+1)*G`` of the epoch's permutation, cut into micro-batches dealt
round-robin to the ranks (``RankSampler(chunk=micro)``), so the same config run on 1 rank (accumulation x
world) or on N ranks trains on the same micro-batches and takes the same steps. Each epoch takes
``n_train // G`` steps; the incomplete final global batch is dropped (its samples come back in the next
epoch's shuffle), so every step is whole and a step number fixes the data position.

Run directory (SPEC 7)::

    config.yaml  ds_config.json  metrics.json  predictions/<split>[-seed<S>].csv  export/
    checkpoints/seed<S>/step<N>/   DeepSpeed states without frozen weights + trainable.safetensors (gathered)
    checkpoints/seed<S>/step<N>/complete   written once every rank finished saving the tag
    checkpoints/seed<S>/latest     the tag to resume from, written after ``complete``
    checkpoints/seed<S>/result.json   the seed's final metrics (a finished seed is not trained again)
    logs/seed<S>.jsonl             one line per optimizer step: losses by term, lr, grad norm

Checkpoints come every ``train.checkpoint_every_steps`` steps and at each epoch end; the last
``train.keep_last`` and the best (lowest validation MAE) are kept. Client state saved with them:
``epoch``, ``step_in_epoch`` (sampler position = step_in_epoch x micro x accum samples of this epoch),
``global_step``, ``world_size``, ``rng`` (python/numpy/torch/cuda states of every rank),
``early_stopping`` (best MAE, best tag, epochs without improvement, stop flag) and ``tracking``
(MLflow parent and child run ids). Re-running the same command resumes from ``latest`` exactly.

Preemption: SIGUSR1 or SIGTERM to the rank processes -> the step in flight finishes, every rank
saves a checkpoint, and the job exits with code ``PREEMPTED_EXIT = 85`` (the SLURM scripts turn
that into ``scontrol requeue``; the requeued job resumes).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from fusion_dist.config import Config, ConfigError, batch_geometry, load_config, to_flat_dict, to_yaml
from fusion_dist.data import RankSampler, ShardDataset, check_root, read_manifest
from fusion_dist.errors import UserError
from fusion_dist.export import build_for_stage, check_export_target, rebuild, write_export
from fusion_dist.predict import collator_for, evaluate_split, to_device, write_predictions
from fusion_dist.train import dist
from fusion_dist.train.checkpoint import (KEY_METRIC, TRAINABLE, Checkpoints, atomic_write, best_checkpoint, best_seed,
                                          check_resumable, load_weights, rng_state, set_rng_state)
from fusion_dist.train.dist import log
from fusion_dist.train.metrics import MOSI_NAMES, SIMS_NAMES, json_safe, mmsa_metrics

PREEMPTED_EXIT = 85


# ----------------------------------------------------------------------------- small helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def metric_table(rows: dict[str, dict[str, float]], names: list[str], stds: dict | None = None) -> str:
    """Plain text table: one row per entry of ``rows``, one column per metric (``mean ± std`` with stds)."""
    width = max(10, *(len(n) for n in names))
    head = f"{'':12s}" + "".join(f"{n:>{width + 2}s}" for n in names)
    lines = [head]
    for label, m in rows.items():
        cells = []
        for n in names:
            v = m.get(n, math.nan)
            s = f"{v:.4f}" if stds is None else f"{v:.4f}±{stds[label].get(n, math.nan):.4f}"
            cells.append(f"{s:>{width + 2}s}")
        lines.append(f"{label:12s}" + "".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- preemption


class Preemption:
    """SIGUSR1/SIGTERM set a flag; the loop checks it after each step (agreed across ranks)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


class Preempted(Exception):
    pass


# ----------------------------------------------------------------------------- the run


class SeedRun:
    """Training of one seed: engine, data, loop, checkpoints, final evaluation of the best checkpoint."""

    def __init__(self, cfg: Config, stage: str, seed: int, run_dir: Path, denv: dist.DistEnv, manifest: dict,
                 ds_config: dict, tracker, preemption: Preemption):
        self.cfg, self.stage, self.seed, self.run_dir, self.denv = cfg, stage, seed, run_dir, denv
        self.manifest, self.ds_config, self.tracker, self.preemption = manifest, ds_config, tracker, preemption
        self.ckpt = Checkpoints(run_dir / "checkpoints" / f"seed{seed}", cfg.train.keep_last)
        self.dims = {m: manifest["features"][m]["dim"] for m in ("audio", "vision")}
        self.multi_seed = len(cfg.run.seeds) > 1

    # -- pieces

    def _datasets(self):
        return {s: ShardDataset(self.cfg.data.root, s) for s in ("train", "valid", "test")}  # checked in _setup

    def _train_cfg(self):
        t = self.cfg.train
        # stage 1 trains the encoder and its small head together at the AV learning rate
        return t if self.stage == "train" else type(t)(**{**t.__dict__, "lr": t.av_lr})

    def result_file(self) -> Path:
        return self.ckpt.root / "result.json"

    # -- the loop

    def run(self) -> dict:
        from fusion_dist.train import engine as E

        cfg, t, denv = self.cfg, self.cfg.train, self.denv
        if self.result_file().is_file():
            log.info(f"seed {self.seed}: already finished ({self.result_file()})")
            return json.loads(self.result_file().read_text())
        data = self._datasets()
        _seed_everything(self.seed)
        with E.model_init(self.ds_config):
            model = build_for_stage(cfg, self.stage, self.dims["audio"], self.dims["vision"])
        collator = collator_for(model, cfg.data.max_text_tokens)
        geometry = batch_geometry(t, denv.world_size)
        micro, accum = geometry.micro, geometry.accumulation
        sampler = RankSampler(len(data["train"]), denv.rank, denv.world_size, shuffle=True, seed=self.seed,
                              drop_last=True, chunk=micro)
        steps_per_epoch = geometry.steps_per_epoch(len(data["train"]))
        total = t.epochs * steps_per_epoch
        engine = E.initialize(model, self._train_cfg(), self.ds_config, total, round(t.warmup_epochs * steps_per_epoch))
        log.info(
            f"seed {self.seed}: {self.stage} | {geometry} | {steps_per_epoch} steps/epoch x {t.epochs} epochs "
            f"| ZeRO-{t.zero_stage} {t.precision}"
        )

        state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0,
                 "early_stopping": {"best": None, "best_tag": None, "bad_epochs": 0, "stop": False},
                 "tracking": {"parent": self.tracker.parent_run_id, "child": None}}
        tag = self.ckpt.latest()
        if tag:
            _, client = engine.load_checkpoint(str(self.ckpt.root), tag=tag, load_module_strict=False)
            if client["world_size"] != denv.world_size:
                raise UserError(
                    f"{self.ckpt.root}/{tag}: saved by {client['world_size']} ranks, resumed on {denv.world_size}; "
                    "resume with the same number of ranks"
                )
            state = {k: client[k] for k in state}
            set_rng_state(client["rng"][denv.rank])
            log.info(f"seed {self.seed}: resumed from {tag} (epoch {state['epoch']}, step "
                     f"{state['step_in_epoch']} of {steps_per_epoch} in the epoch, global step {state['global_step']})")
        state["tracking"]["child"] = self.tracker.start_child(self.seed, state["tracking"]["child"])
        history = self.run_dir / "logs" / f"seed{self.seed}.jsonl"
        if denv.is_main:
            history.parent.mkdir(parents=True, exist_ok=True)
            kept = [ln for ln in (history.read_text().splitlines() if history.is_file() else [])
                    if json.loads(ln)["step"] <= state["global_step"]]
            atomic_write(history, "".join(ln + "\n" for ln in kept))

        def save(tag: str) -> None:
            # A checkpoint keeps rank 0's module state, so the ranks' BatchNorm statistics must agree first
            # for a resumed run to continue like an uninterrupted one (the running averages are linear, so
            # averaging them early does not change the average taken at the epoch end).
            dist.average_buffers(engine.module)
            client = {**state, "world_size": denv.world_size, "rng": dist.all_gather_object(rng_state())}
            self.ckpt.save(engine, tag, client, state["early_stopping"]["best_tag"], denv)

        es = state["early_stopping"]
        loader_gen = torch.Generator()  # the DataLoader must not draw from the global RNG (exact resume)
        reported = False
        while state["epoch"] < t.epochs and not es["stop"]:
            epoch = state["epoch"]
            sampler.set_epoch(epoch)
            sampler.start_at(state["step_in_epoch"] * micro * accum)
            loader = torch.utils.data.DataLoader(data["train"], batch_size=micro, sampler=sampler,
                                                 collate_fn=collator, drop_last=True, generator=loader_gen)
            batches = iter(loader)
            engine.train()
            window = {"t0": time.perf_counter(), "steps": 0, "terms": {}}
            while state["step_in_epoch"] < steps_per_epoch:
                terms: dict[str, float] = {}
                for a in range(accum):
                    # dropout/augmentation noise drawn from the micro-batch's position in the epoch, not
                    # from the rank: the same micro-batch gets the same noise on any number of ranks
                    position = (state["step_in_epoch"] * accum + a) * denv.world_size + denv.rank
                    torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, position]).generate_state(1)[0]))
                    out = engine(to_device(next(batches), engine.device))
                    engine.backward(out.loss)
                    engine.step()
                    for k, v in out.losses.items():
                        terms[k] = terms.get(k, 0.0) + float(v) / accum
                    terms["loss"] = terms.get("loss", 0.0) + float(out.loss.detach()) / accum
                state["step_in_epoch"] += 1
                state["global_step"] += 1
                if not reported:  # after the first step: the optimizer creates its moments there
                    held, reported = E.model_state_bytes(engine), True
                    log.info(f"model state held by rank 0: weights {held['weights'] / 2**30:.3f} GiB + optimizer "
                             f"{held['optimizer'] / 2**30:.3f} GiB (compare: fusion-dist plan)")
                terms, stop = self._agree(terms)
                self._record_step(engine, state, terms, window, history, steps_per_epoch)
                step = state["global_step"]
                if stop:
                    save(f"step{step}")
                    raise Preempted(f"seed {self.seed}: preempted; saved step{step}")
                if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0 \
                        and state["step_in_epoch"] < steps_per_epoch:
                    save(f"step{step}")
            # epoch end: validate, early stopping, checkpoint
            dist.average_buffers(engine.module)
            engine.eval()
            ids, preds, labels = evaluate_split(engine, data["valid"], collator, t.eval_batch_size, denv)
            valid = mmsa_metrics(preds, labels, self.manifest.get("metrics", "mosi"))
            tag = f"step{state['global_step']}"
            if es["best"] is None or valid[KEY_METRIC] < es["best"]:
                es.update(best=valid[KEY_METRIC], best_tag=tag, bad_epochs=0)
            else:
                es["bad_epochs"] += 1
                es["stop"] = es["bad_epochs"] >= t.patience
            log.info(f"seed {self.seed} epoch {epoch + 1}/{t.epochs}: valid " +
                     " ".join(f"{k} {v:.4f}" for k, v in valid.items()) +
                     f" | best {KEY_METRIC} {es['best']:.4f} ({es['best_tag']})" +
                     (f" | early stop after {es['bad_epochs']} epochs without improvement" if es["stop"] else ""))
            self.tracker.log_metrics({f"valid/{k}": v for k, v in valid.items() if math.isfinite(v)},
                                     state["global_step"])
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            save(tag)
            if self.preemption.requested:
                raise Preempted(f"seed {self.seed}: preempted at an epoch end; saved {tag}")

        # the final evaluation runs on the engine's own module with the best checkpoint's weights put back:
        # a rebuilt model beside the engine would hold a second full copy of the backbone on every rank
        best_tag = es["best_tag"]
        load_weights(engine.module, load_file(str(self.ckpt.root / best_tag / TRAINABLE)))
        engine.eval()
        return self._final_evaluation(engine, collator, best_tag, data)

    def _agree(self, terms: dict[str, float]) -> tuple[dict[str, float], bool]:
        """Loss terms averaged over ranks, and whether any rank was asked to stop (one all-reduce)."""
        keys = sorted(terms)
        vec = torch.tensor([terms[k] for k in keys] + [float(self.preemption.requested)], dtype=torch.float64)
        if torch.distributed.is_initialized() and self.denv.world_size > 1:
            torch.distributed.all_reduce(vec)
            vec[:-1] /= self.denv.world_size
        return dict(zip(keys, vec[:-1].tolist())), bool(vec[-1] > 0)

    def _record_step(self, engine, state: dict, terms: dict, window: dict, history: Path, steps_per_epoch: int):
        t = self.cfg.train
        # the LM side's learning rate (train.lr; in stage 1 the head's, which trains at av_lr), by group name
        lr = next(g["lr"] for g in engine.optimizer.param_groups if g["name"].startswith("lm"))
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        step = state["global_step"]
        window["steps"] += 1
        for k, v in terms.items():
            window["terms"][k] = window["terms"].get(k, 0.0) + v
        if self.denv.is_main:
            row = {"step": step, "epoch": state["epoch"], "lr": lr, "grad_norm": grad_norm, **terms}
            with history.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        if step % max(1, t.log_every_steps) == 0 or state["step_in_epoch"] == steps_per_epoch:
            gates = self._gate_values(engine.module)
            elapsed = time.perf_counter() - window["t0"]
            rate = window["steps"] * t.global_batch_size / max(elapsed, 1e-9)
            mean = {k: v / window["steps"] for k, v in window["terms"].items()}
            log.info(f"step {step} (epoch {state['epoch'] + 1}, {state['step_in_epoch']}/{steps_per_epoch}) | " +
                     " ".join(f"{k} {v:.4f}" for k, v in mean.items()) + f" | lr {lr:.3e} | {rate:.1f} samples/s")
            metrics = {f"train/{k}": v for k, v in mean.items()}
            metrics.update({"train/lr": lr, "train/samples_per_s": rate, "train/step_time_s": elapsed / window["steps"]})
            if grad_norm is not None:
                metrics["train/grad_norm"] = grad_norm
            metrics.update({f"gate/{k}": v for k, v in gates.items()})
            self.tracker.log_metrics(metrics, step)
            window.update(t0=time.perf_counter(), steps=0, terms={})

    @staticmethod
    def _gate_values(module) -> dict[str, float]:
        if not hasattr(module, "gate_values"):
            return {}
        from fusion_dist.models import gathered

        with gathered([p for n, p in module.named_parameters() if "gate" in n]):
            return module.gate_values()

    def _final_evaluation(self, engine, collator, best_tag: str, data: dict) -> dict:
        """Score valid and test with the engine holding the best checkpoint's weights."""
        cfg, denv = self.cfg, self.denv
        result = {"seed": self.seed, "stage": self.stage, "best_tag": best_tag}
        for split in ("valid", "test"):
            ids, preds, labels = evaluate_split(engine, data[split], collator, cfg.train.eval_batch_size, denv)
            result[split] = mmsa_metrics(preds, labels, self.manifest.get("metrics", "mosi"))
            if denv.is_main:
                suffix = f"-seed{self.seed}" if self.multi_seed else ""
                write_predictions(self.run_dir / "predictions" / f"{split}{suffix}.csv", ids, preds, labels)
        self.tracker.end_child({f"test/{k}": v for k, v in result["test"].items() if math.isfinite(v)})
        if denv.is_main:
            atomic_write(self.result_file(), json.dumps(json_safe(result), indent=2))
        dist.barrier()
        return json.loads(json.dumps(json_safe(result)))


def summarize(results: dict[int, dict], metric_set: str) -> dict:
    """metrics.json: per seed, and mean/std over seeds (sample std, 0 for one seed) of every metric."""
    names = MOSI_NAMES if metric_set == "mosi" else SIMS_NAMES
    out: dict[str, Any] = {"metric_set": metric_set, "key_metric": KEY_METRIC,
                           "seeds": {str(s): r for s, r in results.items()}, "mean": {}, "std": {}}
    for split in ("valid", "test"):
        out["mean"][split], out["std"][split] = {}, {}
        for n in names:
            vals = np.array([math.nan if r[split].get(n) is None else r[split][n] for r in results.values()], float)
            out["mean"][split][n] = float(vals.mean())
            out["std"][split][n] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    return out


def _print_summary(summary: dict) -> None:
    names = MOSI_NAMES if summary["metric_set"] == "mosi" else SIMS_NAMES
    rows = {f"seed {s}": {k: (math.nan if v is None else v) for k, v in r["test"].items()}
            for s, r in summary["seeds"].items()}
    log.info("test metrics (best validation checkpoint of each seed):\n" + metric_table(rows, names))
    mean, std = summary["mean"]["test"], summary["std"]["test"]
    log.info(metric_table({"mean±std": mean}, names, {"mean±std": std}))


def _check_model_inputs(cfg: Config) -> None:
    """Backbone and stage-1 checkpoint problems, found before anything is written."""
    from fusion_dist.models.av_encoder import load_av_encoder
    from fusion_dist.models.backbone import load_backbone_config
    from fusion_dist.models.build import validate

    config = load_backbone_config(cfg.model.backbone)
    validate(cfg.model, config.num_hidden_layers, config.hidden_size)
    if cfg.model.av.init.startswith("pretrained"):
        load_av_encoder(cfg.model.av.checkpoint, cfg.model.av)


def _setup(cfg: Config, stage: str, restart: bool = False):
    """Checks that must fail before any heavy work, then the process group and the run directory (emptied of
    its checkpoints and step logs first with ``restart``)."""
    denv = dist.init_distributed(cfg.train.dist_timeout_s)
    manifest = check_root(cfg.data.root, cfg.data.verify_checksums)
    from fusion_dist.train import engine as E

    E.check_train_config(cfg.train)
    n_train = manifest["splits"]["train"]["rows"]
    if batch_geometry(cfg.train, denv.world_size).steps_per_epoch(n_train) == 0:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size}: larger than the "
                          f"{n_train} training samples of {cfg.data.root}; lower it")
    E.return_freed_memory_promptly()
    if stage == "train":
        _check_model_inputs(cfg)
    dims = {m: manifest["features"][m]["dim"] for m in ("audio", "vision")}
    shape = build_for_stage(cfg, stage, dims["audio"], dims["vision"], meta=True)
    ds_config = E.deepspeed_config(cfg.train, denv.world_size, sum(p.numel() for p in shape.parameters()
                                                                   if p.requires_grad))
    del shape
    run_dir = Path(cfg.run.dir)
    check_export_target(run_dir / "export", run_dir)
    if not restart:
        applied = check_resumable(cfg, run_dir, stage)
        for seed in cfg.run.seeds:
            ckpt = Checkpoints(run_dir / "checkpoints" / f"seed{seed}", cfg.train.keep_last)
            ckpt.check()
            if applied and (ckpt.root / "result.json").is_file():
                log.warning(f"seed {seed}: already finished; {', '.join(applied)} changed since, which does not "
                            "train it again (use a new run.dir, or --restart)")
    dist.barrier()  # every rank checked the old state before rank 0 changes it
    if denv.is_main:
        if restart:
            for old in (run_dir / "checkpoints", run_dir / "logs"):
                shutil.rmtree(old, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", to_yaml(cfg))
        atomic_write(run_dir / "ds_config.json", json.dumps(ds_config, indent=2))
        atomic_write(run_dir / "stage", stage)
    dist.barrier()
    return denv, manifest, ds_config, run_dir


def train_command(cfg: Config, stage: str, restart: bool = False) -> int:
    denv, manifest, ds_config, run_dir = _setup(cfg, stage, restart)
    log.info(to_yaml(cfg))
    from fusion_dist.tracking import Tracker

    tracker = Tracker(cfg, run_dir, denv.rank, manifest.get("dataset", "custom"))
    tags = {"stage": stage, "model.family": cfg.model.family, "model.backbone": cfg.model.backbone,
            "model.mm_layers": str(list(cfg.model.mm_layers)), "model.n_fusion": cfg.model.n_fusion,
            "train.zero_stage": cfg.train.zero_stage, "world_size": denv.world_size}
    tracker.start_parent(to_flat_dict(cfg), tags)
    preemption = Preemption()
    results = {}
    try:
        for seed in cfg.run.seeds:
            run = SeedRun(cfg, stage, seed, run_dir, denv, manifest, ds_config, tracker, preemption)
            results[seed] = run.run()
    except Preempted as exc:
        log.warning(f"{exc}; exiting with {PREEMPTED_EXIT} so the job can be requeued")
        dist.shutdown()
        return PREEMPTED_EXIT
    except BaseException as exc:  # the runs end FAILED (KILLED when interrupted); a resume reopens them
        tracker.fail("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    summary = summarize(results, manifest.get("metrics", "mosi"))
    if denv.is_main:
        atomic_write(run_dir / "metrics.json", json.dumps(json_safe(summary), indent=2))
        seed = best_seed(results)
        write_export(run_dir / "export", cfg, stage,
                     load_file(str(run_dir / "checkpoints" / f"seed{seed}" / results[seed]["best_tag"] / TRAINABLE)),
                     manifest, run_dir)
        _print_summary(summary)
    tracker.log_artifact(run_dir / "metrics.json")
    tracker.end_parent({f"test/{k}_mean": v for k, v in summary["mean"]["test"].items() if math.isfinite(v)})
    dist.barrier()
    dist.shutdown()
    return 0


def evaluate_command(cfg: Config) -> int:
    """Metrics of each finished seed's best checkpoint (rebuilt from backbone + weights), on any world size."""
    denv = dist.init_distributed(cfg.train.dist_timeout_s)
    manifest = read_manifest(cfg.data.root)
    run_dir = Path(cfg.run.dir)
    stage_file = run_dir / "stage"
    if not stage_file.is_file():
        raise UserError(f"run.dir: {run_dir} holds no training run")
    stage = stage_file.read_text().strip()
    check_resumable(cfg, run_dir, stage, training=False)
    dims = {m: manifest["features"][m]["dim"] for m in ("audio", "vision")}
    data = {s: ShardDataset(cfg.data.root, s) for s in ("valid", "test")}
    results = {}
    for seed in cfg.run.seeds:
        _, weights_file = best_checkpoint(run_dir, seed)
        model = rebuild(cfg, stage, dims["audio"], dims["vision"], load_file(str(weights_file)))
        collator = collator_for(model, cfg.data.max_text_tokens)
        results[seed] = {"seed": seed, "stage": stage, "best_tag": weights_file.parent.name}
        for split, ds in data.items():
            ids, preds, labels = evaluate_split(model, ds, collator, cfg.train.eval_batch_size, denv)
            results[seed][split] = mmsa_metrics(preds, labels, manifest.get("metrics", "mosi"))
            if denv.is_main:
                suffix = f"-seed{seed}" if len(cfg.run.seeds) > 1 else ""
                write_predictions(run_dir / "predictions" / f"{split}{suffix}.csv", ids, preds, labels)
    summary = summarize(json.loads(json.dumps(json_safe(results))), manifest.get("metrics", "mosi"))
    if denv.is_main:
        atomic_write(run_dir / "metrics.json", json.dumps(json_safe(summary), indent=2))
        _print_summary(summary)
    dist.barrier()
    dist.shutdown()
    return 0


# ----------------------------------------------------------------------------- CLI entry points


def _parse(argv: list[str], prog: str) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(prog=f"fusion-dist {prog}")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    if prog != "evaluate":
        p.add_argument("--restart", action="store_true",
                       help="train run.dir from scratch: delete its checkpoints and step logs first")
    args = p.parse_args(argv)
    return load_config(args.config, args.overrides), getattr(args, "restart", False)


def main_pretrain_av(argv: list[str]) -> int:
    cfg, restart = _parse(argv, "pretrain-av")
    return train_command(cfg, "pretrain-av", restart)


def main_train(argv: list[str]) -> int:
    cfg, restart = _parse(argv, "train")
    return train_command(cfg, "train", restart)


def main_evaluate(argv: list[str]) -> int:
    return evaluate_command(_parse(argv, "evaluate")[0])
