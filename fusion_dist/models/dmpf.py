"""DMPF ("All interactions matter"): modality-preserving deep fusion with three fusion-token groups.

    sequence: [text | audio tokens (n_a) | video tokens (n_v) | AV tokens (n_av)]
    encoders: audio-only, video-only and the bimodal AV encoder (SPEC 3.1)
    MM block: audio tokens <- audio encoder, video tokens <- video encoder, AV tokens <- Z, each through
              its own gated cross-attention (gates a_a, a_v, a_av), then the gated FFW copy (a_ffw)
    head:     self-attention over 7 stream vectors (mean audio / video / AV tokens, last text token,
              mean audio / video / AV encoder states), or the concat-MLP baseline
    L = L1(task) + l_a L1(audio tokens) + l_v L1(video tokens) + l_f L1(AV tokens) + l_t L1(text)
        + l_av L1(AV encoder) + l_LM L_LM

The group attention mask (rows = queries; every preset is causal inside a group and blocks padding):

    preset      text     audio    video    AV
    avseesall   t        t,a      t,v      t,a,v,av
    original    t        t,a      t,v      t,av
    allcausal   t        t,a      t,a,v    t,a,v,av      (= a plain causal mask)

flash_attention_2 only knows causal + padding masks, so it cannot run these; build_model loads the
backbone with sdpa instead and says so.

Each encoder has its own sizes (``model.audio_encoder`` / ``model.video_encoder``, unset keys from ``model.av``).
``model.av.init`` applies to the bimodal AV encoder; the audio-only and video-only encoders start random or, with
``init: stage1``, from their modality's part of the same stage-1 export. The audio / video auxiliary heads read
the fusion tokens or (``model.unimodal_aux=encoders``, the reference) the encoders' mean outputs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fusion_dist.config import AVEncoderConfig, ModelConfig
from fusion_dist.models.av_encoder import AVEncoder, masked_mean
from fusion_dist.models.fusion_lm import FusionLM, last_real
from fusion_dist.models.heads import AuxHeads, ConcatHead, ModelOutput, StreamAttentionHead
from fusion_dist.models.mm_block import MMBlock

GROUPS = ("text", "audio", "video", "av")
MASK_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    # query group -> key groups it may see
    "avseesall": {"text": ("text",), "audio": ("text", "audio"), "video": ("text", "video"),
                  "av": ("text", "audio", "video", "av")},
    "original": {"text": ("text",), "audio": ("text", "audio"), "video": ("text", "video"), "av": ("text", "av")},
    "allcausal": {"text": ("text",), "audio": ("text", "audio"), "video": ("text", "audio", "video"),
                  "av": ("text", "audio", "video", "av")},
}
TASK_HEADS = ("selfattn", "concat")


def unimodal_encoder_config(cfg: ModelConfig, which: str) -> AVEncoderConfig:
    """``model.av`` with ``model.<which>``'s sizes and frame masking (``which``: audio_encoder / video_encoder)."""
    own = getattr(cfg, which)
    sizes = {k: getattr(own, k) for k in ("d_enc", "n_layers", "n_heads", "d_av") if getattr(own, k) is not None}
    return dataclasses.replace(cfg.av, **sizes, frame_mask=own.frame_mask, modality_mask=0.0)


def sees_matrix(preset: str) -> torch.Tensor:
    table = MASK_PRESETS[preset]
    return torch.tensor([[k in table[q] for k in GROUPS] for q in GROUPS], dtype=torch.bool)


