"""The training commands, launched by any launcher (``deepspeed --num_gpus 2 $(which fusion-dist) train CONFIG``)::

    fusion-dist pretrain-av CONFIG [key=value ...] [--restart]   # stage 1: the AV encoder alone (-> model.av.checkpoint)
    fusion-dist train CONFIG [key=value ...] [--restart]         # stage 2: DeepMLF / DMPF
    fusion-dist evaluate CONFIG [key=value ...]                  # metrics of each seed's best checkpoint

Before anything is written, every input is checked (``setup``); then each seed of ``run.seeds`` trains
(``loop.SeedRun``), ``metrics.json`` summarises them and the best seed's best checkpoint is exported. Re-running
the same command resumes from each seed's ``latest`` checkpoint, on the same or any other number of ranks.

Preemption: SIGUSR1 or SIGTERM to the rank processes -> the step in flight finishes, every rank
saves a checkpoint, and the job exits with code ``PREEMPTED_EXIT = 85`` (the SLURM scripts turn
that into ``scontrol requeue``; the requeued job resumes).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
from dataclasses import replace

from safetensors.torch import load_file

from fusion_dist import dist
from fusion_dist.config import (
    PRETRAIN_AV, TRAIN, Config, ConfigError, batch_geometry, load_config, pretrain_replaces, stage_config, to_flat_dict,
    to_yaml,
)
from fusion_dist.data import ShardDataset, check_root, feature_dims, metric_set, read_manifest
from fusion_dist.dist import log
from fusion_dist.export import backbone_reference, check_backbone, check_export_target, write_export
from fusion_dist.models.build import build_for_stage, rebuild
from fusion_dist.predict import collator_for
from fusion_dist.rundir import RunDir, atomic_write, best_seed, summarize, summary_text, write_json
from fusion_dist.train import engine as E
from fusion_dist.train.checkpoint import Checkpoints
from fusion_dist.train.loop import Preempted, SeedRun, score_splits

PREEMPTED_EXIT = 85


class Preemption:
    """SIGUSR1/SIGTERM set a flag; the loop checks it after each step (agreed across ranks)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def _check_model_inputs(cfg: Config) -> None:
    """Backbone and stage-1 checkpoint problems, found before anything is written."""
    from fusion_dist.models.av_encoder import load_av_encoder
    from fusion_dist.models.backbone import load_backbone_config
    from fusion_dist.models.build import validate

    from fusion_dist.models.dmpf import unimodal_encoder_config

    config = load_backbone_config(cfg.model.backbone)
    validate(cfg.model, config.num_hidden_layers, config.hidden_size)
    if cfg.model.av.init.startswith("pretrained"):
        load_av_encoder(cfg.model.av.checkpoint, cfg.model.av)
    for which in ("audio_encoder", "video_encoder"):
        if getattr(cfg.model, which).init == "stage1":
            load_av_encoder(cfg.model.av.checkpoint, unimodal_encoder_config(cfg.model, which), key=f"model.{which}")


def setup(cfg: Config, stage: str, restart: bool = False):
    """Checks that must fail before any heavy work, then the process group and the run directory (emptied of
    its checkpoints and step logs first with ``restart``)."""
    denv = dist.init_distributed(cfg.train.dist_timeout_s)
    manifest = check_root(cfg.data.root, cfg.data.verify_checksums)
    E.check_train_config(cfg.train)
    n_train = manifest["splits"]["train"]["rows"]
    if batch_geometry(cfg.train, denv.world_size).steps_per_epoch(n_train) == 0:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size}: larger than the "
                          f"{n_train} training samples of {cfg.data.root}; lower it")
    if cfg.model.loss.unimodal_labels and not manifest.get("unimodal_labels"):
        raise ConfigError(f"model.loss.unimodal_labels=true: {cfg.data.root} has no unimodal labels (label_T, label_A, "
                          "label_V; CH-SIMS has them)")
    E.return_freed_memory_promptly()
    run = RunDir(cfg.run.dir)
    # config.yaml and the resume guard keep model.backbone as given; what loads is the run's own (backbone.json)
    loads = replace(cfg, model=replace(cfg.model, backbone=cfg.model.backbone if restart else
                                       run.trained_backbone(cfg.model.backbone)))
    if stage == TRAIN:
        _check_model_inputs(loads)
    shape = build_for_stage(loads, stage, feature_dims(manifest), meta=True)
    ds_config = E.deepspeed_config(cfg.train, denv.world_size, sum(p.numel() for p in shape.parameters()
                                                                   if p.requires_grad))
    del shape
    check_export_target(run.export, run.root)
    if stage == TRAIN and not restart:
        check_backbone(run, cfg.model.backbone)
    if not restart:
        applied = run.check_resumable(cfg, stage)
        for seed in cfg.run.seeds:
            Checkpoints(run.checkpoints(seed), cfg.train.keep_last).check()
            if applied and run.result(seed).is_file():
                log.warning(f"seed {seed}: already finished; {', '.join(applied)} changed since, which does not "
                            "train it again (use a new run.dir, or --restart)")
    dist.barrier()  # every rank checked the old state before rank 0 changes it
    if denv.is_main:
        if restart:
            for old in (run.checkpoints(), run.logs):
                shutil.rmtree(old, ignore_errors=True)
        run.root.mkdir(parents=True, exist_ok=True)
        atomic_write(run.config, to_yaml(cfg))
        atomic_write(run.ds_config, json.dumps(ds_config, indent=2))
        atomic_write(run.stage_file, stage)
        if stage == TRAIN and not (run.backbone.is_file() and run.has_checkpoints()):
            write_json(run.backbone, backbone_reference(cfg.model.backbone))
    dist.barrier()
    if stage == TRAIN:
        cfg.model.backbone = run.trained_backbone(cfg.model.backbone)
    return denv, manifest, ds_config, run


