"""The paper configs carry the training recipe behind the paper's numbers (the reference code's values, per dataset
and stage; README "Reproducing the paper"): each value below is transcribed from that recipe and compared with what
the resolved config holds, stage 2 as ``train`` runs it and stage 1 as ``pretrain-av`` runs it."""

import pytest

from fusion_dist.config import PRETRAIN_AV, TRAIN, load_config, stage_config, to_flat_dict

from test_config import ROOT

COMMON = {  # every DeepMLF paper setting, stage 2
    "train.micro_batch_size": 32, "train.global_batch_size": 256, "train.warmup_epochs": 1.0, "train.schedule": "cosine",
    "train.lr_restarts": True, "train.min_lr": 1e-7, "train.betas": [0.9, 0.95], "train.grad_clip": 5.0,
    "train.grad_clip_mode": "value", "train.grad_clip_av": False, "model.dropout": 0.1, "model.cross_attn_heads": 16,
    "model.av.d_av": 30, "model.gating": "sigmoid", "model.gate_init": 0.0, "model.head_hidden": 64,
    "model.av.init": "pretrained+tune", "model.lm_dropout": True, "train.lr": 1e-4, "train.av_lr": 1e-4,
    "model.cross_attn_scale": "model", "model.av.encoder_norm": False,
}
STAGE2 = {
    "deepmlf_mosi": {
        "model.fusion_position_start": 50,
        "model.backbone": "HuggingFaceTB/SmolLM2-1.7B", "model.mm_layers": [11, 14, 17, 20, 23], "model.n_fusion": 8,
        "model.lora.enabled": True, "model.lora.r": 512, "model.lora.alpha": 8192, "model.lora.dropout": 0.05,
        "train.precision": "bf16", "data.max_text_tokens": 50, "model.augment.kind": "none",
        "model.loss.lambda_lm": 0.0, "model.loss.lambda_f": 0.4, "model.loss.lambda_av": 0.8, "model.loss.lambda_t": 0.8,
        "train.weight_decay": 0.001, "train.schedule_epochs": 150, "train.patience": 30, "model.av.batchnorm": [],
        "model.av.softperm": 0.3, "model.av.maxlen": 50,
    },
    "deepmlf_mosei_base": {
        "model.fusion_position_start": 50,
        "model.backbone": "gpt2", "model.mm_layers": [3, 5, 7, 8, 9, 10, 11], "model.n_fusion": 12,
        "model.lora.enabled": False, "train.precision": "fp32", "data.max_text_tokens": 50,
        "model.augment.kind": "seqaug", "model.augment.p_perm": 0.2, "model.augment.p_apply": 0.30,
        "model.loss.lambda_lm": 1.1, "model.loss.lambda_f": 1.0, "model.loss.lambda_av": 1.0, "model.loss.lambda_t": 1.0,
        "train.weight_decay": 0.005, "train.schedule_epochs": 15, "train.patience": 10, "model.av.batchnorm": [],
        "model.av.softperm": 0.2, "model.av.maxlen": 50,
    },
    "deepmlf_mosei": {  # GPT2-large
        "model.fusion_position_start": 50,
        "model.backbone": "gpt2-large", "model.mm_layers": [7, 14, 21, 28, 35], "model.n_fusion": 12,
        "model.lora.enabled": False, "train.precision": "fp32", "data.max_text_tokens": 50,
        "model.augment.kind": "seqaug", "model.augment.p_perm": 0.30, "model.augment.p_apply": 0.25,
        "model.loss.lambda_lm": 1.0, "model.loss.lambda_f": 1.0, "model.loss.lambda_av": 1.0, "model.loss.lambda_t": 1.0,
        "train.weight_decay": 0.1, "train.schedule_epochs": 20, "train.patience": 10, "model.av.batchnorm": [],
        "model.av.softperm": 0.2, "model.av.maxlen": 50,
    },
    "deepmlf_sims": {
        "model.fusion_position_start": 39,
        "model.backbone": "uer/gpt2-chinese-cluecorpussmall", "model.mm_layers": [5, 6, 7, 8, 9, 10, 11],
        "model.n_fusion": 16, "model.lora.enabled": False, "train.precision": "fp32", "data.max_text_tokens": 39,
        "model.augment.kind": "seqaug", "model.augment.p_perm": 0.3, "model.augment.p_apply": 0.25,
        "model.loss.lambda_lm": 1.0, "model.loss.lambda_f": 1.0, "model.loss.lambda_av": 1.0, "model.loss.lambda_t": 1.0,
        "train.weight_decay": 0.1, "train.schedule_epochs": 100, "train.patience": 10,
        "model.av.batchnorm": ["audio", "vision"], "model.av.softperm": 0.2, "model.av.maxlen": 55,
        "model.loss.unimodal_labels": True,
    },
}
STAGE1_COMMON = {"pretrain.head": "last", "model.av.modality_mask": 0.0, "train.micro_batch_size": 32, "train.global_batch_size": 128, "train.schedule": "plateau",
                 "train.plateau_factor": 0.1, "train.patience": 8, "train.grad_clip": 1.0, "train.grad_clip_mode": "value",
                 "train.grad_clip_av": True, "model.av.softperm": 0.2, "train.weight_decay": 0.01}
