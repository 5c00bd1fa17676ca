"""DeepMLF and DMPF on any HuggingFace decoder LM (SPEC 3)."""

from fusion_dist.models.av_encoder import AVEncoder, build_av_pretrainer, load_av_encoder, save_av_encoder
from fusion_dist.models.backbone import choose_attn_implementation, gathered, load_backbone
from fusion_dist.models.presets import make_backbone
from fusion_dist.models.build import build_model, check_feature_dims, count_parameters
from fusion_dist.models.heads import ModelOutput

__all__ = [
    "AVEncoder", "ModelOutput", "build_av_pretrainer", "build_model", "check_feature_dims", "choose_attn_implementation",
    "count_parameters", "gathered", "load_av_encoder", "load_backbone", "make_backbone", "save_av_encoder",
]