def study_axes(cfg: Config) -> dict[str, int]:
    """The studied architecture axes as plain numbers, for MLflow's scatter and parallel-coordinates views."""
    mm = list(cfg.model.mm_layers)
    return {"model.n_mm_layers": len(mm), "model.first_mm_layer": min(mm) if mm else -1}


def train_command(cfg: Config, stage: str, restart: bool = False) -> int:
    cfg = stage_config(cfg, stage)
    denv, manifest, ds_config, run = setup(cfg, stage, restart)
    log.info(to_yaml(cfg))
    from fusion_dist.tracking import Tracker, dataset_input

    tracker = Tracker(cfg, run.root, denv.rank, manifest.get("dataset", "custom"))
    tags = {"stage": stage, "model.family": cfg.model.family, "model.backbone": cfg.model.backbone,
            "model.mm_layers": str(list(cfg.model.mm_layers)), "model.n_fusion": cfg.model.n_fusion,
            "train.zero_stage": cfg.train.zero_stage, "world_size": denv.world_size}
    tracker.start_parent({**to_flat_dict(cfg), **study_axes(cfg)}, tags,
                        dataset_input(cfg.data.root, manifest) if tracker.active else None)
    preemption = Preemption()
    results = {}
    try:
        for seed in cfg.run.seeds:
            results[seed] = SeedRun(cfg, stage, seed, run, denv, manifest, ds_config, tracker, preemption).run()
    except Preempted as exc:
        log.warning(f"{exc}; exiting with {PREEMPTED_EXIT} so the job can be requeued")
        dist.shutdown()
        return PREEMPTED_EXIT
    except BaseException as exc:  # the runs end FAILED (KILLED when interrupted); a resume reopens them
        tracker.fail("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    summary = summarize(results, metric_set(manifest))
    if denv.is_main:
        write_json(run.metrics, summary)
        _, weights = run.best_checkpoint(best_seed(results))
        write_export(run.export, cfg, stage, load_file(str(weights)), manifest, run.root)
        log.info(summary_text(summary))
    tracker.log_artifact(run.metrics)
    tracker.end_parent({"n_seeds": len(results), **{f"test/{k}_{stat}": v for stat in ("mean", "std")
                                                    for k, v in summary[stat]["test"].items() if math.isfinite(v)}})
    dist.barrier()
    dist.shutdown()
    return 0


def evaluate_command(cfg: Config) -> int:
    """Metrics of each finished seed's best checkpoint (rebuilt from backbone + weights), on any world size."""
    denv = dist.init_distributed(cfg.train.dist_timeout_s)
    manifest = read_manifest(cfg.data.root)
    run = RunDir(cfg.run.dir)
    stage = run.stage()
    cfg = stage_config(cfg, stage)
    run.check_resumable(cfg, stage, training=False)
    if stage == TRAIN:
        check_backbone(run, cfg.model.backbone)
        cfg.model.backbone = run.trained_backbone(cfg.model.backbone)
    data = {s: ShardDataset(cfg.data.root, s) for s in ("valid", "test")}
    results = {}
    for seed in cfg.run.seeds:
        _, weights_file = run.best_checkpoint(seed)
        model = rebuild(cfg, stage, feature_dims(manifest), load_file(str(weights_file)))
        results[seed] = {"seed": seed, "stage": stage, "best_tag": weights_file.parent.name,
                         **score_splits(model, data, collator_for(model, cfg.data.max_text_tokens), cfg, manifest,
                                        run, seed, denv)}
    summary = summarize(results, metric_set(manifest))
    if denv.is_main:
        write_json(run.metrics, summary)
        log.info(summary_text(summary))
    dist.barrier()
    dist.shutdown()
    return 0


def _parse(argv: list[str], prog: str) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(prog=f"fusion-dist {prog}")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    if prog != "evaluate":
        p.add_argument("--restart", action="store_true",
                       help="train run.dir from scratch: delete its checkpoints and step logs first")
    args = p.parse_args(argv)
    if prog == PRETRAIN_AV:
        replaced = pretrain_replaces()
        for item in args.overrides:
            key = item.split("=", 1)[0]
            if key in replaced:
                raise ConfigError(f"command line: {key} does not apply to pretrain-av: stage 1 trains with "
                                  f"{replaced[key]} (the pretrain section replaces {', '.join(replaced)})")
    return load_config(args.config, args.overrides), getattr(args, "restart", False)


def main_pretrain_av(argv: list[str]) -> int:
    cfg, restart = _parse(argv, PRETRAIN_AV)
    return train_command(cfg, PRETRAIN_AV, restart)


def main_train(argv: list[str]) -> int:
    cfg, restart = _parse(argv, TRAIN)
    return train_command(cfg, TRAIN, restart)


def main_evaluate(argv: list[str]) -> int:
    return evaluate_command(_parse(argv, "evaluate")[0])