class DMPF(FusionLM):
    def __init__(self, cfg: ModelConfig, lm: nn.Module, tokenizer, attn_kernel: str, audio_dim: int, vision_dim: int):
        super().__init__(cfg, lm, tokenizer, attn_kernel)
        d = self.adapter.hidden_size
        self.sizes = {"audio": cfg.n_audio, "video": cfg.n_video, "av": cfg.n_av}
        self.fusion_tokens_audio = nn.Parameter(torch.randn(cfg.n_audio, d) * 0.02)
        self.fusion_tokens_video = nn.Parameter(torch.randn(cfg.n_video, d) * 0.02)
        self.fusion_tokens_av = nn.Parameter(torch.randn(cfg.n_av, d) * 0.02)
        self.audio_encoder = AVEncoder({"audio": audio_dim}, unimodal_encoder_config(cfg, "audio_encoder"))
        self.video_encoder = AVEncoder({"vision": vision_dim}, unimodal_encoder_config(cfg, "video_encoder"))
        self.av_encoder = AVEncoder({"audio": audio_dim, "vision": vision_dim}, cfg.av)
        self.register_buffer("sees", sees_matrix(cfg.mask_preset), persistent=False)
        d_ctx = {"audio": self.audio_encoder.d_av, "video": self.video_encoder.d_av, "av": self.av_encoder.d_av}
        for i in cfg.mm_layers:
            self.mm_blocks[str(i)] = MMBlock(self.adapter, i, d_ctx, cfg)
        dims = [d, d, d, d, d_ctx["audio"], d_ctx["video"], d_ctx["av"]]
        if cfg.task_head == "selfattn":
            self.task_head = StreamAttentionHead(dims, cfg.head_hidden, 4, cfg.dropout)
        else:
            self.task_head = ConcatHead(dims, cfg.head_hidden, cfg.dropout)
        loss = cfg.loss
        self.aux_weights = {"a": loss.lambda_a, "v": loss.lambda_v, "f": loss.lambda_f, "t": loss.lambda_t,
                            "av": loss.lambda_av}
        on_encoders = cfg.unimodal_aux == "encoders"
        aux_dims = {"a": d_ctx["audio"] if on_encoders else d, "v": d_ctx["video"] if on_encoders else d, "f": d,
                    "t": d, "av": d_ctx["av"]}
        self.aux_heads = AuxHeads({k: aux_dims[k] for k, w in self.aux_weights.items() if w > 0})

    def spans(self, T: int) -> dict[str, slice]:
        """Each group's positions after ``T`` text positions."""
        spans, start = {}, T
        for g, n in self.sizes.items():
            spans[g] = slice(start, start + n)
            start += n
        return spans

    def forward(self, batch: dict, all_states: bool = False) -> ModelOutput:
        input_ids, text_valid = self.text_input(batch)
        T = input_ids.shape[1]
        contexts = {
            "audio": self.audio_encoder(batch, self.dtype),
            "video": self.video_encoder(batch, self.dtype),
            "av": self.av_encoder(batch, self.dtype),
        }
        groups = [self.fusion_tokens_audio, self.fusion_tokens_video, self.fusion_tokens_av]
        h = self.run_lm(input_ids, text_valid, groups, self.sees, self.spans(T), contexts, all_states)
        T = h.shape[1] - sum(self.sizes.values())  # every text position, or only the last one (FusionLM.tail_from)
        text_valid, spans = text_valid[:, -T:], self.spans(T)

        tokens = {g: h[:, span].mean(1) for g, span in spans.items()}
        enc = {g: masked_mean(*contexts[g]) for g in contexts}
        text = last_real(h[:, :T], text_valid)
        streams = [tokens["audio"], tokens["video"], tokens["av"], text, enc["audio"], enc["video"], enc["av"]]
        prediction = self.task_head(streams)
        unimodal = enc if self.cfg.unimodal_aux == "encoders" else tokens
        features = {"a": unimodal["audio"], "v": unimodal["video"], "f": tokens["av"], "t": text, "av": enc["av"]}
        aux = self.aux_heads(features, self.aux_heads.heads.keys())
        lm_term = self.lm_term(h[:, :T], input_ids, text_valid)
        loss, losses = self.total_loss(prediction, aux, self.aux_weights, batch, lm_term)
        return ModelOutput(prediction, loss, losses, hidden_states=h, text_mask=text_valid)
