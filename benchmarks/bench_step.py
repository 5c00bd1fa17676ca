"""Training-step and evaluation throughput with the hot-path optimisations on vs off (CPU, fp32; ratios in one run).

    OMP_NUM_THREADS=1 python benchmarks/bench_step.py [--shapes mosi sims mosei mosei-noaug] [--rounds 3] [--steps 2]
    python benchmarks/bench_step.py --device cuda --dtype bf16 --attn flash_attention_2   # the GPU row (gpu_check.sh)

Shapes (random weights, the paper configs' fusion layout, 16 samples of ~50 text tokens):
  mosi         Llama family, 24 layers x 256 (SmolLM2-1.7B's depth, narrow enough for a CPU), MM blocks after
               [11, 14, 17, 20, 23], 8 fusion tokens, LoRA on the FFW copies, no text augmentation, no LM loss
  sims         GPT-2 base (12 x 768), MM blocks after [5..11], 16 fusion tokens, SeqAug on, LM loss
  mosei        GPT-2 base, MM blocks after [3, 5, 7..11], 12 fusion tokens, SeqAug on, LM loss
  mosei-noaug  the same without SeqAug
"on" is the default model (``model.prefix_split``, ``model.fused_ops``, ``train.prefix_cache=auto``, computed
before timing as the trainer does before the first epoch; it serves training only where that is exact, i.e. not
under SeqAug); "off" has all three off. The two models share weights and batches; rounds alternate so load changes
hit both; samples/s are of the median round, a speedup is the median of the rounds' ratios (a burst of load from
elsewhere on a shared machine moves one round, not the result). A training step is forward, backward and an AdamW
step on the trainable parameters; evaluation is a no-grad forward in eval mode; "LM floor" is the frozen
backbone's own forward over the same token batch (no fusion tokens, no MM blocks).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fusion_dist.config import Config
from fusion_dist.data import Collator
from fusion_dist.models import build_model
from fusion_dist.models.presets import build_tokenizer, make_backbone
from fusion_dist.models.build import DTYPES
from fusion_dist.predict import to_device
from fusion_dist.models.prefix import PrefixCache, chunks

WORDS = "good bad movie really not great plot actor boring loved the film acting story long".split()
SHAPES = {
    "mosi": dict(arch="llama", mm_layers=[11, 14, 17, 20, 23], n_fusion=8, lora=True, augment="none", lambda_lm=0.0),
    "sims": dict(arch="gpt2", mm_layers=list(range(5, 12)), n_fusion=16, lora=False, augment="seqaug", lambda_lm=1.0),
    "mosei": dict(arch="gpt2", mm_layers=[3, 5, 7, 8, 9, 10, 11], n_fusion=12, lora=False, augment="seqaug",
                  lambda_lm=1.1),
    "mosei-noaug": dict(arch="gpt2", mm_layers=[3, 5, 7, 8, 9, 10, 11], n_fusion=12, lora=False, augment="none",
                        lambda_lm=1.1),
}


def backbone(arch: str, root: Path) -> str:
    out = root / arch
    if (out / "config.json").is_file():
        return str(out)
    if arch == "gpt2":
        return str(make_backbone("gpt2", "gpt2-base", out))
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tokenizer()
    config = AutoConfig.for_model("llama", num_hidden_layers=24, hidden_size=256, intermediate_size=1024,
                                  num_attention_heads=8, num_key_value_heads=8, vocab_size=len(tok),
                                  tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def model_config(shape: dict, bb: str, optimised: bool, attn: str):
    cfg = Config().model
    cfg.attn_implementation = attn  # flash_attention_2 takes 2-D masks only: no prefix split or cache under it
    cfg.backbone, cfg.mm_layers, cfg.n_fusion = bb, shape["mm_layers"], shape["n_fusion"]
    cfg.av.d_av, cfg.av.init = 30, "random+tune"
    cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha = shape["lora"], 32, 512
    cfg.augment.kind, cfg.loss.lambda_lm = shape["augment"], shape["lambda_lm"]
    cfg.augment.p_apply = 1.0  # every batch augmented: the cost SeqAug adds, every step
    cfg.prefix_split = cfg.fused_ops = optimised
    return cfg


def batches(tokenizer, n: int, bsz: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        samples = [{"id": str(i), "raw_text": " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (48,),
                                                                                       generator=g)),
                    "audio": torch.randn(60, 5, generator=g).numpy(),
                    "vision": torch.randn(60, 20, generator=g).numpy(),
                    "label": float(torch.randn((), generator=g))} for i in range(bsz)]
        out.append(Collator(tokenizer, 50)(samples))
    return out


def timed(fn, items) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for item in items:
        fn(item)
    sync()
    return time.perf_counter() - start


def run_shape(name: str, root: Path, rounds: int, steps: int, bsz: int, device: str = "cpu", dtype: str = "fp32",
              attn: str = "sdpa") -> dict:
    shape = SHAPES[name]
    bb = backbone(shape["arch"], root)
    torch.manual_seed(0)
    on = build_model(model_config(shape, bb, True, attn), 5, 20, dtype=DTYPES[dtype]).to(device)
    off = build_model(model_config(shape, bb, False, attn), 5, 20, dtype=DTYPES[dtype]).to(device)
    off.load_state_dict(on.state_dict())
    data = [to_device(b, torch.device(device)) for b in batches(on.tokenizer, steps, bsz)]
    # train.prefix_cache=auto, computed before timing as before the first epoch (used where exact: models/prefix.py)
    work = chunks([k for b in data for k in PrefixCache.keys(b["input_ids"], b["attention_mask"].bool())])
    if on.prefix_layers:
        on.prefix_cache = PrefixCache.compute(lambda ids: on.prefix_rows(ids.to(device)), work)
    opts = {m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for m in (on, off)}

    def train_step(model):
        def step(batch):
            opts[model].zero_grad(set_to_none=True)
            model(batch).loss.backward()
            opts[model].step()
        return step

    def eval_step(model):
        def step(batch):
            with torch.no_grad():
                model(batch)
        return step

    def lm_floor(batch):
        with torch.no_grad():
            on.lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    times = {k: [] for k in ("train_on", "train_off", "eval_on", "eval_off", "lm")}
    for model in (on, off):  # warm-up
        timed(train_step(model.train()), data)
        timed(eval_step(model.eval()), data)
    for r in range(rounds):
        on.train(), off.train()
        times["train_on"].append(timed(train_step(on), data))
        times["train_off"].append(timed(train_step(off), data))
        on.eval(), off.eval()
        times["eval_on"].append(timed(eval_step(on), data))
        times["eval_off"].append(timed(eval_step(off), data))
        times["lm"].append(timed(lm_floor, data))
        print(f"  {name} round {r + 1}/{rounds}: train on {times['train_on'][-1]:.2f}s off {times['train_off'][-1]:.2f}s"
              f" ({times['train_off'][-1] / times['train_on'][-1]:.2f}x), eval on {times['eval_on'][-1]:.2f}s off "
              f"{times['eval_off'][-1]:.2f}s ({times['eval_off'][-1] / times['eval_on'][-1]:.2f}x)", flush=True)
    # the median round: a burst of load from elsewhere on a shared machine moves one round, not the result
    rate = {k: steps * bsz / statistics.median(v) for k, v in times.items()}
    speedup = {k: statistics.median(off / on for on, off in zip(times[f"{k}_on"], times[f"{k}_off"]))
               for k in ("train", "eval")}
    return {"shape": name, **{f"{k}_samples_per_s": v for k, v in rate.items()},
            "train_speedup": speedup["train"], "eval_speedup": speedup["eval"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="training steps (batches) per round and model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--backbones", type=Path, help="directory to keep the random backbones in (default: temporary)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(f"bench_step: {args.device}, {args.dtype}, attention {args.attn}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.backbones or Path(tmp)
        results = [run_shape(s, root, args.rounds, args.steps, args.batch, args.device, args.dtype, args.attn)
                   for s in args.shapes]
    print(f"\n{'shape':<12} {'train on':>9} {'train off':>9} {'speedup':>8} {'eval on':>8} {'eval off':>8} "
          f"{'speedup':>8} {'LM floor':>9}   (samples/s)")
    for r in results:
        print(f"{r['shape']:<12} {r['train_on_samples_per_s']:9.2f} {r['train_off_samples_per_s']:9.2f} "
              f"{r['train_speedup']:7.2f}x {r['eval_on_samples_per_s']:8.2f} {r['eval_off_samples_per_s']:8.2f} "
              f"{r['eval_speedup']:7.2f}x {r['lm_samples_per_s']:9.2f}")


if __name__ == "__main__":
    main()
