"""The run configuration's schema: typed dataclasses, one per YAML section, each field documented where it is
declared (this file is the reference for config keys), and the config each training stage runs with.

Loading, validation and the YAML / flat forms are in ``fusion_dist.config.load``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

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
    encoder_norm: bool = True
    """A final LayerNorm after each modality's Transformer encoder (pre-norm layers leave the output unnormalised;
    the reference has none)."""
    batchnorm: list[str] = field(default_factory=lambda: ["audio", "vision"])
    """Modalities whose frames get BatchNorm over channels before the input projection (``[]``: none; reference:
    SIMS both, MOSI/MOSEI none in stage 2)."""
    softperm: float = 0.0
    """SoftPerm on the raw frames at train time: per (sample, channel) probability of taking a permuted real
    frame's value (reference: 0.2-0.3)."""
    frame_mask: float = 0.0
    """Train time: probability of zeroing each real frame (DMPF's unimodal encoders: 0.1-0.2)."""
    modality_mask: float = 0.0
    """Train time, encoders of several modalities: probability of zeroing a sample's frames of one modality
    (DMPF's AV encoder: 0.1)."""
    init: str = "pretrained+tune"
    """Fusion curriculum: ``pretrained+tune``, ``pretrained+frozen`` or ``random+tune``."""
    checkpoint: Optional[str] = None
    """Stage-1 export directory (``fusion-dist pretrain-av``); required by the ``pretrained+*`` inits."""


@dataclass
class UnimodalEncoderConfig:
    """DMPF's audio-only or video-only encoder (``model.audio_encoder`` / ``model.video_encoder``): each unset size
    takes ``model.av``'s value, as do the keys not listed here (maxlen, BatchNorm, SoftPerm)."""
    d_enc: Optional[int] = None
    """Encoder width (reference MOSEI: audio 30, video 40)."""
    n_layers: Optional[int] = None
    """Encoder layers (reference MOSEI: audio 3, video 6)."""
    n_heads: Optional[int] = None
    """Attention heads (reference MOSEI: audio 6, video 8)."""
    d_av: Optional[int] = None
    """Width of the encoder's output sequence (what its fusion tokens cross-attend to)."""
    frame_mask: float = 0.0
    """Train time: probability of zeroing each real frame (reference: 0.1-0.2)."""
    init: str = "random"
    """``random``, or ``stage1``: this modality's part of the stage-1 export ``model.av.checkpoint`` (its encoder
    and its share of the fusion projection; needs the same sizes)."""


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
    unimodal_labels: bool = False
    """Regress the text (and DMPF's audio / video) auxiliary heads to the data's unimodal labels ``label_T``
    (``label_A`` / ``label_V``: CH-SIMS has them) instead of the multimodal label; the data must have them."""


