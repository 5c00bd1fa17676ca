"""DeepMLF (Georgiou et al. 2025): a frozen decoder LM with learnable fusion tokens and MM blocks.

    H0 = [X_t || X_f]                          fusion tokens appended after the text       (eq. 7)
    after each chosen layer l: MM block         gated cross-attention to Z, gated FFW copy  (eqs. 8-11)
    y_o = g([<z> || x_t,K || <x_f>])            task head on the final (normed) states      (eq. 12)
    L = L1(y, y_o) + l_av L1(y, y_av) + l_t L1(y, y_t) + l_f L1(y, y_f) + l_LM L_LM        (eqs. 13-14)

Z is the AV encoder's output; x_t,K the last real text token; <.> a mean over real steps / fusion tokens.
Text tokens never attend to fusion tokens, so text states carry no AV information unless the GCA-query
ablation ("text", "text+fusion") sends text tokens into the cross-attention on purpose.

Without MM blocks (``mm_layers: []``) nothing can carry AV into the LM, so the model is the text-only
baseline: the task head reads [x_t,K || <x_f>] alone, there is no AV auxiliary head, and the (unused) AV
encoder is frozen so it never reaches the optimizer, checkpoints or exports.
"""

from __future__ import annotations

import torch
from torch import nn

from fusion_dist.config import ModelConfig
from fusion_dist.models.av_encoder import AVEncoder, masked_mean
from fusion_dist.models.fusion_lm import FusionLM, last_real
from fusion_dist.models.heads import AuxHeads, ModelOutput, regression_head
from fusion_dist.models.mm_block import MMBlock

# Groups [text, fusion]: text sees text (causally); fusion tokens see text and earlier fusion tokens.
SEES = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)


class DeepMLF(FusionLM):
    def __init__(self, cfg: ModelConfig, lm: nn.Module, tokenizer, attn_kernel: str, audio_dim: int, vision_dim: int):
        super().__init__(cfg, lm, tokenizer, attn_kernel)
        d, d_av = self.adapter.hidden_size, cfg.av.d_av
        self.fusion_tokens = nn.Parameter(torch.randn(cfg.n_fusion, d) * 0.02)
        self.av_encoder = AVEncoder({"audio": audio_dim, "vision": vision_dim}, cfg.av)
        for i in cfg.mm_layers:
            self.mm_blocks[str(i)] = MMBlock(self.adapter, i, {"av": d_av}, cfg)
        self.uses_av = bool(cfg.mm_layers)
        if not self.uses_av:  # never run: kept only so data/checkpoint plumbing sees the same model
            self.av_encoder.requires_grad_(False)
        self.task_head = regression_head(2 * d + d_av * self.uses_av, cfg.head_hidden, cfg.dropout)
        self.aux_weights = {"av": cfg.loss.lambda_av * self.uses_av, "t": cfg.loss.lambda_t, "f": cfg.loss.lambda_f}
        dims = {"av": d_av, "t": d, "f": d}
        self.aux_heads = AuxHeads({k: dims[k] for k, w in self.aux_weights.items() if w > 0})

    def forward(self, batch: dict, all_states: bool = False) -> ModelOutput:
        input_ids, text_valid = self.text_input(batch)
        T, n_f = input_ids.shape[1], self.cfg.n_fusion
        queries, contexts, features = {}, {}, {}
        if self.uses_av:
            z, z_mask = self.av_encoder(batch, self.dtype)
            spans = {"fusion": slice(T, T + n_f), "text": slice(0, T), "text+fusion": slice(0, T + n_f)}
            queries, contexts = {"av": spans[self.cfg.gca_queries]}, {"av": (z, z_mask)}
            features["av"] = masked_mean(z, z_mask)
        h = self.run_lm(input_ids, text_valid, [self.fusion_tokens], SEES, queries, contexts, all_states)
        T = h.shape[1] - n_f  # every text position, or only the last one (FusionLM.tail_from)
        text_valid = text_valid[:, -T:]
        features.update(t=last_real(h[:, :T], text_valid), f=h[:, T:].mean(1))
        prediction = self.task_head(torch.cat(list(features.values()), -1)).squeeze(-1)
        aux = self.aux_heads(features, self.aux_heads.heads.keys())
        lm_term = self.lm_term(h[:, :T], input_ids, text_valid)
        loss, losses = self.total_loss(prediction, aux, self.aux_weights, batch, lm_term)
        return ModelOutput(prediction, loss, losses, hidden_states=h, text_mask=text_valid)
