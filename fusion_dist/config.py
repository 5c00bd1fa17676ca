"""Typed run configuration: dataclasses loaded from YAML with ``key=value`` overrides.

Precedence is CLI > file > defaults. Loading is strict: an unknown key or a value of the wrong
type is a ``ConfigError`` naming the key, the file and the valid keys. OmegaConf structured
configs do the merging and type checking; this module only shapes the error messages.

Every field is documented where it is declared, so this file is the reference for config keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fusion_dist.errors import UserError


# The two training stages: stage 1 trains the AV encoder alone, stage 2 the fusion model. The values name the
# commands and are what run directories (``stage``) and exports (``export.json``) record.
PRETRAIN_AV, TRAIN = "pretrain-av", "train"
STAGES = (PRETRAIN_AV, TRAIN)


class ConfigError(UserError):
    """A config that cannot be used; the message names the key, the file and the problem."""


@dataclass
class DataConfig:
    root: str = MISSING
    """Shard root written by ``fusion-dist prepare`` (local path or any fsspec URL)."""
    max_text_tokens: int = 50
    """Transcripts are truncated to this many tokens (paper: 50 for MOSI/MOSEI, 39 for SIMS)."""
    verify_checksums: bool = True
    """Check every shard's sha256 against the manifest before training (as ``verify`` does; about a second per GB).
    ``false`` keeps the checks that take milliseconds: size, Arrow markers and row count of every shard."""


@dataclass
class AVEncoderConfig:
    maxlen: int = 50
    """Each modality is resampled to this many steps before encoding (SPEC 3.1)."""
    d_enc: int = 30
    """Width of each per-modality Transformer encoder."""
    n_layers: int = 3
    """Encoder layers per modality."""
    n_heads: int = 6
    """Attention heads per encoder layer (must divide d_enc)."""
    d_av: int = 60
    """Width of the fused audio-visual token sequence Z."""
    dropout: float = 0.1
    """Dropout inside the encoders."""
    batchnorm: bool = True
    """BatchNorm over feature channels before the input projection."""
    init: str = "pretrained+tune"
    """Fusion curriculum: ``pretrained+tune``, ``pretrained+frozen`` or ``random+tune``."""
    checkpoint: Optional[str] = None
    """Stage-1 export directory (``fusion-dist pretrain-av``); required by the ``pretrained+*`` inits."""


@dataclass
class LoRAConfig:
    enabled: bool = False
    """Freeze the MM-block FFW copies and train peft LoRA adapters on them instead."""
    r: int = 8
    """LoRA rank (paper: 512 on SmolLM2-1.7B)."""
    alpha: int = 16
    """LoRA alpha (paper: 8192 on SmolLM2-1.7B)."""
    dropout: float = 0.05
    """LoRA dropout."""
    target_modules: list[str] = field(default_factory=lambda: ["c_fc", "c_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names inside the FFW copies that get adapters; at least one must match."""


@dataclass
class AugmentConfig:
    kind: str = "none"
    """Text-embedding augmentation at train time: ``seqaug``, ``noise``, ``dropout`` or ``none``."""
    p_apply: float = 0.25
    """Probability that a training batch is augmented."""
    p_perm: float = 0.3
    """SeqAug: per-channel probability of taking the permuted position's value."""
    noise_std: float = 0.1
    """``noise``: standard deviation of the Gaussian added to text embeddings."""
    dropout: float = 0.1
    """``dropout``: dropout rate on text embeddings."""


@dataclass
class LossConfig:
    lambda_av: float = 1.0
    """Weight of the AV auxiliary head loss (L1)."""
    lambda_t: float = 1.0
    """Weight of the text auxiliary head loss (L1)."""
    lambda_f: float = 1.0
    """Weight of the fusion-token auxiliary head loss (L1)."""
    lambda_lm: float = 0.0
    """Weight of the next-token LM loss on the transcript."""
    lambda_a: float = 0.5
    """DMPF: weight of the audio-token auxiliary loss."""
    lambda_v: float = 0.5
    """DMPF: weight of the video-token auxiliary loss."""


