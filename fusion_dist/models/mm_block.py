"""The MM block (DeepMLF paper eqs. 8-11): gated cross-attention, then a gated copy of the layer's FFW.

    X_t, X_f = split(H)                                   (8)
    X_f <- X_f + g(a1) * GCA(Z, Norm(X_f))                (9)
    H   <- [X_t || X_f]                                   (10)
    H   <- H + g(a2) * FFW(Norm(H))                       (11)

g is the sigmoid (paper), tanh (Flamingo: closed at init 0) or the constant 1. The FFW is a copy of the
decoder layer's own MLP (same weights, biases and activation, so at init it computes the LM's function);
with LoRA the copy is frozen and peft adapters on it train instead. Norms are fresh, of the LM's kind.

DMPF runs one gated cross-attention per token group ("audio", "video", "av"), each reading its own
encoder's sequence, before the shared gated FFW; DeepMLF is the one-stream case ("av").

Parameter count: the cross-attention projections are bias-free (as in open_flamingo's gated
cross-attention). With d_av = 30 this reproduces the paper's "MM params" (Tables 6-7): 5.95M per GPT-2
base block, 63.3M for 6 medium blocks, 82.4M for 5 large blocks (see tests/test_models_params.py).
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F
from torch import nn

from fusion_dist.config import ConfigError, ModelConfig
from fusion_dist.models.backbone import LMAdapter, gathered

GATINGS = ("sigmoid", "tanh", "none")
CROSS_ATTN_SCALES = ("head", "model")


class Gate(nn.Module):
    """A learnable scalar a squashed by the gating function; ``none`` is the constant 1 (no parameter)."""

    def __init__(self, kind: str, init: float):
        super().__init__()
        if kind not in GATINGS:
            raise ConfigError(f"model.gating: unknown gating '{kind}'; choose {', '.join(GATINGS)}")
        self.kind = kind
        # shape (1,), not 0-d: DeepSpeed broadcasts params as byte views, which 0-d tensors cannot give
        self.a = nn.Parameter(torch.full((1,), float(init))) if kind != "none" else None

    def forward(self) -> torch.Tensor | float:
        if self.kind == "sigmoid":
            return torch.sigmoid(self.a)
        if self.kind == "tanh":
            return torch.tanh(self.a)
        return 1.0

    def value(self) -> float:
        if self.a is None:
            return 1.0
        return float("nan") if self.a.is_meta else float(self().detach())


class CrossAttention(nn.Module):
    """Multi-head attention from LM-width queries to a d_ctx-wide context sequence (bias-free projections)."""

    def __init__(self, d: int, d_ctx: int, n_heads: int, dropout: float, scale: str = "head"):
        super().__init__()
        if scale not in CROSS_ATTN_SCALES:
            raise ConfigError(f"model.cross_attn_scale: unknown '{scale}'; choose {', '.join(CROSS_ATTN_SCALES)}")
        self.n_heads = n_heads
        # "model": the reference's 1/sqrt(d) over the full LM width, n_heads^0.5 times softer than 1/sqrt(d_head)
        self.scale = d ** -0.5 if scale == "model" else None
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d_ctx, 2 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        B, N, d = x.shape
        heads = lambda t: t.view(B, t.shape[1], self.n_heads, d // self.n_heads).transpose(1, 2)  # noqa: E731
        q = heads(self.q(x))
        k, v = (heads(t) for t in self.kv(ctx).chunk(2, -1))
        # A sample with no real AV step attends to its (zero) steps instead of to nothing (NaN); with every step
        # real (the normal case) there is no mask at all, so SDPA takes its unmasked path.
        allowed = (ctx_mask | ~ctx_mask.any(1, keepdim=True))[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if allowed.all() else allowed,
                                             dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        return self.out(out.transpose(1, 2).reshape(B, N, d))


class GatedCrossAttention(nn.Module):
    """x <- x + g(a) * CrossAttn(Norm(x), context)  (eq. 9)."""

    def __init__(self, adapter: LMAdapter, d_ctx: int, cfg: ModelConfig):
        super().__init__()
        self.norm = adapter.new_norm()
        self.attn = CrossAttention(adapter.hidden_size, d_ctx, cfg.cross_attn_heads, cfg.dropout, cfg.cross_attn_scale)
        self.gate = Gate(cfg.gating, cfg.gate_init)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        return x + self.gate() * self.attn(self.norm(x), ctx, ctx_mask)


def copy_mlp(mlp: nn.Module) -> nn.Module:
    """A trainable copy of a frozen (possibly ZeRO-3 partitioned) LM MLP with fresh, unshared parameters."""
    with gathered(mlp.parameters()):
        ffw = copy.deepcopy(mlp)
        for module in ffw.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = nn.Parameter(p.detach().clone())
    return ffw


def add_lora(ffw: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Freeze the FFW copy and inject peft LoRA adapters into the configured target modules."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear as LoraLinear

    names = {n.rsplit(".", 1)[-1] for n, _ in ffw.named_modules() if n}
    targets = [t for t in cfg.lora.target_modules if t in names]
    if not targets:
        raise ConfigError(
            f"model.lora.target_modules: {list(cfg.lora.target_modules)} match no module of the FFW copy "
            f"(it has: {', '.join(sorted(names))})"
        )
    for p in ffw.parameters():
        p.requires_grad_(False)
    conv1d = any(type(m).__name__ == "Conv1D" for m in ffw.modules())  # GPT-2 stores weights transposed
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
                      fan_in_fan_out=conv1d)
    ffw = inject_adapter_in_model(lora, ffw)
    if cfg.fused_ops:
        for module in ffw.modules():
            if type(module) is LoraLinear:
                module.forward = types.MethodType(lora_addmm_forward, module)
    return ffw


def lora_addmm_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA linear, ``base(x) + lora_B(lora_A(dropout(x))) * scaling``, with the scaling as addmm's alpha and
    the sum as its beta: the adapter's product lands in the base output in one pass instead of three over the
    (tokens x out) activations (scale, add; the scale again in backward). Same dropout draws, same function."""
    A, B = self.lora_A["default"], self.lora_B["default"]
    # peft's own path under ZeRO-3 (which gathers B's weight only when lora_B itself runs) and across dtypes
    if hasattr(B.weight, "ds_id") or not x.dtype == A.weight.dtype == B.weight.dtype:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    z = A(self.lora_dropout["default"](x))
    out = torch.addmm(result.reshape(-1, result.shape[-1]), z.reshape(-1, z.shape[-1]), B.weight.t(),
                      alpha=self.scaling["default"])
    return out.view(result.shape)


