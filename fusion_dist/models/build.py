"""Build a model from its config: validate, load (or, on ``meta``, only shape) the backbone, wire the
fusion curriculum of the AV encoder, and count parameters.

Feature dims always come from the data (``audio_dim``/``vision_dim`` from the shard manifest), never
from the config; a stage-1 AV checkpoint with other dims is refused.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn

from fusion_dist.config import PRETRAIN_AV, Config, ConfigError, ModelConfig
from fusion_dist.errors import UserError
from fusion_dist.models.av_encoder import build_av_pretrainer, load_av_encoder, load_into, modality_state
from fusion_dist.models.backbone import (
    backbone_on_meta, choose_attn_implementation, load_backbone, load_backbone_config, load_tokenizer,
)
from fusion_dist.models.deepmlf import DeepMLF
from fusion_dist.models.dmpf import DMPF, MASK_PRESETS, TASK_HEADS
from fusion_dist.models.fusion_lm import FusionLM

log = logging.getLogger(__name__)

FAMILIES = {"deepmlf": DeepMLF, "dmpf": DMPF}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision
AV_INITS = ("pretrained+tune", "pretrained+frozen", "random+tune")
GCA_QUERIES = ("fusion", "text+fusion", "text")


def validate(cfg: ModelConfig, num_layers: int, hidden_size: int) -> None:
    """Config errors that need the backbone's shape; each names its key."""
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model.family: unknown family '{cfg.family}'; choose {', '.join(FAMILIES)}")
    bad = [i for i in cfg.mm_layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(
            f"model.mm_layers: {bad} out of range for a {num_layers}-layer backbone (0-based, 0..{num_layers - 1})"
        )
    if cfg.family == "deepmlf" and cfg.n_fusion <= 0:
        raise ConfigError(f"model.n_fusion: must be > 0, got {cfg.n_fusion}")
    if cfg.family == "dmpf":
        for key in ("n_audio", "n_video", "n_av"):
            if getattr(cfg, key) <= 0:
                raise ConfigError(f"model.{key}: DMPF group sizes must be > 0, got {getattr(cfg, key)}")
        if cfg.mask_preset not in MASK_PRESETS:
            raise ConfigError(f"model.mask_preset: unknown preset '{cfg.mask_preset}'; choose {', '.join(MASK_PRESETS)}")
        if cfg.task_head not in TASK_HEADS:
            raise ConfigError(f"model.task_head: unknown head '{cfg.task_head}'; choose {', '.join(TASK_HEADS)}")
        if cfg.gca_queries != "fusion":
            raise ConfigError("model.gca_queries: DMPF's groups always query their own encoder; leave it 'fusion'")
    if cfg.gca_queries not in GCA_QUERIES:
        raise ConfigError(f"model.gca_queries: unknown '{cfg.gca_queries}'; choose {', '.join(GCA_QUERIES)}")
    if hidden_size % cfg.cross_attn_heads:
        raise ConfigError(f"model.cross_attn_heads: {cfg.cross_attn_heads} does not divide the LM width {hidden_size}")
    if cfg.av.init not in AV_INITS:
        raise ConfigError(f"model.av.init: unknown '{cfg.av.init}'; choose {', '.join(AV_INITS)}")
    for which in ("audio_encoder", "video_encoder"):
        if getattr(cfg, which).init == "stage1" and (cfg.family != "dmpf" or not cfg.av.init.startswith("pretrained")):
            raise ConfigError(f"model.{which}.init=stage1: only DMPF has a {which.replace('_', '-')}, and it starts "
                              "from the stage-1 export of a model.av.init=pretrained+* run")
    if cfg.av.init.startswith("pretrained") and not cfg.av.checkpoint:
        raise ConfigError(
            f"model.av.checkpoint: model.av.init={cfg.av.init} needs a stage-1 export directory "
            "(fusion-dist pretrain-av), or set model.av.init=random+tune"
        )


def build_model(model_cfg: ModelConfig, audio_dim: int, vision_dim: int, *, meta: bool = False,
                dtype: torch.dtype = torch.float32) -> FusionLM:
    """DeepMLF or DMPF per ``model_cfg.family``, its parameters in ``dtype``; ``meta=True`` builds shapes only,
    from the backbone's config."""
    config = load_backbone_config(model_cfg.backbone)
    num_layers, hidden = config.num_hidden_layers, config.hidden_size
    validate(model_cfg, num_layers, hidden)
    kernel = choose_attn_implementation(model_cfg.attn_implementation)
    if model_cfg.family == "dmpf" and kernel == "flash_attention_2":
        log.warning("flash_attention_2 cannot run DMPF's group attention mask; using sdpa instead")
        kernel = "sdpa"
    if meta:
        lm = backbone_on_meta(model_cfg.backbone, kernel)
        try:
            tokenizer = load_tokenizer(model_cfg.backbone)
        except UserError:
            tokenizer = None  # a config-only backbone without tokenizer still counts parameters
        with torch.device("meta"):
            return FAMILIES[model_cfg.family](model_cfg, lm, tokenizer, kernel, audio_dim, vision_dim)
    # straight into the training dtype: no rank ever holds an fp32 copy of a bf16 backbone
    lm, tokenizer, kernel = load_backbone(model_cfg.backbone, kernel, dtype)
    model = FAMILIES[model_cfg.family](model_cfg, lm, tokenizer, kernel, audio_dim, vision_dim)
    init_av_encoder(model, model_cfg, audio_dim, vision_dim)
    cast_parameters(model, dtype)
    log.info("built %s on %s (%d layers, MM blocks after %s), attention kernel %s",
             model_cfg.family, model_cfg.backbone, num_layers, list(model_cfg.mm_layers), kernel)
    return model


def build_for_stage(cfg: Config, stage: str, dims: dict[str, int], meta: bool = False) -> nn.Module:
    """The model a stage trains, freshly initialized (stage 2 loads its backbone and stage-1 encoder), with its
    parameters in the training dtype (``train.precision``); ``dims``: the data's feature dims by modality;
    ``meta=True``: shapes only, in seconds at any size."""
    dtype = DTYPES[cfg.train.precision]
    if stage == PRETRAIN_AV:
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = build_av_pretrainer(cfg.model.av, dims["audio"], dims["vision"], cfg.model.head_hidden,
                                        cfg.model.dropout, cfg.pretrain.head)
        return cast_parameters(model, dtype)
    model = build_model(cfg.model, dims["audio"], dims["vision"], meta=meta, dtype=dtype)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    return model


def rebuild(cfg: Config, stage: str, dims: dict[str, int], weights: dict[str, torch.Tensor]) -> nn.Module:
    """Backbone + saved weights -> the trained model, in eval mode. The AV encoder comes from ``weights``,
    so the stage-1 checkpoint the run started from is not needed any more."""
    cfg = copy.deepcopy(cfg)
    cfg.model.av.init, cfg.model.av.checkpoint = "random+tune", None
    cfg.model.audio_encoder.init = cfg.model.video_encoder.init = "random"
    model = build_for_stage(cfg, stage, dims)
    if hasattr(model, "load_trainable_state_dict"):
        model.load_trainable_state_dict(weights)
    else:
        model.load_state_dict(weights)
    return model.eval()


def weights_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """What checkpoints and exports keep: trainable weights + buffers, and the AV encoders even when frozen."""
    if not hasattr(module, "trainable_state_dict"):  # the stage-1 pretrainer: small and all trainable
        return dict(module.state_dict())
    out = dict(module.trainable_state_dict())
    for name in getattr(module, "frozen_encoders", []):
        out.update({f"{name}.{k}": v for k, v in getattr(module, name).state_dict().items()})
    return out


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every parameter in the training dtype; buffers (BatchNorm statistics, rotary frequencies) keep theirs.

    DeepSpeed flattens each param group into one buffer and asserts a single dtype, and under ZeRO-3 it casts
    only what ``zero.Init`` created (the backbone): the fusion tokens, MM blocks, LoRA adapters (peft makes
    them fp32), AV encoders and heads would stay fp32 next to bf16 weights. DeepSpeed keeps the fp32 master
    copies of the trainable ones in its optimizer."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and not hasattr(p, "ds_id"):  # ds_id: already partitioned
            p.data = p.data.to(dtype)
    return model


def init_av_encoder(model: nn.Module, model_cfg: ModelConfig, audio_dim: int, vision_dim: int) -> None:
    """Fusion curriculum: ``pretrained+tune`` / ``pretrained+frozen`` load the stage-1 encoder; ``random+tune`` keeps
    init. DMPF's audio-only / video-only encoders with ``init: stage1`` take their modality's part of it."""
    av_cfg = model_cfg.av
    if not av_cfg.init.startswith("pretrained"):
        return
    stage1 = load_av_encoder(av_cfg.checkpoint, av_cfg)
    want = {"audio": audio_dim, "vision": vision_dim}
    if stage1.dims != want:
        raise UserError(
            f"model.av.checkpoint: {av_cfg.checkpoint} was trained on feature dims {stage1.dims}, "
            f"but the data manifest has {want}"
        )
    fresh = load_into(model.av_encoder, stage1.state_dict())
    if fresh:
        log.info("model.av.batchnorm: %s has no input BatchNorm for %s; it starts fresh", av_cfg.checkpoint,
                 ", ".join(fresh))
    for which, modality in (("audio_encoder", "audio"), ("video_encoder", "vision")):
        if getattr(model_cfg, which).init == "stage1":
            encoder = getattr(model, which)
            load_av_encoder(av_cfg.checkpoint, encoder.cfg, key=f"model.{which}")  # same sizes, or refused
            load_into(encoder, modality_state(stage1, modality))
    if av_cfg.init == "pretrained+frozen":
        for p in model.av_encoder.parameters():
            p.requires_grad_(False)
        model.frozen_encoders.append("av_encoder")
        model.av_encoder.eval()


def check_feature_dims(model: nn.Module, manifest: dict) -> None:
    """Refuse data whose feature dims differ from the ones the model was built for (naming both)."""
    feats = manifest["features"]
    got = {"audio": feats["audio"]["dim"], "vision": feats["vision"]["dim"]}
    built = model.av_encoder.dims
    if got != built:
        raise UserError(f"data.root: manifest feature dims {got} differ from the model's {built}")


def count_parameters(model: nn.Module) -> dict:
    """Trainable / frozen totals, trainable parameters per MM block and per component (works on meta)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    per_block = {
        int(i): sum(p.numel() for p in block.parameters() if p.requires_grad) for i, block in model.mm_blocks.items()
    }
    components: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            top = name.split(".")[0]
            components[top] = components.get(top, 0) + p.numel()
    return {"trainable": trainable, "frozen": frozen, "mm_blocks": sum(per_block.values()),
            "per_block": per_block, "components": components}