@dataclass
class ModelConfig:
    family: str = "deepmlf"
    """``deepmlf`` or ``dmpf``."""
    backbone: str = MISSING
    """HF causal LM: a local directory (``fusion-dist make-backbone``) or a hub name."""
    attn_implementation: str = "auto"
    """``auto`` (flash_attention_2 -> sdpa -> eager), or one of those names to force it."""
    mm_layers: list[int] = field(default_factory=list)
    """0-based decoder-layer indices after which an MM block is inserted (empty = text-only baseline)."""
    n_fusion: int = 8
    """DeepMLF: number of learnable fusion tokens."""
    n_audio: int = 10
    """DMPF: audio fusion tokens."""
    n_video: int = 10
    """DMPF: video fusion tokens."""
    n_av: int = 12
    """DMPF: audio-visual fusion tokens."""
    mask_preset: str = "avseesall"
    """DMPF group attention mask: ``avseesall``, ``original`` or ``allcausal``."""
    task_head: str = "selfattn"
    """DMPF task head: ``selfattn`` over the 7 stream vectors, or the ``concat`` MLP baseline."""
    gating: str = "sigmoid"
    """MM-block gates: ``sigmoid`` (paper), ``tanh`` (Flamingo, closed at init) or ``none``."""
    gate_init: float = 0.0
    """Initial value of every gate parameter a (sigmoid(0) = 0.5, tanh(0) = 0)."""
    gca_queries: str = "fusion"
    """Which tokens query the AV sequence: ``fusion``, ``text+fusion`` or ``text``."""
    ffw: bool = True
    """Include the gated FFW copy in every MM block."""
    cross_attn_heads: int = 16
    """Heads of the MM-block cross-attention (must divide the LM width)."""
    head_hidden: int = 64
    """Hidden width of the task-head MLP."""
    dropout: float = 0.1
    """Dropout in MM blocks and heads."""
    av: AVEncoderConfig = field(default_factory=AVEncoderConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class TrainConfig:
    epochs: int = 10
    """Maximum epochs (early stopping may end sooner)."""
    global_batch_size: int = 32
    """Samples per optimizer step = micro-batch x gradient accumulation x world size (must be a multiple of the
    world size)."""
    micro_batch_size: int = 32
    """At most this many samples per rank per forward pass: the micro-batch and the accumulation are derived
    from the global batch and the world size (``batch_geometry``)."""
    eval_batch_size: int = 64
    """Samples per rank per evaluation forward pass."""
    lr: float = 1e-4
    """Peak learning rate of the LM-side trainables (fusion tokens, MM blocks, heads)."""
    av_lr: float = 1e-4
    """Peak learning rate of the AV encoder(s)."""
    weight_decay: float = 0.01
    """AdamW weight decay; never applied to biases, norms, gates or fusion tokens."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    warmup_epochs: float = 1.0
    """Linear warmup length in epochs, then cosine decay to zero."""
    grad_clip: float = 1.0
    """Clip gradients to this global norm (0 disables)."""
    patience: int = 10
    """Early stopping: epochs without validation improvement before stopping."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16``."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    activation_checkpointing: str = "none"
    """Recompute activations in backward instead of keeping them: ``none``, ``lm`` (the frozen decoder layers) or
    ``all`` (also the MM blocks). Saves activation memory for about one more forward pass per step."""
    offload_optimizer: bool = False
    """ZeRO optimizer-state CPU offload (stages 1-3)."""
    offload_params: bool = False
    """ZeRO-3 parameter CPU offload."""
    deepspeed_config: Optional[str] = None
    """Extra DeepSpeed JSON merged over the generated one (advanced; never needed for the basics)."""
    checkpoint_every_steps: int = 0
    """Save a checkpoint every N optimizer steps (0 = only at epoch end)."""
    keep_last: int = 2
    """Checkpoints kept besides the best one."""
    log_every_steps: int = 10
    """Rank 0 prints one progress line every N optimizer steps."""
    dist_timeout_s: float = 600.0
    """Collective-operation timeout: if a rank dies, the others fail within this bound instead of hanging."""


@dataclass(frozen=True)
class BatchGeometry:
    """How one optimizer step of ``global_batch`` samples is cut: ``world`` ranks x ``accumulation``
    micro-batches of ``micro`` samples each."""

    global_batch: int
    world: int
    micro: int
    accumulation: int

    def steps_per_epoch(self, n_train: int) -> int:
        """Whole optimizer steps in an epoch of ``n_train`` samples (``RankSampler`` drops the incomplete
        last round of micro-batches)."""
        return n_train // (self.micro * self.world) // self.accumulation

    def __str__(self) -> str:
        return (f"global batch {self.global_batch} = micro {self.micro} x accumulation {self.accumulation} "
                f"x world {self.world}")


def batch_geometry(train: TrainConfig, world_size: int) -> BatchGeometry:
    """The per-rank micro-batch and the accumulation for this world size (or a ConfigError naming both numbers).

    ``train.micro_batch_size`` is a cap ("at most this many per forward"): the micro-batch is the largest
    divisor of the per-rank share of the global batch that fits under it, so the accumulation is the least
    that respects the cap. Whenever two world sizes give the same micro-batch they run the very same
    micro-batches (``RankSampler`` deals them by position), and on any world size step ``s`` consumes the
    same ``global_batch`` samples.
    """
    g, cap = train.global_batch_size, train.micro_batch_size
    if g < 1 or cap < 1:
        raise ConfigError(f"train.global_batch_size={g} and train.micro_batch_size={cap} must both be >= 1")
    if world_size < 1 or g % world_size:
        raise ConfigError(
            f"train.global_batch_size={g} is not divisible by the world size {world_size} (ranks = nodes x ranks "
            f"per node); choose a global batch that is a multiple of {world_size}, or another number of ranks"
        )
    per_rank = g // world_size
    micro = max(d for d in range(1, min(cap, per_rank) + 1) if per_rank % d == 0)
    return BatchGeometry(g, world_size, micro, per_rank // micro)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None
    """MLflow tracking URI; default $MLFLOW_TRACKING_URI, else a sqlite store in the run directory."""
    experiment: Optional[str] = None
    """Experiment name; default ``fusion-dist/<dataset>``."""
    registry_name: Optional[str] = None
    """Registered model name; default ``<experiment>-<family>`` with the slashes replaced."""
    enabled: bool = True
    """Turn MLflow tracking off entirely."""
    timeout_s: float = 5.0
    """Per-request timeout towards a tracking server; an unreachable server costs at most about this."""
    retry_every_s: float = 30.0
    """While the server is unreachable, probe it again at most this often (calls in between only journal)."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: resolved config, checkpoints, metrics.json, predictions/, export/, local MLflow store."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One training run per seed; test metrics are reported as mean and std over seeds."""
    name: Optional[str] = None
    """Human-readable run name (MLflow parent run); default the run directory's name."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)


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
    ("train.checkpoint_every_steps", lambda v: v >= 0, ">= 0 (0: only at epoch ends)"),
    ("train.keep_last", lambda v: v >= 0, ">= 0"),
    ("train.log_every_steps", lambda v: v >= 1, ">= 1"),
    ("train.dist_timeout_s", lambda v: v > 0, "> 0"),
    ("run.seeds", lambda v: len(v) >= 1 and len(set(v)) == len(v), "a non-empty list without repeats"),
    ("model.mm_layers", lambda v: list(v) == sorted(set(v)), "in increasing order, each layer once"),
]


def check_values(cfg: Config, source: str) -> None:
    """Values outside what any run can use: one ConfigError naming the key, its value and the rule."""
    flat = to_flat_dict(cfg)
    for key, ok, rule in _RANGES:
        if not ok(flat[key]):
            raise ConfigError(f"{source}: {key}={flat[key]!r}: must be {rule}")


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
