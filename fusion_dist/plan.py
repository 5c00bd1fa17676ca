"""``fusion-dist plan CONFIG [key=value ...] --gpus N --gpu-mem SIZE [--nodes M] [--json]``: per-rank GPU
memory under each ZeRO stage and CPU-offload option, frozen-aware, and the cheapest option that fits.

The model is built on the meta device (as ``fusion-dist params``), so a ``make-backbone --config-only``
directory is enough. Per rank, with N = gpus x nodes ranks, F frozen and T trainable parameters and w bytes
per weight (bf16/fp16: 2, fp32: 4):

- frozen weights  F*w, partitioned (/N) under ZeRO-3, on the CPU with parameter offload;
- trainable weights T*w, likewise;
- gradients T*w (trainable only), partitioned from ZeRO-2 on;
- AdamW state T*12 under bf16/fp16 (fp32 master copy + 2 moments) or T*8 under fp32 (2 moments; the fp32
  weights are the trainable weights above), partitioned from ZeRO-1 on, on the CPU with optimizer offload;
- buffers: DeepSpeed's gradient reduce bucket (ZeRO 1-3, sized from T as the trainer sizes it) and, under
  ZeRO-3, the largest single module gathered in full;
- activations (approximate): b*S*h*17*L*w + b*S*V*4 when the LM loss is on, with b the micro batch,
  S = data.max_text_tokens + fusion tokens, h the LM width, L = LM layers + MM blocks, V the vocabulary.
  17*h values per token per layer is the no-recomputation count of Korthikanti et al. (2022), without the
  attention-score matrices that sdpa/flash-attention do not keep; the LM loss adds fp32 logits.

An option fits when at least ``RESERVE`` of the GPU is left over for the CUDA context, NCCL and allocator
fragmentation. Offload rows still count gradients on the GPU (conservative).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass

from fusion_dist.errors import UserError
from fusion_dist.params import add_model_args, meta_model

GIB = 1024**3
RESERVE = 0.10
WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ACTIVATION_VALUES_PER_LAYER = 17  # per token per hidden unit, see the module docstring
DEEPSPEED_NOTE = ("DeepSpeed's estimator (estimate_zero{2,3}_model_states_mem_needs) counts every parameter as "
                  "trainable: it adds gradients and optimizer state for the frozen backbone, and no activations")

# Decimal SI suffixes (GB = 1e9), binary IEC ones (GiB = 2^30); a bare letter is binary, as in Slurm's --mem=80G.
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``80GB`` -> 80e9 bytes, ``80G`` / ``80GiB`` -> 80 * 2^30, ``16000MB``, ``1.5TiB``, plain bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise UserError(f"--gpu-mem: cannot read '{text}' as a memory size (e.g. 80GB, 80G, 24GiB, 16000MB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class Option:
    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def name(self) -> str:
        return f"zero{self.stage}" + "+offload_opt" * self.offload_optimizer + "+offload_params" * self.offload_params


# Cheapest first: more partitioning means more communication, and offload (CPU Adam step, PCIe traffic)
# costs more than ZeRO-3's all-gathers; the recommendation is the first row that fits.
OPTIONS = (Option(0), Option(1), Option(2), Option(3),
           Option(1, True), Option(2, True), Option(3, True), Option(3, True, True))


@dataclass(frozen=True)
class Shape:
    """What the memory model needs to know about the model and the micro batch."""
    trainable: int
    frozen: int
    largest_module: int  # parameters of the biggest single module: what ZeRO-3 gathers at once
    layers: int  # LM decoder layers + MM blocks
    hidden: int
    vocab: int
    seq_len: int  # text tokens + fusion tokens
    micro_batch: int
    lm_loss: bool


def activation_bytes(shape: Shape, w: int) -> int:
    per_token = ACTIVATION_VALUES_PER_LAYER * shape.hidden * shape.layers * w + shape.vocab * 4 * shape.lm_loss
    return shape.micro_batch * shape.seq_len * per_token


def option_memory(option: Option, shape: Shape, world: int, w: int, bucket: int) -> dict[str, int]:
    """Per-rank bytes of one option: GPU parts, their total, and what the offload puts in CPU memory."""
    adam = 12 if w == 2 else 8
    weights_share = world if option.stage == 3 else 1
    gpu = {
        "frozen": 0 if option.offload_params else math.ceil(shape.frozen * w / weights_share),
        "trainable": 0 if option.offload_params else math.ceil(shape.trainable * w / weights_share),
        "grads": math.ceil(shape.trainable * w / (world if option.stage >= 2 else 1)),
        "optimizer": 0 if option.offload_optimizer else math.ceil(shape.trainable * adam / (world if option.stage >= 1 else 1)),
        "buffers": (bucket * w if option.stage >= 1 else 0) + (shape.largest_module * w if option.stage == 3 else 0),
        "activations": activation_bytes(shape, w),
    }
    cpu = 0
    if option.offload_optimizer:
        cpu += math.ceil(shape.trainable * (adam + 4) / world)  # optimizer state + fp32 gradient partition
    if option.offload_params:
        cpu += math.ceil((shape.frozen + shape.trainable) * w / world)
    return {**gpu, "total": sum(gpu.values()), "cpu": cpu}


def _deepspeed():
    """DeepSpeed's ZeRO estimators (imported on demand: it is slow to import), on the CPU accelerator without a GPU."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    return stage_1_and_2, stage3


