"""AV encoder masks and export, augmentation that never mixes padding in, backbone loading and make-backbone."""

import pytest
import torch

from fusion_dist.cli import main as cli
from fusion_dist.config import AugmentConfig, Config
from fusion_dist.errors import UserError
from fusion_dist.models import (
    build_av_pretrainer, build_model, check_feature_dims, choose_attn_implementation, load_av_encoder,
    load_backbone, save_av_encoder,
)
from fusion_dist.models.augment import TextAugment, augment_frames, permute_real_positions
from model_helpers import AUDIO_DIM, VISION_DIM, backbones, single_thread, tiny_cfg  # noqa: F401


def av_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B = 3
    batch = {"label": torch.randn(B, generator=g)}
    for name, dim, L in (("audio", AUDIO_DIM, 11), ("vision", VISION_DIM, 9)):
        lengths = torch.tensor([L, 4, 1])
        mask = torch.arange(L)[None] < lengths[:, None]
        batch.update({name: torch.randn(B, L, dim, generator=g) * mask[..., None], f"{name}_lengths": lengths,
                      f"{name}_mask": mask})
    return batch


def test_frames_past_the_true_length_never_count():
    cfg = tiny_cfg("unused").av
    model = build_av_pretrainer(cfg, AUDIO_DIM, VISION_DIM, head_hidden=16).eval()
    batch = av_batch()
    garbage = dict(batch)
    for name in ("audio", "vision"):
        garbage[name] = torch.where(batch[f"{name}_mask"][..., None], batch[name], torch.full_like(batch[name], 1e3))
    with torch.no_grad():
        ref = model(batch).prediction
        torch.testing.assert_close(model(garbage).prediction, ref)
        alone = {k: v[1:2] for k, v in batch.items()}  # the 4-frame sample without the longer ones
        alone["audio"], alone["vision"] = alone["audio"][:, :4], alone["vision"][:, :4]
        torch.testing.assert_close(model(alone).prediction, ref[1:2], atol=1e-5, rtol=1e-4)


def test_empty_modality_gives_no_nan():
    model = build_av_pretrainer(tiny_cfg("unused").av, AUDIO_DIM, VISION_DIM, head_hidden=16)
    batch = av_batch()
    batch["audio_lengths"] = torch.tensor([11, 0, 3])
    out = model(batch)
    out.loss.backward()
    assert torch.isfinite(out.prediction).all()


def test_av_export_roundtrip_and_curriculum(backbones, tmp_path):
    cfg = Config()
    cfg.data.root = str(tmp_path / "shards")
    cfg.model = tiny_cfg(backbones["gpt2"])
    torch.manual_seed(1)
    stage1 = build_av_pretrainer(cfg.model.av, AUDIO_DIM, VISION_DIM, head_hidden=16)
    save_av_encoder(stage1.av_encoder.state_dict(), stage1.av_encoder.dims, tmp_path / "export", cfg)
    loaded = load_av_encoder(tmp_path / "export")
    for (k, v), (k2, v2) in zip(stage1.av_encoder.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)

    for init in ("pretrained+tune", "pretrained+frozen"):
        m = build_model(tiny_cfg(backbones["gpt2"], av__init=init, av__checkpoint=str(tmp_path / "export")),
                        AUDIO_DIM, VISION_DIM).train()
        torch.testing.assert_close(m.av_encoder.fuse.weight, stage1.av_encoder.fuse.weight)
        frozen = init.endswith("frozen")
        assert all(p.requires_grad != frozen for p in m.av_encoder.parameters())
        assert m.av_encoder.training != frozen
    with pytest.raises(UserError, match=r"model\.av\.checkpoint.*\{'audio': 5, 'vision': 7\}.*\{'audio': 6"):
        build_model(tiny_cfg(backbones["gpt2"], av__init="pretrained+tune", av__checkpoint=str(tmp_path / "export")),
                    AUDIO_DIM + 1, VISION_DIM)
    with pytest.raises(UserError, match=r"model\.av\.checkpoint"):
        build_model(tiny_cfg(backbones["gpt2"], av__init="pretrained+tune", av__checkpoint=str(tmp_path)),
                    AUDIO_DIM, VISION_DIM)


def test_feature_dims_must_match_the_manifest(backbones):
    model = build_model(tiny_cfg(backbones["gpt2"]), AUDIO_DIM, VISION_DIM)
    check_feature_dims(model, {"features": {"audio": {"dim": AUDIO_DIM}, "vision": {"dim": VISION_DIM}}})
    with pytest.raises(UserError, match="manifest feature dims"):
        check_feature_dims(model, {"features": {"audio": {"dim": 74}, "vision": {"dim": VISION_DIM}}})


