"""The frozen language model: loading, and one adapter over GPT-2 / Llama / Qwen2.

Any ``AutoModelForCausalLM`` is loaded with ``from_pretrained`` (a local directory or a hub name) and
frozen entirely. ``LMAdapter`` finds the pieces the fusion models drive layer by layer: token and
(GPT-2) position embeddings, the decoder layers, each layer's MLP, the final norm and its kind, the
rotary embedding (Llama/Qwen2) and the LM head. Nothing is copied per architecture.

The attention kernel is chosen here and only here: ``flash_attention_2`` when flash-attn is installed
and a CUDA device of compute capability >= 8 is present, else ``sdpa``, else ``eager``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from fusion_dist.errors import UserError

log = logging.getLogger(__name__)

ATTN_KERNELS = ("flash_attention_2", "sdpa", "eager")


# --------------------------------------------------------------------------- attention kernel


def choose_attn_implementation(requested: str = "auto", device: str | torch.device | None = None) -> str:
    """``auto`` -> flash_attention_2 (flash-attn installed, CUDA, sm80+) -> sdpa -> eager; a name forces it."""
    if requested not in ("auto", *ATTN_KERNELS):
        raise UserError(
            f"model.attn_implementation: unknown kernel '{requested}'; choose auto, {', '.join(ATTN_KERNELS)}"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    flash_ok = (
        device.type == "cuda"
        and importlib.util.find_spec("flash_attn") is not None
        and torch.cuda.get_device_capability(device)[0] >= 8
    )
    if requested == "flash_attention_2" and not flash_ok:
        raise UserError("model.attn_implementation: flash_attention_2 needs flash-attn and a CUDA GPU (sm80+)")
    if requested != "auto":
        return requested
    if flash_ok:
        return "flash_attention_2"
    if hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return "sdpa"
    return "eager"


# --------------------------------------------------------------------------- ZeRO-3 gathering


def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = None, in_forward: bool = False):
    """Context in which ZeRO-3 partitioned ``params`` are whole (a no-op when nothing is partitioned); with
    ``modifier_rank``, what that rank writes into them is kept (broadcast and re-partitioned on exit). ``in_forward``
    (a read inside the model's forward): a parameter already whole is read as it is, as it may be one a running
    module holds (a head tied to the embedding), which the context's exit must not partition under it."""
    params = list(params)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # only needed when the model is partitioned
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if in_forward:
            params = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
        if params:
            return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- loading


def hub_name(name_or_dir: str) -> tuple[str, str | None]:
    """``org/name@revision`` (a branch, tag or commit) -> (``org/name``, revision); anything else -> (it, None)."""
    if "@" in name_or_dir and not Path(name_or_dir).exists():
        repo, revision = name_or_dir.split("@", 1)
        return repo, revision
    return name_or_dir, None


def resolved_revision(name: str) -> str | None:
    """The commit a hub name (at its ``@revision``, else the default branch) is at: from the HF cache, where a
    run loaded it, else from the hub; None when neither answers."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    repo, revision = hub_name(name)
    cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached).parent.name  # .../snapshots/<commit>/config.json
    try:
        return HfApi().model_info(repo, revision=revision, timeout=10).sha
    except Exception:  # offline, unknown repo: the caller records the name alone
        return None


def _check_local(name_or_dir: str) -> None:
    """A local model directory, or a hub name that is cached or whose hub answers: found in seconds, not
    after the hub client's retries."""
    repo, revision = hub_name(name_or_dir)
    path = Path(repo)
    looks_local = (path.exists() or repo.startswith((".", "/", "~")) or repo.count("/") > 1
                   or (path.parent != Path(".") and path.parent.is_dir()))
    if looks_local:
        if not (path / "config.json").is_file():
            raise UserError(
                f"model.backbone: '{name_or_dir}' is not a model directory (no config.json); "
                "create one with 'fusion-dist make-backbone' or give a hub name"
            )
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str):
        return
    hint = "give a local model directory (e.g. ./backbones/NAME) or download the model into the HF cache first"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"model.backbone: '{name_or_dir}' is no local directory and not in the HF cache, and "
                        f"HF_HUB_OFFLINE is set; {hint}")
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # the hub is reached through a proxy: let the client try
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        raise UserError(f"model.backbone: '{name_or_dir}' is no local directory and the hub ({host}) cannot be "
                        f"reached ({exc}); {hint}") from None


def load_backbone_config(name_or_dir: str):
    """The backbone's ``PretrainedConfig`` alone (no weights), for meta-device builds."""
    from transformers import AutoConfig

    _check_local(name_or_dir)
    repo, revision = hub_name(name_or_dir)
    try:
        return AutoConfig.from_pretrained(repo, revision=revision)
    except OSError as exc:
        raise UserError(f"model.backbone: cannot load the config of '{name_or_dir}': {exc}") from exc