class MMBlock(nn.Module):
    """One MM block after decoder layer ``layer``: a gated cross-attention per stream, then the gated FFW."""

    def __init__(self, adapter: LMAdapter, layer: int, streams: dict[str, int], cfg: ModelConfig):
        super().__init__()
        self.cross_attn = nn.ModuleDict({s: GatedCrossAttention(adapter, d_ctx, cfg) for s, d_ctx in streams.items()})
        self.ffw = None
        if cfg.ffw:
            self.ffw_norm = adapter.new_norm()
            ffw = copy_mlp(adapter.mlp(layer))
            self.ffw = add_lora(ffw, cfg) if cfg.lora.enabled else ffw
            self.ffw_gate = Gate(cfg.gating, cfg.gate_init)

    def forward(self, h: torch.Tensor, queries: dict[str, slice], contexts: dict[str, tuple]) -> torch.Tensor:
        """``queries[s]``: the positions of h that cross-attend to ``contexts[s] = (states, mask)``."""
        for s, xattn in self.cross_attn.items():
            span = queries[s]
            updated = xattn(h[:, span], *contexts[s])
            h = torch.cat([h[:, : span.start], updated, h[:, span.stop :]], 1)
        if self.ffw is not None:
            h = h + self.ffw_gate() * self.ffw(self.ffw_norm(h))
        return h

    def gate_values(self) -> dict[str, float]:
        values = {f"attn_{s}": x.gate.value() for s, x in self.cross_attn.items()}
        if self.ffw is not None:
            values["ffw"] = self.ffw_gate.value()
        return values