STAGE1 = {
    "mosi": {"train.lr": 1e-3, "train.av_lr": 1e-3, "train.plateau_patience": 10, "model.av.batchnorm": ["audio"],
             "model.av.maxlen": 50},
    "mosei": {"train.lr": 5e-3, "train.av_lr": 5e-3, "train.plateau_patience": 4, "model.av.batchnorm": [],
              "model.av.maxlen": 50},
    "sims": {"train.lr": 5e-4, "train.av_lr": 5e-4, "train.plateau_patience": 10,
             "model.av.batchnorm": ["audio", "vision"], "model.av.maxlen": 39},
}
DMPF = {  # the DMPF release: as DeepMLF on the dataset except
    "dmpf_mosei": {**STAGE2["deepmlf_mosei"], "model.n_audio": 10, "model.n_video": 10, "model.n_av": 12,
                   "model.loss.lambda_a": 1.0, "model.loss.lambda_v": 1.0, "model.av.modality_mask": 0.1,
                   "model.av.d_enc": 30, "model.av.n_heads": 6, "model.av.n_layers": 3,
                   "model.audio_encoder.d_enc": 30, "model.audio_encoder.n_heads": 6, "model.audio_encoder.n_layers": 3,
                   "model.video_encoder.d_enc": 40, "model.video_encoder.n_heads": 8, "model.video_encoder.n_layers": 6,
                   "model.audio_encoder.init": "stage1", "model.unimodal_aux": "encoders"},
    "dmpf_sims": {**STAGE2["deepmlf_sims"], "model.n_audio": 10, "model.n_video": 8, "model.n_av": 16,
                  "model.loss.lambda_a": 0.5, "model.loss.lambda_v": 0.5, "train.lr": 2e-4, "train.av_lr": 1e-4,
                  "model.av.modality_mask": 0.1, "model.av.d_enc": 30, "model.av.n_heads": 6, "model.av.n_layers": 3,
                  "model.audio_encoder.d_enc": 32, "model.audio_encoder.n_heads": 8, "model.audio_encoder.n_layers": 8,
                  "model.video_encoder.d_enc": 16, "model.video_encoder.n_heads": 8, "model.video_encoder.n_layers": 3,
                  "model.unimodal_aux": "encoders"},
}
for d in DMPF.values():
    d.pop("model.n_fusion")


def dataset(name: str) -> str:
    return next(ds for ds in ("mosei", "mosi", "sims") if ds in name)


@pytest.mark.parametrize("name", [*STAGE2, *DMPF])
def test_paper_config_holds_the_recipe(name):
    cfg = load_config(ROOT / f"configs/paper/{name}.yaml")
    for stage, expected in [(TRAIN, {**COMMON, **STAGE2.get(name, {}), **DMPF.get(name, {})}),
                            (PRETRAIN_AV, {**STAGE1_COMMON, **STAGE1[dataset(name)]})]:
        flat = to_flat_dict(stage_config(cfg, stage))
        wrong = {k: (flat[k], v) for k, v in expected.items() if flat[k] != pytest.approx(v) and flat[k] != v}
        assert not wrong, f"{name} {stage}: (config, recipe) {wrong}"


def test_the_medium_config_is_the_large_recipe_on_gpt2_medium():
    medium, large = (to_flat_dict(load_config(ROOT / f"configs/paper/deepmlf_mosei{s}.yaml")) for s in ("_medium", ""))
    differ = {k for k in medium if medium[k] != large[k]}
    assert differ == {"model.backbone", "model.mm_layers", "model.av.checkpoint", "run.dir"}
    assert medium["model.mm_layers"] == [8, 11, 14, 17, 20, 23] and medium["model.backbone"] == "gpt2-medium"
