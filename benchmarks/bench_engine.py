"""Engine benchmarks (CPU; ratios, so the numbers transfer between machines).

    python benchmarks/bench_engine.py overhead            # 1 rank: trainer step on ZeRO-2 vs a bare PyTorch loop
    deepspeed --num_gpus 2 benchmarks/bench_engine.py memory   # per-rank model-state bytes, ZeRO-3 vs ZeRO-0

overhead: tiny GPT-2 DeepMLF, the same model, batches and AdamW; samples/s of the DeepSpeed engine's
forward/backward/step (what ``fusion-dist train`` runs each micro-batch) against plain
``loss.backward(); clip; opt.step()``, alternating rounds so load changes hit both equally.
memory: a GPT-2-base-sized random backbone (frozen) + DeepMLF; model states per rank = parameters held
by the rank + optimizer states (``engine.model_state_bytes``, what the trainer logs) + gradients left on
the parameters, counted from the tensors each engine actually holds, next to DeepSpeed's own estimator
(which assumes every parameter is trained).
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from fusion_dist.config import Config, ModelConfig, TrainConfig
from fusion_dist.data import Collator
from fusion_dist.models import build_model, make_backbone
from fusion_dist import dist
from fusion_dist.train import engine as E


def _model_cfg(backbone: str) -> ModelConfig:
    cfg = Config().model
    cfg.backbone, cfg.mm_layers, cfg.n_fusion, cfg.cross_attn_heads, cfg.head_hidden = backbone, [1, 3], 4, 4, 32
    cfg.av.maxlen, cfg.av.d_enc, cfg.av.n_layers, cfg.av.n_heads, cfg.av.d_av, cfg.av.init = 16, 16, 1, 2, 16, "random+tune"
    cfg.dropout = cfg.av.dropout = 0.0
    return cfg


def _batches(tokenizer, n: int, bsz: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    words = ["good", "bad", "movie", "really", "not", "great", "plot", "actor"]
    out = []
    for _ in range(n):
        samples = [{"id": str(i), "raw_text": " ".join(words[j] for j in torch.randint(0, 8, (12,), generator=g)),
                    "audio": torch.randn(40, 5, generator=g).numpy(), "vision": torch.randn(40, 20, generator=g).numpy(),
                    "label": float(torch.randn((), generator=g))} for i in range(bsz)]
        out.append(Collator(tokenizer, 24)(samples))
    return out


def overhead(rounds: int = 5, steps: int = 20, bsz: int = 16) -> dict:
    denv = dist.init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        bb = make_backbone("gpt2", "tiny", Path(tmp) / "bb")
        torch.manual_seed(0)
        model = build_model(_model_cfg(str(bb)), 5, 20)
        batches = _batches(model.tokenizer, steps, bsz)
        bare = copy.deepcopy(model)
        t = TrainConfig(global_batch_size=bsz, micro_batch_size=bsz, zero_stage=2, lr=1e-4, grad_clip=1.0,
                        warmup_epochs=0)
        engine = E.initialize(model, t, E.deepspeed_config(t, denv.world_size), steps_per_epoch=10**6)
        opt = torch.optim.AdamW(E.param_groups(bare, t), lr=t.lr, betas=tuple(t.betas))
        trainable = [p for p in bare.parameters() if p.requires_grad]
        bare.train()
        engine.train()

        def run_bare() -> float:
            t0 = time.perf_counter()
            for b in batches:
                loss = bare(b).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return steps * bsz / (time.perf_counter() - t0)

        def run_engine() -> float:
            t0 = time.perf_counter()
            for b in batches:
                out = engine(b)
                engine.backward(out.loss)
                engine.step()
            return steps * bsz / (time.perf_counter() - t0)

        run_bare(), run_engine()  # warm-up
        res = {"bare": [], "engine": []}
        for _ in range(rounds):
            res["bare"].append(run_bare())
            res["engine"].append(run_engine())
    med = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
    return {"bare_samples_per_s": med["bare"], "engine_samples_per_s": med["engine"],
            "ratio": med["engine"] / med["bare"], "rounds": res}


def memory(backbone_preset: str = "gpt2-base") -> dict:
    denv = dist.init_distributed()
    tmp = Path(tempfile.gettempdir()) / f"bench_engine_bb_{backbone_preset}"
    if denv.is_main and not (tmp / "config.json").is_file():
        make_backbone("gpt2", backbone_preset, tmp)
    dist.barrier()
    out = {}
    for stage in (0, 3):
        t = TrainConfig(global_batch_size=2 * denv.world_size, micro_batch_size=2, zero_stage=stage)
        ds_config = E.deepspeed_config(t, denv.world_size)
        torch.manual_seed(0)
        with E.model_init(ds_config):
            model = build_model(_model_cfg(str(tmp)), 5, 20)
        engine = E.initialize(model, t, ds_config, steps_per_epoch=100)
        b = _batches(model.tokenizer, 1, 2)[0]
        out_ = engine(b)
        engine.backward(out_.loss)
        engine.step()
        mine = E.model_state_bytes(engine)
        mine["grads_on_params"] = sum(p.grad.numel() * p.grad.element_size()
                                      for p in engine.module.parameters() if p.grad is not None)
        mine["total"] = sum(mine.values())
        out[f"zero{stage}"] = dist.all_gather_object(mine)
        if stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            total = sum(p.ds_numel for p in engine.module.parameters())
            largest = max(p.ds_numel for p in engine.module.parameters())
            trainable = sum(p.ds_numel for p in engine.module.parameters() if p.requires_grad)
            _, est_all, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=denv.world_size,
                                                                  num_nodes=1, cpu_offload=False)
            _, est_trainable, _ = estimate_zero3_model_states_mem_needs(trainable, largest,
                                                                        num_gpus_per_node=denv.world_size, num_nodes=1,
                                                                        cpu_offload=False)
            out["params_total"], out["params_trainable"] = total, trainable
            out["ds_estimator_zero3_per_rank"] = est_all
            out["ds_estimator_zero3_trainable_only_per_rank"] = est_trainable
        del engine, model
    out["ratio_zero3_over_zero0"] = max(r["total"] for r in out["zero3"]) / max(r["total"] for r in out["zero0"])
    return out


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "overhead"
    result = overhead() if what == "overhead" else memory()
    if dist.detect().is_main:
        print(json.dumps(result, indent=2))
