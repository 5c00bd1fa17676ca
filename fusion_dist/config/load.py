"""Loading a config: defaults <- YAML file <- ``key=value`` overrides, validated against ``Config``.

Precedence is CLI > file > defaults. Loading is strict: an unknown key or a value of the wrong type is a
``ConfigError`` naming the key, the file and the valid keys; values no run can use are refused as the config loads
(``check_values``). OmegaConf structured configs do the merging and type checking; this module only shapes the
error messages.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fusion_dist.config.schema import (
    CLIP_MODES, PREFIX_CACHES, SCHEDULES, UNIMODAL_AUX, UNIMODAL_INITS, Config, ConfigError, PretrainConfig,
)


def _section_keys(full_key: str) -> list[str]:
    """Valid keys in the section the bad key points into (all keys when the section is unknown)."""
    all_keys = list(to_flat_dict(Config()))
    section = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
    in_section = [k for k in all_keys if k.startswith(section)] if section else []
    return in_section or all_keys


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = (getattr(exc, "msg", None) or str(exc)).strip().splitlines()[0]
    if isinstance(exc, ConfigKeyError):
        return ConfigError(
            f"{source}: unknown config key '{key}'; valid keys: {', '.join(_section_keys(key))}"
        )
    return ConfigError(f"{source}: bad value for config key '{key}': {msg}")


def _check_shape(file_cfg: Any, path: Path) -> None:
    """A file whose top level is not a mapping of sections, or a section given as a plain value."""
    sections = [f.name for f in dataclasses.fields(Config)]
    if not OmegaConf.is_dict(file_cfg):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(sections)}), "
                          f"not a {type(OmegaConf.to_container(file_cfg)).__name__}")
    for name in sections:
        if name in file_cfg and not OmegaConf.is_dict(file_cfg._get_node(name)):
            raise ConfigError(f"{path}: section '{name}' must be a mapping of keys, got {file_cfg[name]!r}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, validated against ``Config``."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as exc:  # yaml errors carry line/column; keep them
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        _check_shape(file_cfg, path)
        try:
            merged = OmegaConf.merge(merged, file_cfg)
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(path)) from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not of the form key=value")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise _explain(exc, "command line") from exc
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{path or 'command line'}: required config key(s) not set: {', '.join(missing)}")
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    check_values(cfg, " + ".join(filter(None, [str(path or ""), "command line" if overrides else ""])) or "defaults")
    return cfg


# (key, test, what the value must be): ranges no command can run with, checked as the config loads
_RANGES: list[tuple[str, Any, str]] = [
    ("data.max_text_tokens", lambda v: v >= 1, ">= 1"),
    ("train.epochs", lambda v: v >= 1, ">= 1"),
    ("train.eval_batch_size", lambda v: v >= 1, ">= 1"),
    ("train.lr", lambda v: v > 0, "> 0"),
    ("train.av_lr", lambda v: v > 0, "> 0"),
    ("train.weight_decay", lambda v: v >= 0, ">= 0"),
    ("train.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("train.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("train.grad_clip", lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    ("train.patience", lambda v: v >= 1, ">= 1"),
    ("train.schedule", lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
    ("train.schedule_epochs", lambda v: v is None or v > 0, "> 0 (or unset: the rest of train.epochs)"),
    ("train.min_lr", lambda v: v >= 0, ">= 0"),
    ("train.plateau_factor", lambda v: 0 < v < 1, "in (0, 1)"),
    ("train.plateau_patience", lambda v: v >= 0, ">= 0"),
    ("train.prefix_cache", lambda v: v in PREFIX_CACHES, f"one of {', '.join(PREFIX_CACHES)}"),
    ("train.prefix_cache_memory_gb", lambda v: v >= 0, ">= 0"),
    ("train.grad_clip_mode", lambda v: v in CLIP_MODES, f"one of {', '.join(CLIP_MODES)}"),
    ("train.checkpoint_every_steps", lambda v: v >= 0, ">= 0 (0: only at epoch ends)"),
    ("train.keep_last", lambda v: v >= 0, ">= 0"),
    ("train.log_every_steps", lambda v: v >= 1, ">= 1"),
    ("train.dist_timeout_s", lambda v: v > 0, "> 0"),
    ("run.seeds", lambda v: len(v) >= 1 and len(set(v)) == len(v), "a non-empty list without repeats"),
    ("model.av.softperm", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.av.frame_mask", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.av.modality_mask", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.av.batchnorm", lambda v: set(v) <= {"audio", "vision"}, "a list of audio, vision"),
    ("pretrain.batchnorm", lambda v: set(v) <= {"audio", "vision"}, "a list of audio, vision"),
    ("pretrain.softperm", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("pretrain.modality_mask", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("pretrain.head", lambda v: v in ("last", "mean"), "last or mean"),
    ("pretrain.maxlen", lambda v: v is None or v >= 1, ">= 1 (or unset: model.av.maxlen)"),
    ("model.audio_encoder.frame_mask", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.video_encoder.frame_mask", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.audio_encoder.init", lambda v: v in UNIMODAL_INITS, f"one of {', '.join(UNIMODAL_INITS)}"),
    ("model.video_encoder.init", lambda v: v in UNIMODAL_INITS, f"one of {', '.join(UNIMODAL_INITS)}"),
    ("model.unimodal_aux", lambda v: v in UNIMODAL_AUX, f"one of {', '.join(UNIMODAL_AUX)}"),
    ("model.cross_attn_scale", lambda v: v in ("head", "model"), "head or model"),
    ("model.fusion_position_start", lambda v: v is None or v >= 0, ">= 0 (or unset: after each sample's text)"),
    ("model.mm_layers", lambda v: list(v) == sorted(set(v)), "in increasing order, each layer once"),
]

# the pretrain section's keys obey the rules of the train keys they replace
_RANGES += [(f"pretrain.{key[6:]}", ok, rule) for key, ok, rule in list(_RANGES)
            if key.startswith("train.") and key[6:] in {f.name for f in dataclasses.fields(PretrainConfig)}]


def check_values(cfg: Config, source: str) -> None:
    """Values outside what any run can use: one ConfigError naming the key, its value and the rule."""
    flat = to_flat_dict(cfg)
    for key, ok, rule in _RANGES:
        if not ok(flat[key]):
            raise ConfigError(f"{source}: {key}={flat[key]!r}: must be {rule}")
    t = cfg.train
    if not t.grad_clip_av and t.grad_clip_mode == "norm" and t.grad_clip > 0:
        raise ConfigError(f"{source}: train.grad_clip_av=false needs train.grad_clip_mode=value (DeepSpeed clips "
                          "one global norm over every parameter)")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    """``{"model.n_fusion": 8, ...}``: the form MLflow params and config diffs use."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = value

    walk(cfg, "")
    return out


def from_yaml(text: str) -> Config:
    """Parse a resolved config written by ``to_yaml`` (run directories, exports)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
