"""The training of one seed, for both stages, on the DeepSpeed engine, on any number of ranks.

A step is one optimizer step over the global batch G (micro-batch x accumulation x world size): step s
of an epoch takes samples ``s*G .. (s+1)*G`` of the epoch's permutation, cut into micro-batches dealt
round-robin to the ranks (``RankSampler(chunk=micro)``), so the same config run on 1 rank (accumulation x
world) or on N ranks trains on the same micro-batches and takes the same steps. Each epoch takes
``n_train // G`` steps; the incomplete final global batch is dropped (its samples come back in the next
epoch's shuffle), so every step is whole and a step number fixes the data position, whatever the number of
ranks: a run resumes on any (``Checkpoints.load``).

Checkpoints come every ``train.checkpoint_every_steps`` steps and at each epoch end; the last
``train.keep_last`` and the best (lowest validation MAE) are kept. After each epoch the validation MAE
feeds early stopping (``train.patience``); the final evaluation scores the best checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import time

import numpy as np
import torch
from safetensors.torch import load_file

from fusion_dist import dist
from fusion_dist.config import Config, batch_geometry
from fusion_dist.data import RankSampler, ShardDataset, metric_set, text_tokens
from fusion_dist.dist import log
from fusion_dist.metrics import json_safe, mmsa_metrics
from fusion_dist.models.backbone import gathered
from fusion_dist.models.build import build_for_stage
from fusion_dist.predict import collator_for, evaluate_split, to_device, write_predictions
from fusion_dist.progress import duration, node_metrics, peak_memory, rates
from fusion_dist.rundir import KEY_METRIC, TRAINABLE, RunDir, atomic_write, write_json
from fusion_dist.train import engine as E
from fusion_dist.train import prefix_cache
from fusion_dist.train.checkpoint import Checkpoints, TrainState, load_weights


class Preempted(Exception):
    pass


class StepMetrics:
    """The one place a step's numbers go: the history file (every step, rank 0), the console line and the
    tracker (every ``log_every`` steps and at each epoch end, averaged over the steps since the last line)."""

    def __init__(self, path, tracker, denv: dist.DistEnv, log_every: int, global_batch: int, steps_per_epoch: int,
                 epochs: int):
        self.path, self.tracker, self.denv = path, tracker, denv
        self.log_every, self.global_batch, self.steps_per_epoch = max(1, log_every), global_batch, steps_per_epoch
        self.epochs = epochs
        self._reset()

    def _reset(self) -> None:
        self.t0, self.steps, self.sums, self.tokens = time.perf_counter(), 0, {}, 0.0

    def truncate(self, global_step: int) -> None:
        """Drop the history past ``global_step`` (the steps a resumed run takes again)."""
        if self.denv.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = [ln for ln in (self.path.read_text().splitlines() if self.path.is_file() else [])
                    if json.loads(ln)["step"] <= global_step]
            atomic_write(self.path, "".join(ln + "\n" for ln in kept))
        self._reset()

    def record(self, engine, state: TrainState, terms: dict[str, float], tokens: float) -> None:
        """``terms``: the step's loss terms; ``tokens``: the real text tokens it trained on, all ranks."""
        # the LM side's learning rate (train.lr; in stage 1 the head's, pretrain.lr), by group name
        lr = next(g["lr"] for g in engine.optimizer.param_groups if g["name"].startswith("lm"))
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        step = state.global_step
        self.steps += 1
        self.tokens += tokens
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if self.denv.is_main:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": step, "epoch": state.epoch, "lr": lr, "grad_norm": grad_norm,
                                     **terms}) + "\n")
        if step % self.log_every and state.step_in_epoch != self.steps_per_epoch:
            return
        elapsed = time.perf_counter() - self.t0
        rate, step_time = self.steps * self.global_batch / max(elapsed, 1e-9), elapsed / self.steps
        mean = {k: v / self.steps for k, v in self.sums.items()}
        epoch_left = self.steps_per_epoch - state.step_in_epoch  # training steps only: validation comes on top
        run_left = epoch_left + (self.epochs - state.epoch - 1) * self.steps_per_epoch
        log.info(f"step {step} (epoch {state.epoch + 1}, {state.step_in_epoch}/{self.steps_per_epoch}) | " +
                 " ".join(f"{k} {v:.4f}" for k, v in mean.items()) + f" | lr {lr:.3e} | " +
                 rates(self.steps * self.global_batch, self.tokens, elapsed, "samples") +
                 f" | ETA epoch {duration(epoch_left * step_time)}, run <= {duration(run_left * step_time)} | " +
                 peak_memory(engine.device))
        metrics = {f"train/{k}": v for k, v in mean.items()}
        metrics.update({"train/lr": lr, "train/samples_per_s": rate, "train/step_time_s": step_time,
                        "train/tokens_per_s": self.tokens / max(elapsed, 1e-9)})
        if grad_norm is not None:
            metrics["train/grad_norm"] = grad_norm
        metrics.update({f"gate/{k}": v for k, v in gate_values(engine.module).items()})
        nodes = dist.all_gather_object((self.denv.node, node_metrics(engine.device)) if self.denv.local_rank == 0
                                       else None)  # each node's local rank 0 measures its node
        metrics.update({f"system/{node}/{k}": v for node, values in filter(None, nodes) for k, v in values.items()})
        self.tracker.log_metrics(metrics, step)
        self._reset()


