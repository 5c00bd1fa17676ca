"""What DeepMLF and DMPF share: the frozen LM run layer by layer with learnable token groups after the text.

Sequence layout: [text | group 1 | group 2 | ...]. Text arrives padded anywhere (the collator pads on the
right); it is first *left-aligned* (a stable sort moving padding to the front), so every sample reads
[padding | real text | fusion tokens] and the real text ends right before the fusion tokens.

Positions: real text 0..n-1, the fusion tokens continue at n, n+1, ... per sample (or, with
``model.fusion_position_start=L``, at L, L+1, ... for every sample); padding gets 0.

Attention, built as a 4-D float additive mask (0 = allowed, finfo.min = blocked; a boolean 4-D mask is
misread by the eager kernel): query i may see key j iff j <= i, key j is real, and the group of i may see
the group of j (``sees``: text sees text only). Padding keys are never seen; a padding query sees only
itself, so no row is empty (no NaN). With the left-aligned layout the DeepMLF mask is exactly "causal +
key padding", which is what flash_attention_2 takes as a 2-D padding mask; DMPF's group mask is not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fusion_dist.config import ModelConfig
from fusion_dist.errors import UserError
from fusion_dist.models.augment import TextAugment
from fusion_dist.models.backbone import LMAdapter, fuse_activations, gathered, lm_dropout_rate
from fusion_dist.models.prefix import AfterTextKV, KeepKV, PrefixCache, RowLayout, run_prefix


UNIMODAL_TARGETS = {"t": "label_T", "a": "label_A", "v": "label_V"}  # aux head -> its unimodal label


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move padding to the front, keeping the order of the real tokens."""
    valid = attention_mask.bool()
    order = valid.to(torch.int8).argsort(dim=1, stable=True)
    return input_ids.gather(1, order), valid.gather(1, order)