@pytest.mark.parametrize("kind", ["seqaug", "noise", "dropout"])
def test_augmentation_never_mixes_padding_into_real_tokens(kind):
    torch.manual_seed(0)
    valid = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 1, 0]], dtype=torch.bool)
    emb = torch.randn(3, 6, 16)
    emb[~valid] = 1e4  # padding values that must never show up in real positions
    aug = TextAugment(AugmentConfig(kind=kind, p_apply=1.0, p_perm=0.5)).train()
    out = aug(emb, valid)
    assert torch.equal(out[~valid], emb[~valid])
    assert out[valid].abs().max() < 1e3 and not torch.equal(out[valid], emb[valid])
    if kind == "seqaug":  # every real value comes from the same channel of some real position of that sample
        for b in range(3):
            real = emb[b][valid[b]]
            for row in out[b][valid[b]]:
                assert ((row[None] == real).any(0)).all()
    assert torch.equal(aug.eval()(emb, valid), emb)


@pytest.mark.parametrize("kind", ["softperm", "frame_mask", "modality_mask"])
def test_av_frame_augmentation_changes_only_real_frames_and_only_in_training(kind):
    """SoftPerm (both stages), DMPF's frame and modality masking: padding frames stay as they are, real frames
    change, and an encoder in eval mode computes exactly what it computes without the augmentation."""
    torch.manual_seed(0)
    batch = av_batch()
    lengths, frames = batch["audio_lengths"], batch["audio"].clone()
    valid = batch["audio_mask"]
    frames[~valid] = 1e4
    cfg = tiny_cfg("unused").av
    setattr(cfg, kind, 0.5)
    out = augment_frames(frames, lengths, cfg, modality_mask=True)
    assert torch.equal(out[~valid], frames[~valid])
    assert out[valid].abs().max() < 1e3 and not torch.equal(out[valid], frames[valid])
    if kind == "softperm":  # each real value comes from the same channel of a real frame of that sample
        for b in range(len(lengths)):
            real = frames[b][valid[b]]
            assert all(((row[None] == real).any(0)).all() for row in out[b][valid[b]])
    else:  # masking zeroes whole frames
        changed = (out != frames).any(-1)
        assert (out[changed] == 0).all()
    plain = build_av_pretrainer(tiny_cfg("unused").av, AUDIO_DIM, VISION_DIM, head_hidden=16)
    augmented = build_av_pretrainer(cfg, AUDIO_DIM, VISION_DIM, head_hidden=16)
    augmented.load_state_dict(plain.state_dict())
    batch = av_batch()
    for mode, same in ((False, True), (True, False)):
        torch.manual_seed(1)
        z_plain = plain.train(mode).av_encoder(batch, torch.float32)[0]
        torch.manual_seed(1)
        z_aug = augmented.train(mode).av_encoder(batch, torch.float32)[0]
        assert torch.equal(z_plain, z_aug) == same, (kind, mode)


def test_lm_dropout_is_a_switch(backbones):
    """``model.lm_dropout``: the frozen GPT-2's own dropout runs at train time only when switched on."""
    from model_helpers import planted_batch

    for on in (False, True):
        # no FFW copies: they are trainable modules with GPT-2's own MLP dropout whatever the switch
        model = build_model(tiny_cfg(backbones["gpt2"], lm_dropout=on, ffw=False), AUDIO_DIM, VISION_DIM).train()
        assert model.lm.training == on and not model.eval().lm.training
        batch = planted_batch(model.tokenizer, n=4)
        model.train()
        first, second = model(batch).prediction, model(batch).prediction
        assert torch.equal(first, second) != on


def test_permutation_stays_within_each_samples_real_positions():
    valid = torch.tensor([[0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    x = torch.arange(6.0).view(1, 6, 1)
    for _ in range(10):
        out = permute_real_positions(x, valid)[0, :, 0]
        assert sorted(out[valid[0]].tolist()) == [1.0, 2.0, 4.0, 5.0] and out[0] == 0 and out[3] == 3


def test_backbone_loading_and_make_backbone_cli(backbones, tmp_path, capsys):
    lm, tok, kernel = load_backbone(backbones["qwen2"])
    assert kernel == choose_attn_implementation("auto") == "sdpa"  # CPU: no flash
    assert not any(p.requires_grad for p in lm.parameters()) and tok.pad_token is not None
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="model.backbone.*no config.json"):
        build_model(tiny_cfg(str(tmp_path / "empty")), AUDIO_DIM, VISION_DIM)
    with pytest.raises(UserError, match="model.attn_implementation"):
        choose_attn_implementation("xformers")
    assert cli(["make-backbone", "--arch", "llama", "--preset", "smollm2-1.7b", "--out", str(tmp_path / "s"),
                "--config-only"]) == 0
    assert (tmp_path / "s" / "config.json").is_file() and not list((tmp_path / "s").glob("*.safetensors"))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "s")("good movie").input_ids
    assert cli(["make-backbone", "--arch", "gpt2", "--preset", "smollm2-1.7b", "--out", str(tmp_path / "x")]) == 2
    assert "--preset" in capsys.readouterr().err