@dataclass
class ModelConfig:
    family: str = "deepmlf"
    """``deepmlf`` or ``dmpf``."""
    backbone: str = MISSING
    """HF causal LM: a local directory (``fusion-dist make-backbone``) or a hub name (``org/name@rev``: at rev)."""
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
    unimodal_aux: str = "tokens"
    """DMPF: what the audio / video auxiliary heads read: ``tokens`` (the mean audio / video fusion token) or
    ``encoders`` (the mean output of the audio-only / video-only encoder, as the reference)."""
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
    cross_attn_scale: str = "head"
    """Cross-attention logit scale: ``head`` (1/sqrt(d_head), as standard attention) or ``model`` (1/sqrt(d) over
    the LM width, the reference's: sqrt(heads) times softer logits)."""
    fusion_position_start: Optional[int] = None
    """Position ids of the fusion tokens: unset, right after each sample's last real text token; an int L, fixed
    L..L+n-1 whatever the text length (the reference: the padded text length, ``data.max_text_tokens``)."""
    head_hidden: int = 64
    """Hidden width of the task-head MLP."""
    dropout: float = 0.1
    """Dropout in MM blocks and heads."""
    prefix_split: bool = True
    """Train the decoder layers up to the first MM block with autograd over the fusion tokens only (exact: the text
    there depends on nothing trainable). Needs a 4-D mask kernel (sdpa, eager); ``false``: the whole sequence."""
    fused_ops: bool = True
    """Same results, faster: GPT-2's ``gelu_new`` as the fused tanh GELU; LoRA's product added by one addmm; the LM
    loss at real token pairs, in logit chunks; no LM loss: the last layer runs only the positions the heads read."""
    lm_dropout: bool = False
    """Run the frozen LM's own dropout at train time (its weights stay frozen). The reference runs GPT-2 this way
    (0.1 on residuals, attention and embeddings); ``false`` runs it as at inference. Llama-family backbones such
    as SmolLM2 have no dropout, so it changes nothing there."""
    av: AVEncoderConfig = field(default_factory=AVEncoderConfig)
    audio_encoder: UnimodalEncoderConfig = field(default_factory=UnimodalEncoderConfig)
    video_encoder: UnimodalEncoderConfig = field(default_factory=UnimodalEncoderConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class TrainConfig:
    epochs: int = 10
    """Safety cap on epochs: early stopping (``patience``) is the normal end of a run. Without ``schedule_epochs``
    it is also the cosine horizon."""
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
    schedule: str = "cosine"
    """Learning-rate schedule after the warmup: ``cosine`` (over ``schedule_epochs``) or ``plateau``
    (ReduceLROnPlateau on the validation MAE: x ``plateau_factor`` after ``plateau_patience`` epochs without
    improvement)."""
    warmup_epochs: float = 1.0
    """Linear warmup from 0 to the peak learning rate, in epochs."""
    schedule_epochs: Optional[float] = None
    """Cosine period in epochs after the warmup: the lr falls from the peak to ``min_lr`` over it (reference: MOSI
    150, MOSEI 15-20, SIMS 100). Unset: the rest of ``epochs``."""
    lr_restarts: bool = True
    """After each cosine period of ``schedule_epochs`` restart at the peak (the reference's warm restarts); ``false``
    holds ``min_lr``. Without ``schedule_epochs`` the cosine ends with ``epochs``: nothing to restart."""
    min_lr: float = 0.0
    """Lowest learning rate of the cosine (reference: 1e-7)."""
    plateau_factor: float = 0.1
    """``schedule=plateau``: the factor the learning rate is multiplied by on a plateau."""
    plateau_patience: int = 10
    """``schedule=plateau``: epochs without validation improvement before the learning rate drops."""
    grad_clip: float = 1.0
    """Gradient clipping threshold (0 disables): the global norm (``grad_clip_mode=norm``) or each gradient
    element's magnitude (``value``)."""
    grad_clip_mode: str = "norm"
    """``norm``: DeepSpeed scales all gradients to a global norm of at most ``grad_clip``; ``value``: each
    element is clamped to [-grad_clip, grad_clip] (reference: 5.0 on the LM side)."""
    grad_clip_av: bool = True
    """Clip the AV encoders' gradients too; ``false`` (reference) clips the LM-side groups only (needs
    ``grad_clip_mode=value``: a global norm is over every parameter)."""
    patience: int = 10
    """Early stopping: epochs without validation improvement before stopping."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16``."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    prefix_cache: str = "auto"
    """Each transcript's states through the frozen layers up to the first MM block, computed once before training
    and reused where exact (evaluation; training without text augmentation or LM dropout). ``memory``: each rank's
    CPU memory; ``disk``: ``<run.dir>/prefix_cache/``, mapped by every rank, never used for another backbone or
    dataset; ``auto``: memory up to ``prefix_cache_memory_gb``, else disk if it fits, else off; ``off``."""
    prefix_cache_memory_gb: float = 2.0
    """``prefix_cache=auto``: the largest cache kept in each rank's memory (GiB); larger ones go to disk."""
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


@dataclass
class PretrainConfig:
    """Stage 1 (``fusion-dist pretrain-av``) trains the AV encoder with its own recipe (the reference's defaults).

    For stage 1 these keys replace the ``train`` keys of the same name (``lr`` is also the AV learning rate, and
    every group is clipped); ``train``'s other keys (precision, ZeRO, checkpoints, logging) apply to both stages."""

    epochs: int = 200
    """Safety cap on epochs; early stopping ends stage 1."""
    global_batch_size: int = 128
    """Samples per optimizer step (reference: 32 x 4)."""
    micro_batch_size: int = 32
    """Cap on the samples per rank per forward pass."""
    lr: float = 1e-3
    """Learning rate of the encoder and its head (reference: MOSI 1e-3, MOSEI 5e-3, SIMS 5e-4)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    schedule: str = "plateau"
    """``plateau`` (reference: ReduceLROnPlateau on the validation loss) or ``cosine``."""
    warmup_epochs: float = 0.0
    """Linear warmup in epochs."""
    schedule_epochs: Optional[float] = None
    """``schedule=cosine``: its period in epochs (unset: the rest of ``epochs``)."""
    plateau_factor: float = 0.1
    """``schedule=plateau``: lr factor on a plateau."""
    plateau_patience: int = 10
    """``schedule=plateau``: epochs without improvement before the lr drops (reference: MOSEI 4, else 10)."""
    patience: int = 8
    """Early stopping: epochs without validation improvement."""
    grad_clip: float = 1.0
    """Clipping threshold (0 disables), on every parameter."""
    grad_clip_mode: str = "value"
    """``value`` (reference) or ``norm``."""
    batchnorm: list[str] = field(default_factory=lambda: ["audio", "vision"])
    """``model.av.batchnorm`` in stage 1 (reference: MOSI audio, MOSEI none, SIMS both); stage 2 loads the
    encoder with its own choice (BatchNorm weights it lacks start fresh, ones it does not use are dropped)."""
    softperm: float = 0.2
    """``model.av.softperm`` in stage 1."""
    maxlen: Optional[int] = None
    """``model.av.maxlen`` in stage 1 (unset: the same; reference SIMS: 39, stage 2 55)."""
    modality_mask: float = 0.0
    """``model.av.modality_mask`` in stage 1 (the reference masks modalities in DMPF's stage 2 only)."""
    head: str = "last"
    """The stage-1 regression head: ``last`` (the reference: linear on the last step of the fused sequence) or
    ``mean`` (the task-head MLP on its mean). Not part of the export: stage 2 loads the encoder only."""


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
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)


SCHEDULES = ("cosine", "plateau")
CLIP_MODES = ("norm", "value")
PREFIX_CACHES = ("auto", "memory", "disk", "off")
UNIMODAL_INITS = ("random", "stage1")
UNIMODAL_AUX = ("tokens", "encoders")


def pretrain_replaces() -> dict[str, str]:
    """``{replaced key: pretrain key}``: the ``train.*`` and ``model.av.*`` keys the ``pretrain`` section sets
    in stage 1 (its other keys, ``head``, are its own)."""
    train = {f.name for f in dataclasses.fields(TrainConfig)}
    av = {f.name for f in dataclasses.fields(AVEncoderConfig)}
    out = {}
    for f in dataclasses.fields(PretrainConfig):
        if f.name in train or f.name in av:
            out[f"train.{f.name}" if f.name in train else f"model.av.{f.name}"] = f"pretrain.{f.name}"
    out["train.av_lr"] = "pretrain.lr"
    return out


def stage_config(cfg: Config, stage: str) -> Config:
    """The config a stage trains with: stage 2 (``train``) as given; stage 1 (``pretrain-av``) with the
    ``pretrain`` section in place of the keys it replaces (``pretrain_replaces``; an unset ``pretrain.maxlen``
    keeps ``model.av.maxlen``) and every group clipped. Run directories and stage-1 exports record this
    resolved config."""
    if stage == TRAIN:
        return cfg
    out = copy.deepcopy(cfg)
    for key, source in pretrain_replaces().items():
        section, name = (out.train, key[6:]) if key.startswith("train.") else (out.model.av, key[9:])
        value = getattr(cfg.pretrain, source[9:])
        if value is not None:
            setattr(section, name, copy.deepcopy(value))
    out.train.grad_clip_av = True
    return out