def deepspeed_estimates(total_params: int, largest_module: int, gpus: int, nodes: int) -> dict[str, dict[str, int]]:
    """DeepSpeed's own model-state estimates (16-bit training, all parameters trainable), per GPU / per node CPU.

    These are the functions behind ``estimate_zero{2,3}_model_states_mem_needs_all_cold``, which only print."""
    stage_1_and_2, stage3 = _deepspeed()
    out = {}
    for name, offload in (("zero2", False), ("zero2+offload_opt", True)):
        cpu, gpu = stage_1_and_2.estimate_zero2_model_states_mem_needs(total_params, gpus, nodes, cpu_offload=offload)
        out[name] = {"gpu": gpu, "cpu": cpu}
    for name, offload, offload_params in (("zero3", False, False), ("zero3+offload_opt", True, False),
                                          ("zero3+offload_opt+offload_params", True, True)):
        cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
            total_params, largest_module, gpus, nodes, cpu_offload=offload, cpu_offload_params=offload_params)
        out[name] = {"gpu": gpu, "cpu": cpu}
    return out


def model_shape(cfg, model, world: int) -> Shape:
    """The model's shape, with the micro-batch a rank runs on ``world`` ranks."""
    from fusion_dist.config import batch_geometry
    from fusion_dist.models import count_parameters
    from fusion_dist.models.backbone import load_backbone_config

    counts = count_parameters(model)
    lm = load_backbone_config(cfg.model.backbone)
    m = cfg.model
    fusion_tokens = m.n_fusion if m.family == "deepmlf" else m.n_audio + m.n_video + m.n_av
    return Shape(
        trainable=counts["trainable"], frozen=counts["frozen"],
        largest_module=max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules()),
        layers=lm.num_hidden_layers + len(m.mm_layers), hidden=lm.hidden_size, vocab=lm.vocab_size,
        seq_len=cfg.data.max_text_tokens + fusion_tokens, micro_batch=batch_geometry(cfg.train, world).micro,
        lm_loss=m.loss.lambda_lm > 0,
    )