def last_real(states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The state of each sample's last real token (B, d), found from the mask."""
    pos = torch.arange(valid.shape[1], device=valid.device)
    last = torch.where(valid, pos, -1).amax(1).clamp(min=0)
    return states[torch.arange(states.shape[0], device=states.device), last]


def group_attention_mask(text_valid: torch.Tensor, group_sizes: list[int], sees: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, S, S) float additive mask for [text | groups...]; ``sees[q, k]``: group q may attend to group k."""
    B, T = text_valid.shape
    device = text_valid.device
    group = torch.cat([torch.full((n,), g, device=device) for g, n in enumerate([T, *group_sizes])])
    key_valid = torch.cat([text_valid, torch.ones(B, sum(group_sizes), dtype=torch.bool, device=device)], 1)
    S = group.numel()
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    allowed = (causal & sees.to(device)[group[:, None], group[None, :]])[None] & key_valid[:, None, :]
    allowed = allowed | torch.eye(S, dtype=torch.bool, device=device)
    mask = torch.zeros(B, 1, S, S, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


LOGIT_CHUNK = 1 << 22  # logits per chunk of the fused LM loss (16 MB in fp32: a chunk stays in cache)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy of ``h @ weight.T + bias`` against ``target``, the frozen head's logits made and
    used chunk by chunk: each chunk's gradient w.r.t. ``h``, (softmax - onehot) @ weight, is taken while its logits
    are in cache, so the (N, vocabulary) logits are never stored, nor read again in backward. Same value and
    gradient as ``F.cross_entropy(F.linear(h, weight, bias).float(), target)``; the head gets no gradient."""

    @staticmethod
    def forward(ctx, h, weight, bias, target):
        n = h.shape[0]
        rows = max(1, LOGIT_CHUNK // weight.shape[0])
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, n, rows):
            logp = F.linear(h[i:i + rows], weight, bias).float().log_softmax(-1)
            picked = torch.arange(logp.shape[0], device=h.device), target[i:i + rows]
            total -= logp[picked].sum()
            if grad is not None:
                probs = logp.exp_()
                probs[picked] -= 1
                torch.mm(probs.to(h.dtype), weight, out=grad[i:i + rows])
        ctx.save_for_backward(grad)
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return grad * (upstream / max(grad.shape[0], 1)).to(grad.dtype), None, None, None


def _call(module: nn.Module, recompute: bool, *args, **kwargs) -> torch.Tensor:
    """``module(*args, **kwargs)``; with ``recompute`` its activations are not kept but recomputed in backward.

    Our own loop does this, not transformers' ``gradient_checkpointing_enable()``: HF checkpoints only layers in
    training mode, and the frozen LM runs in eval mode unless ``model.lm_dropout``. Non-reentrant checkpointing lets gradients reach
    the fusion tokens through frozen layers, and restores the RNG state, so dropout draws the same masks."""
    if recompute:
        return checkpoint(module, *args, use_reentrant=False, **kwargs)
    return module(*args, **kwargs)


class FusionLM(nn.Module):
    """The frozen LM (``self.lm``) with MM blocks (``self.mm_blocks``) after chosen layers."""

    def __init__(self, cfg: ModelConfig, lm: nn.Module, tokenizer, attn_kernel: str):
        super().__init__()
        self.cfg = cfg
        self.lm = lm
        if cfg.fused_ops:
            fuse_activations(lm)
        self.adapter = LMAdapter(lm)
        self.tokenizer = tokenizer
        self.attn_kernel = attn_kernel
        self.augment = TextAugment(cfg.augment)
        self.mm_blocks = nn.ModuleDict()
        self.frozen_encoders: list[str] = []  # attributes kept frozen and in eval mode (pretrained+frozen)
        self.activation_checkpointing = "none"  # train.activation_checkpointing: none | lm | all
        self.prefix_cache: PrefixCache | None = None  # train.prefix_cache: set by the trainer (train/prefix_cache.py)
        # the text's path through the frozen LM is the same every time it is seen, in training too
        self.deterministic_text = (cfg.augment.kind == "none" or cfg.augment.p_apply == 0) and not (
            cfg.lm_dropout and lm_dropout_rate(lm) > 0)

    # ----------------------------------------------------------------- modes and dtype

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.train(mode and self.cfg.lm_dropout)  # frozen weights; its own dropout only with model.lm_dropout
        for name in self.frozen_encoders:
            getattr(self, name).eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.embed_tokens.weight.dtype

    # ----------------------------------------------------------------- the layer loop

    def run_lm(self, input_ids: torch.Tensor, text_valid: torch.Tensor, groups: list[torch.Tensor],
               sees: torch.Tensor, queries: dict[str, slice], contexts: dict[str, tuple],
               all_states: bool = False) -> torch.Tensor:
        """Final (post-norm) states (B, T + sum(groups), d) of [left-aligned text | groups]; with ``model.fused_ops``,
        unless ``all_states``, (B, 1 + sum(groups), d) from the last text token on (see ``tail_from``)."""
        B, T = input_ids.shape
        emb = self.augment(self.adapter.embed(input_ids), text_valid)
        tokens = [g.to(emb.dtype)[None].expand(B, -1, -1) for g in groups]
        h = torch.cat([emb, *tokens], 1)

        text_pos = (text_valid.cumsum(1) - 1).clamp(min=0)
        start = self.cfg.fusion_position_start
        start = text_valid.sum(1, keepdim=True) if start is None else torch.full_like(text_pos[:, :1], start)
        fusion_pos = start + torch.arange(h.shape[1] - T, device=h.device)
        position_ids = torch.cat([text_pos, fusion_pos], 1)
        h = self.adapter.add_positions(h, position_ids)

        if self.attn_kernel == "flash_attention_2":  # only reached by the plain causal layout (DeepMLF)
            mask = torch.cat([text_valid, torch.ones_like(fusion_pos, dtype=torch.bool)], 1).long()
        else:
            mask = group_attention_mask(text_valid, [g.shape[0] for g in groups], sees, h.dtype)
        layer_kwargs = self.adapter.layer_kwargs(h, position_ids)
        recompute = self.training and torch.is_grad_enabled()
        recompute_lm = recompute and self.activation_checkpointing in ("lm", "all")
        recompute_mm = recompute and self.activation_checkpointing == "all"
        # the frozen prefix (fusion_dist/models/prefix.py): split in training, cached where its text is deterministic
        n_prefix = self.prefix_layers
        cache = self.prefix_cache if n_prefix and (not self.training or self.deterministic_text) else None
        keys = PrefixCache.keys(input_ids, text_valid) if cache is not None else None
        if keys is not None and not cache.has(keys):  # a transcript from outside the cached splits
            cache = keys = None
        split = n_prefix > 0 and (cache is not None or (self.cfg.prefix_split and torch.is_grad_enabled()))
        if split:
            h = run_prefix(self.adapter.layers, self.adapter.cache_argument, self.adapter.layer_kwargs, h, mask,
                           position_ids, T, n_prefix, cache, keys)
        last = self.adapter.num_layers - 1
        tail = self.tail_from(T, all_states) if not (split and last < n_prefix) else 0
        for i, layer in enumerate(self.adapter.layers):
            if i == last and tail:
                h = self.run_tail(h, mask, position_ids, tail)
                queries = {s: slice(max(q.start - tail, 0), q.stop - tail) for s, q in queries.items()}
            elif not (split and i < n_prefix):
                h = _call(layer, recompute_lm, h, attention_mask=mask, **layer_kwargs)
            if str(i) in self.mm_blocks:
                h = _call(self.mm_blocks[str(i)], recompute_mm, h, queries, contexts)
        return self.adapter.final_norm(h)

    def tail_from(self, T: int, all_states: bool) -> int:
        """Where the last layer's work starts: the heads read the last text token (left-aligned: position T-1) and
        the groups, so without an LM loss the earlier text positions of the last layer reach no output and give only
        their keys / values (its MLP and its MM block skip them). 0 (everything) under flash_attention_2, whose 2-D
        masks cannot express the split call, and without ``model.fused_ops``."""
        if all_states or not self.cfg.fused_ops or self.lm_loss_on or self.attn_kernel == "flash_attention_2":
            return 0
        return T - 1

    def run_tail(self, h: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, start: int) -> torch.Tensor:
        """The last decoder layer's states of positions ``start:``, attending to the keys / values of all."""
        head, tail = h[:, :start], h[:, start:]
        kept = KeepKV()
        last = self.adapter.num_layers - 1
        self.adapter.keep_keys_values(last, head, mask[:, :, :start, :start],
                                      kept, **self.adapter.layer_kwargs(head, position_ids[:, :start]))
        # not checkpointed: the keys / values reach the second call outside the layer's own graph
        return self.adapter.layers[last](tail, attention_mask=mask[:, :, start:, :],
                                         **self.adapter.layer_kwargs(tail, position_ids[:, start:]),
                                         **{self.adapter.cache_argument: AfterTextKV(kept)})

    @property
    def prefix_layers(self) -> int:
        """The frozen prefix's depth: the decoder layers up to and including the first one with an MM block after it
        (the text reaches nothing trainable before that block); all of them without MM blocks. 0 under
        flash_attention_2, whose 2-D masks cannot express the split's fusion calls."""
        if self.attn_kernel == "flash_attention_2":
            return 0
        return min((int(i) + 1 for i in self.mm_blocks), default=self.adapter.num_layers)

    @torch.no_grad()
    def prefix_rows(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, RowLayout]:
        """The prefix cache's rows (prefix.py) of ``c`` transcripts of one length, ``input_ids`` (c, n) all real."""
        c, n = input_ids.shape
        lm_mode = self.lm.training
        self.lm.eval()  # the LM's own dropout never reaches the cache
        try:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
            position_ids = torch.arange(n, device=input_ids.device).expand(c, n)
            h = self.adapter.add_positions(self.adapter.embed(input_ids), position_ids)
            mask = group_attention_mask(valid, [], torch.ones(1, 1, dtype=torch.bool), h.dtype)
            kept = KeepKV()
            for layer in self.adapter.layers[:self.prefix_layers]:
                h = layer(h, attention_mask=mask, **self.adapter.layer_kwargs(h, position_ids),
                          **{self.adapter.cache_argument: kept})
        finally:
            self.lm.train(lm_mode)
        layout = RowLayout.of(kept, h)
        return layout.rows(kept, h), layout

    @property
    def lm_loss_on(self) -> bool:
        return self.training and self.cfg.loss.lambda_lm > 0

    def lm_term(self, text_states: torch.Tensor, input_ids: torch.Tensor,
                text_valid: torch.Tensor) -> torch.Tensor | None:
        """Next-token cross-entropy of the frozen LM head on the transcript (pairs of real tokens only); a training
        regulariser, None in evaluation (its logits over the vocabulary cost nearly half of GPT-2's forward)."""
        if not self.lm_loss_on:
            return None
        pairs = text_valid[:, 1:] & text_valid[:, :-1]
        head = self.adapter.lm_head
        if self.cfg.fused_ops and not any(p.requires_grad for p in head.parameters()):
            # real pairs only (a (B, T) slice would run as a batched matmul, padding included), in row chunks
            with gathered(head.parameters(), in_forward=True):
                return LinearCrossEntropy.apply(text_states[:, :-1][pairs], head.weight, head.bias,
                                                input_ids[:, 1:][pairs])
        logits = self.adapter.lm_head(text_states[:, :-1]).float()
        target = input_ids[:, 1:].masked_fill(~pairs, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)

    # ----------------------------------------------------------------- losses

    def total_loss(self, prediction: torch.Tensor, aux: dict[str, torch.Tensor], weights: dict[str, float],
                   batch: dict, lm_term: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """L = L1(task) + sum_k lambda_k L1(aux_k) + lambda_lm LM; terms with weight 0 were never computed. With
        ``model.loss.unimodal_labels`` the text / audio / video heads regress to ``label_T`` / ``label_A`` /
        ``label_V``, all others to ``label``."""
        label = batch["label"].float()
        targets = UNIMODAL_TARGETS if self.cfg.loss.unimodal_labels else {}
        terms = {"task": F.l1_loss(prediction.float(), label)}
        terms.update({k: F.l1_loss(p.float(), batch[targets[k]].float() if k in targets else label)
                      for k, p in aux.items()})
        loss = terms["task"] + sum(weights[k] * terms[k] for k in aux)
        if lm_term is not None:
            terms["lm"] = lm_term
            loss = loss + self.cfg.loss.lambda_lm * lm_term
        return loss, {k: v.detach() for k, v in terms.items()}

    def text_input(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return left_align(batch["input_ids"], batch["attention_mask"])

    # ----------------------------------------------------------------- trainer contract

    def gate_values(self) -> dict[str, float]:
        return {f"mm{i}.{k}": v for i, block in self.mm_blocks.items() for k, v in block.gate_values().items()}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter, plus the buffers (BatchNorm statistics) of modules that own one."""
        out = {n: p for n, p in self.named_parameters() if p.requires_grad}
        for name, module in self.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                prefix = f"{name}." if name else ""
                out.update({prefix + b: t for b, t in module.named_buffers(recurse=False) if t is not None})
        return out

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise UserError(f"trainable weights do not fit this model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        self.load_state_dict(state, strict=False)