def gate_values(module) -> dict[str, float]:
    if not hasattr(module, "gate_values"):
        return {}
    with gathered([p for n, p in module.named_parameters() if "gate" in n]):
        return module.gate_values()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SeedRun:
    """Training of one seed: engine, data, loop, checkpoints, final evaluation of the best checkpoint."""

    def __init__(self, cfg: Config, stage: str, seed: int, run: RunDir, denv: dist.DistEnv, manifest: dict,
                 ds_config: dict, tracker, preemption):
        self.cfg, self.stage, self.seed, self.run_dir, self.denv = cfg, stage, seed, run, denv
        self.manifest, self.ds_config, self.tracker, self.preemption = manifest, ds_config, tracker, preemption
        self.ckpt = Checkpoints(run.checkpoints(seed), cfg.train.keep_last)

    def run(self) -> dict:
        result = self.run_dir.result(self.seed)
        if result.is_file():
            log.info(f"seed {self.seed}: already finished ({result})")
            return json.loads(result.read_text())
        self._build()
        state = self._resume()
        while state.epoch < self.cfg.train.epochs and not state.early_stopping.stop:
            self._train_epoch(state)
            self._end_epoch(state)
        return self._final_evaluation(state.early_stopping.best_tag)

    def _build(self) -> None:
        cfg, t, denv = self.cfg, self.cfg.train, self.denv
        self.data = {s: ShardDataset(cfg.data.root, s) for s in ("train", "valid", "test")}  # checked in setup
        seed_everything(self.seed)
        with E.model_init(self.ds_config):
            model = build_for_stage(cfg, self.stage, self.data["train"].dims)
        self.collator = collator_for(model, cfg.data.max_text_tokens)
        self.geometry = batch_geometry(t, denv.world_size)
        self.sampler = RankSampler(len(self.data["train"]), denv.rank, denv.world_size, shuffle=True,
                                   seed=self.seed, drop_last=True, chunk=self.geometry.micro)
        self.steps_per_epoch = self.geometry.steps_per_epoch(len(self.data["train"]))
        self.state = TrainState(tracking={"parent": self.tracker.parent_run_id, "child": None})
        self.engine = E.initialize(model, t, self.ds_config, self.steps_per_epoch,
                                   plateau_scale=lambda: self.state.plateau.scale)
        if hasattr(model, "prefix_cache"):  # stage 2: the frozen prefix, computed once (train/prefix_cache.py)
            model.prefix_cache = prefix_cache.prepare(model, cfg, self.data, self.collator, self.run_dir,
                                                      self.manifest, denv, self.engine.device)
        self.metrics = StepMetrics(self.run_dir.history(self.seed), self.tracker, denv, t.log_every_steps,
                                   t.global_batch_size, self.steps_per_epoch, t.epochs)
        self.reported = False
        log.info(f"seed {self.seed}: {self.stage} | {self.geometry} | {self.steps_per_epoch} steps/epoch, "
                 f"at most {t.epochs} epochs (early stopping after {t.patience} without improvement) | "
                 f"{E.schedule_text(t)} | ZeRO-{t.zero_stage} {t.precision}")

    def _resume(self) -> TrainState:
        state = self.state
        tag = self.ckpt.latest()
        if tag:
            state = self.state = self.ckpt.load(self.engine, tag, self.denv)
            E.refresh_lr(self.engine)
            log.info(f"seed {self.seed}: resumed from {tag} (epoch {state.epoch}, step {state.step_in_epoch} of "
                     f"{self.steps_per_epoch} in the epoch, global step {state.global_step})")
        state.tracking["child"] = self.tracker.start_child(self.seed, state.tracking["child"])
        self.metrics.truncate(state.global_step)
        return state

    def _train_epoch(self, state: TrainState) -> None:
        t, denv, engine = self.cfg.train, self.denv, self.engine
        micro, accum = self.geometry.micro, self.geometry.accumulation
        self.sampler.set_epoch(state.epoch)
        self.sampler.start_at(state.step_in_epoch * micro * accum)
        loader = torch.utils.data.DataLoader(self.data["train"], batch_size=micro, sampler=self.sampler,
                                             collate_fn=self.collator, drop_last=True,
                                             generator=torch.Generator())  # not from the global RNG: exact resume
        batches = iter(loader)
        engine.train()
        while state.step_in_epoch < self.steps_per_epoch:
            terms: dict[str, float] = {}
            tokens = 0
            for a in range(accum):
                # dropout/augmentation noise drawn from the micro-batch's position in the epoch, not from
                # the rank: the same micro-batch gets the same noise on any number of ranks
                position = (state.step_in_epoch * accum + a) * denv.world_size + denv.rank
                torch.manual_seed(int(np.random.SeedSequence([self.seed, state.epoch, position]).generate_state(1)[0]))
                batch = next(batches)
                tokens += text_tokens(batch)
                out = engine(to_device(batch, engine.device))
                engine.backward(out.loss)
                engine.step()
                for k, v in {**out.losses, "loss": out.loss.detach()}.items():
                    terms[k] = terms.get(k, 0.0) + float(v) / accum
            state.step_in_epoch += 1
            state.global_step += 1
            self._report_model_state()
            terms, stop = dist.average_and_any({**terms, "tokens": tokens}, self.preemption.requested)
            tokens = terms.pop("tokens") * denv.world_size
            self.metrics.record(engine, state, terms, tokens)
            tag = f"step{state.global_step}"
            if stop:
                self.ckpt.save(engine, tag, state, denv)
                raise Preempted(f"seed {self.seed}: preempted; saved {tag}")
            if t.checkpoint_every_steps and state.global_step % t.checkpoint_every_steps == 0 \
                    and state.step_in_epoch < self.steps_per_epoch:
                self.ckpt.save(engine, tag, state, denv)

    def _report_model_state(self) -> None:
        if not self.reported:  # after the first step: the optimizer creates its moments there
            held, self.reported = E.model_state_bytes(self.engine), True
            log.info(f"model state held by rank 0: weights {held['weights'] / 2**30:.3f} GiB + optimizer "
                     f"{held['optimizer'] / 2**30:.3f} GiB (compare: fusion-dist plan)")

    def _end_epoch(self, state: TrainState) -> None:
        """Validate, update early stopping, checkpoint."""
        t, es = self.cfg.train, state.early_stopping
        dist.average_buffers(self.engine.module)
        self.engine.eval()
        ids, preds, labels = evaluate_split(self.engine, self.data["valid"], self.collator, t.eval_batch_size,
                                            self.denv)
        valid = mmsa_metrics(preds, labels, metric_set(self.manifest))
        tag = f"step{state.global_step}"
        es.update(valid[KEY_METRIC], tag, t.patience)
        if t.schedule == "plateau":
            state.plateau.update(valid[KEY_METRIC], t.plateau_patience, t.plateau_factor)
            E.refresh_lr(self.engine)
        log.info(f"seed {self.seed} epoch {state.epoch + 1} (at most {t.epochs}): valid " +
                 " ".join(f"{k} {v:.4f}" for k, v in valid.items()) +
                 f" | best {KEY_METRIC} {es.best:.4f} ({es.best_tag})" +
                 (f" | early stop after {es.bad_epochs} epochs without improvement" if es.stop else ""))
        self.tracker.log_metrics({f"valid/{k}": v for k, v in valid.items() if math.isfinite(v)}, state.global_step)
        state.epoch += 1
        state.step_in_epoch = 0
        self.ckpt.save(self.engine, tag, state, self.denv)
        if self.preemption.requested:
            raise Preempted(f"seed {self.seed}: preempted at an epoch end; saved {tag}")

    def _final_evaluation(self, best_tag: str) -> dict:
        """Score valid and test with the engine holding the best checkpoint's weights: a rebuilt model beside
        the engine would hold a second full copy of the backbone on every rank."""
        load_weights(self.engine.module, load_file(str(self.ckpt.root / best_tag / TRAINABLE)))
        self.engine.eval()
        result = {"seed": self.seed, "stage": self.stage, "best_tag": best_tag,
                  **score_splits(self.engine, self.data, self.collator, self.cfg, self.manifest, self.run_dir,
                                 self.seed, self.denv)}
        best = {f"valid/best_{k}": v for k, v in result["valid"].items() if math.isfinite(v)}
        best["best_epoch"] = int(best_tag.removeprefix("step")) // self.steps_per_epoch  # tags at epoch ends
        self.tracker.end_child({**best, **{f"test/{k}": v for k, v in result["test"].items() if math.isfinite(v)}})
        if self.denv.is_main:
            write_json(self.run_dir.result(self.seed), result)
        dist.barrier()
        return json.loads(json.dumps(json_safe(result)))


def score_splits(forward, data: dict, collator, cfg: Config, manifest: dict, run: RunDir, seed: int,
                 denv: dist.DistEnv) -> dict[str, dict]:
    """Metrics of ``forward`` on the valid and test splits; rank 0 writes the predictions files."""
    out = {}
    for split in ("valid", "test"):
        ids, preds, labels = evaluate_split(forward, data[split], collator, cfg.train.eval_batch_size, denv)
        out[split] = mmsa_metrics(preds, labels, metric_set(manifest))
        if denv.is_main:
            write_predictions(run.predictions(split, seed, len(cfg.run.seeds) > 1), ids, preds, labels)
    return out