def make_plan(shape: Shape, precision: str, gpus: int, nodes: int, gpu_mem: int) -> dict:
    """Every option's per-rank memory, whether it fits ``gpu_mem`` and the recommended (cheapest fitting) one."""
    if precision not in WEIGHT_BYTES:
        raise UserError(f"train.precision={precision!r}: must be one of {', '.join(WEIGHT_BYTES)}")
    w, world = WEIGHT_BYTES[precision], gpus * nodes
    from fusion_dist.train.engine import bucket_elements

    bucket = bucket_elements(shape.trainable)
    options = []
    for option in OPTIONS:
        mem = option_memory(option, shape, world, w, bucket)
        headroom = gpu_mem - mem["total"]
        options.append({"name": option.name, "zero_stage": option.stage, "offload_optimizer": option.offload_optimizer,
                        "offload_params": option.offload_params, **mem, "headroom": headroom,
                        "fits": headroom >= RESERVE * gpu_mem})
    return {
        "trainable": shape.trainable, "frozen": shape.frozen, "largest_module": shape.largest_module,
        "precision": precision, "bytes_per_weight": w, "gpus_per_node": gpus, "nodes": nodes, "world_size": world,
        "gpu_mem": gpu_mem, "reserve": RESERVE, "reduce_bucket_size": bucket,
        "activation_inputs": {"micro_batch": shape.micro_batch, "seq_len": shape.seq_len, "layers": shape.layers,
                              "hidden": shape.hidden, "vocab": shape.vocab, "lm_loss": shape.lm_loss},
        "options": options,
        "recommended": next((o["name"] for o in options if o["fits"]), None),
        "deepspeed_estimate": deepspeed_estimates(shape.trainable + shape.frozen, shape.largest_module, gpus, nodes),
        "deepspeed_note": DEEPSPEED_NOTE,
    }


def _print_table(plan: dict, title: str) -> None:
    gib = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    a = plan["activation_inputs"]
    print(f"{title}: {plan['trainable'] / 1e6:.2f}M trainable, {plan['frozen'] / 1e6:.2f}M frozen parameters, "
          f"{plan['precision']} ({plan['bytes_per_weight']} bytes/weight)")
    print(f"{plan['world_size']} ranks ({plan['gpus_per_node']} GPU(s) x {plan['nodes']} node(s)), "
          f"{gib(plan['gpu_mem'])} GiB per GPU; per-rank GiB below")
    print(f"activations are approximate: micro batch {a['micro_batch']} x {a['seq_len']} tokens x {a['layers']} layers "
          f"x width {a['hidden']} x {ACTIVATION_VALUES_PER_LAYER} values" + (" + fp32 LM logits" * a["lm_loss"]))
    cols = ["frozen", "trainable", "grads", "optimizer", "buffers", "activations", "total", "headroom"]
    width = max(len(o["name"]) for o in plan["options"])
    print(f"  {'option':<{width}}  " + "  ".join(f"{c:>9}" for c in cols) + "  fits  CPU/rank")
    for o in plan["options"]:
        print(f"  {o['name']:<{width}}  " + "  ".join(f"{gib(o[c]):>9}" for c in cols)
              + f"  {'yes' if o['fits'] else 'no':<4}  {gib(o['cpu'])}")
    if plan["recommended"]:
        print(f"recommended: {plan['recommended']} (the cheapest option leaving >= {RESERVE:.0%} of the GPU free); "
              f"set train.zero_stage / train.offload_optimizer / train.offload_params accordingly")
    else:
        print("nothing fits: add GPUs, lower train.micro_batch_size (keep train.global_batch_size), or use bf16")
    ds = plan["deepspeed_estimate"]
    print(f"{DEEPSPEED_NOTE} (here {gib(ds['zero2']['gpu'])} GiB under ZeRO-2, {gib(ds['zero3']['gpu'])} GiB "
          "under ZeRO-3, model states only)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fusion-dist plan", description="per-rank GPU memory per ZeRO stage and offload option, frozen-aware")
    add_model_args(parser)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-mem", required=True, help="memory of one GPU: 80GB, 80G, 24GiB, 16000MB, ...")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_intermixed_args(argv)
    gpu_mem = parse_size(args.gpu_mem)
    if args.gpus <= 0 or args.nodes <= 0:
        raise UserError(f"--gpus and --nodes must be positive, got --gpus {args.gpus} --nodes {args.nodes}")
    cfg, model = meta_model(args)
    plan = make_plan(model_shape(cfg, model, args.gpus * args.nodes), cfg.train.precision, args.gpus, args.nodes, gpu_mem)
    if args.json:
        print(json.dumps(plan))
    else:
        _print_table(plan, f"{cfg.model.family} on {cfg.model.backbone}")
    return 0
