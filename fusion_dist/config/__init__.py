"""Typed run configuration: dataclasses loaded from YAML with ``key=value`` overrides (``schema``: the sections and
their keys, each documented where it is declared; ``load``: loading, strict validation, the YAML and flat forms;
``batch``: how a global batch is cut across ranks)."""

from fusion_dist.config.batch import BatchGeometry, batch_geometry
from fusion_dist.config.load import check_values, from_yaml, load_config, to_flat_dict, to_yaml
from fusion_dist.config.schema import (
    PRETRAIN_AV, STAGES, TRAIN, AugmentConfig, AVEncoderConfig, Config, ConfigError, DataConfig,
    LoRAConfig, LossConfig, ModelConfig, PretrainConfig, RunConfig, TrackingConfig, TrainConfig, UnimodalEncoderConfig,
    pretrain_replaces, stage_config,
)

__all__ = [
    "PRETRAIN_AV", "STAGES", "TRAIN", "AugmentConfig", "AVEncoderConfig", "BatchGeometry", "Config", "ConfigError",
    "DataConfig", "LoRAConfig", "LossConfig", "ModelConfig", "PretrainConfig", "RunConfig", "TrackingConfig",
    "TrainConfig", "UnimodalEncoderConfig", "batch_geometry", "check_values", "from_yaml", "load_config",
    "pretrain_replaces", "stage_config", "to_flat_dict", "to_yaml",
]