def load_tokenizer(name_or_dir: str):
    """The backbone's tokenizer, with a pad token (EOS when the model has none, as for GPT-2)."""
    from transformers import AutoTokenizer

    repo, revision = hub_name(name_or_dir)
    try:
        tok = AutoTokenizer.from_pretrained(repo, revision=revision)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.backbone: cannot load the tokenizer of '{name_or_dir}': {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_backbone(name_or_dir: str, attn_implementation: str = "auto", dtype: Optional[torch.dtype] = None):
    """Frozen ``AutoModelForCausalLM`` + tokenizer + the attention kernel it runs: ``(lm, tokenizer, kernel)``."""
    from transformers import AutoModelForCausalLM

    _check_local(name_or_dir)
    kernel = choose_attn_implementation(attn_implementation)
    repo, revision = hub_name(name_or_dir)
    try:
        lm = AutoModelForCausalLM.from_pretrained(repo, revision=revision, attn_implementation=kernel, dtype=dtype)
    except OSError as exc:
        raise UserError(f"model.backbone: cannot load '{name_or_dir}': {exc}") from exc
    freeze(lm)
    log.info("backbone %s loaded with attention kernel %s", name_or_dir, kernel)
    return lm, load_tokenizer(name_or_dir), kernel


def backbone_on_meta(name_or_dir: str, kernel: str = "sdpa"):
    """The backbone's architecture on the meta device, from its config alone (parameter counting)."""
    from transformers import AutoModelForCausalLM

    config = load_backbone_config(name_or_dir)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=kernel)
    return freeze(lm)


def fuse_activations(lm: nn.Module) -> int:
    """Swap GPT-2's ``gelu_new`` (transformers computes it as six element-wise ops) for PyTorch's fused tanh GELU,
    the same function (they differ by float rounding), about 5x faster forward and backward. Returns how many
    modules were swapped; the MM blocks' FFW copies, made after this, inherit it."""
    from transformers.activations import NewGELUActivation

    swapped = 0
    for module in lm.modules():
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def lm_dropout_rate(lm: nn.Module) -> float:
    """The largest dropout the backbone runs in train mode (its dropout modules, and attention dropout that
    Llama-family attention applies from its config)."""
    rates = [m.p for m in lm.modules() if isinstance(m, nn.Dropout)]
    rates += [float(getattr(lm.config, k, 0.0) or 0.0) for k in ("attention_dropout", "hidden_dropout")]
    return max(rates, default=0.0)


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


# --------------------------------------------------------------------------- the adapter


class LMAdapter:
    """Uniform access to a decoder LM's parts (GPT-2, Llama, Qwen2 and look-alikes)."""

    def __init__(self, lm: nn.Module):
        self.lm = lm
        self.config = lm.config
        base = lm.base_model
        self.layers: nn.ModuleList = _first_attr(base, ("h", "layers"), "decoder layers")
        self.final_norm: nn.Module = _first_attr(base, ("ln_f", "norm"), "final norm")
        self.embed_tokens: nn.Embedding = lm.get_input_embeddings()
        self.embed_positions: Optional[nn.Embedding] = getattr(base, "wpe", None)  # GPT-2 learned positions
        self.embed_dropout: Optional[nn.Module] = getattr(base, "drop", None)
        self.rotary_emb: Optional[nn.Module] = getattr(base, "rotary_emb", None)  # Llama / Qwen2
        self.lm_head: nn.Module = lm.get_output_embeddings()
        self.hidden_size: int = self.config.hidden_size
        self.num_layers: int = len(self.layers)
        self.norm_kind = "layernorm" if isinstance(self.final_norm, nn.LayerNorm) else "rmsnorm"
        # the name under which a decoder layer takes its KV cache (it differs across transformers versions)
        accepted = inspect.signature(self.layers[0].forward).parameters
        self.cache_argument = next((n for n in ("cache", "past_key_values", "past_key_value", "layer_past")
                                    if n in accepted), None)

    def mlp(self, index: int) -> nn.Module:
        return self.layers[index].mlp

    def keep_keys_values(self, index: int, hidden: torch.Tensor, mask: torch.Tensor, kept, **kwargs) -> None:
        """Layer ``index``'s keys / values of ``hidden`` into the cache ``kept``: its input norm and self-attention
        only, not its MLP (the costliest part), for positions whose own output nothing reads."""
        layer = self.layers[index]
        norm = _first_attr(layer, ("input_layernorm", "ln_1"), "attention input norm")
        attention = _first_attr(layer, ("self_attn", "attn"), "self-attention")
        attention(hidden_states=norm(hidden), attention_mask=mask, **{self.cache_argument: kept}, **kwargs)

    def new_norm(self) -> nn.Module:
        """A freshly initialised norm of the backbone's own kind and epsilon."""
        norm = self.final_norm
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")
        return type(norm)(self.hidden_size, eps=eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def layer_kwargs(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """Per-forward arguments every decoder layer takes besides the hidden states and the mask."""
        if self.rotary_emb is None:
            return {}
        return {"position_ids": position_ids, "position_embeddings": self.rotary_emb(hidden, position_ids)}

    def add_positions(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """GPT-2 adds learned position embeddings to the input; rotary models do it inside attention."""
        if self.embed_positions is not None:
            hidden = hidden + self.embed_positions(position_ids)
        if self.embed_dropout is not None:
            hidden = self.embed_dropout(hidden)
        return hidden


def _first_attr(module: nn.Module, names: tuple[str, ...], what: str):
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    raise UserError(
        f"model.backbone: unsupported architecture {type(module).__name__}: no {what} (looked for {names})"
    )
