"""The frozen language model: loading, one adapter over GPT-2 / Llama / Qwen2, and ``make-backbone``.

Any ``AutoModelForCausalLM`` is loaded with ``from_pretrained`` (a local directory or a hub name) and
frozen entirely. ``LMAdapter`` finds the pieces the fusion models drive layer by layer: token and
(GPT-2) position embeddings, the decoder layers, each layer's MLP, the final norm and its kind, the
rotary embedding (Llama/Qwen2) and the LM head. Nothing is copied per architecture.

The attention kernel is chosen here and only here: ``flash_attention_2`` when flash-attn is installed
and a CUDA device of compute capability >= 8 is present, else ``sdpa``, else ``eager``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
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


def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = None):
    """Context in which ZeRO-3 partitioned ``params`` are whole (a no-op when nothing is partitioned); with
    ``modifier_rank``, what that rank writes into them is kept (broadcast and re-partitioned on exit)."""
    params = list(params)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # only needed when the model is partitioned

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- loading


def _check_local(name_or_dir: str) -> None:
    """A local model directory, or a hub name that is cached or whose hub answers: found in seconds, not
    after the hub client's retries."""
    path = Path(name_or_dir)
    looks_local = (path.exists() or name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") > 1
                   or (path.parent != Path(".") and path.parent.is_dir()))
    if looks_local:
        if not (path / "config.json").is_file():
            raise UserError(
                f"model.backbone: '{name_or_dir}' is not a model directory (no config.json); "
                "create one with 'fusion-dist make-backbone' or give a hub name"
            )
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_dir, "config.json"), str):
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
    try:
        return AutoConfig.from_pretrained(name_or_dir)
    except OSError as exc:
        raise UserError(f"model.backbone: cannot load the config of '{name_or_dir}': {exc}") from exc


def load_tokenizer(name_or_dir: str):
    """The backbone's tokenizer, with a pad token (EOS when the model has none, as for GPT-2)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_dir)
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
    try:
        lm = AutoModelForCausalLM.from_pretrained(name_or_dir, attn_implementation=kernel, dtype=dtype)
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


# --------------------------------------------------------------------------- make-backbone

PRESETS: dict[str, dict[str, dict]] = {
    "gpt2": {
        "tiny": dict(n_layer=4, n_embd=64, n_head=4, n_positions=256),
        "gpt2-base": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
        "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257),
        "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, n_positions=1024, vocab_size=50257),
    },
    "llama": {
        "tiny": dict(
            num_hidden_layers=4, hidden_size=64, intermediate_size=176, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        ),
        "smollm2-1.7b": dict(
            num_hidden_layers=24, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=8192, rope_theta=130000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True, vocab_size=49152,
        ),
        # Llama-3.1-8B's shape (8.03B parameters); its long-context RoPE scaling is left out (text here is short)
        "llama-3.1-8b": dict(
            num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False, vocab_size=128256,
        ),
    },
    "mistral": {
        "mistral-7b": dict(  # Mistral-7B-v0.3 (7.25B parameters)
            num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False, vocab_size=32768, sliding_window=None,
        ),
    },
    "qwen2": {
        "tiny": dict(
            num_hidden_layers=4, hidden_size=64, intermediate_size=176, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        ),
        "qwen2-0.5b": dict(
            num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
            num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=True, vocab_size=151936,
        ),
        "qwen2.5-7b": dict(  # Qwen2.5-7B (7.62B parameters)
            num_hidden_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
            num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False, vocab_size=152064,
        ),
    },
}

TOKENIZER_VOCAB = 768
EOS = "<|endoftext|>"
PAD = "<pad>"

# Enough English (and a few Chinese characters, for SIMS-shaped demos) to learn a small byte-level BPE.
_CORPUS = """
the movie was great and i really loved the acting and the story
this film is terrible boring and far too long i would not watch it again
honestly it was okay not good not bad just an average experience
the music was beautiful but the plot made no sense at all
i think the director did a wonderful job with a difficult subject
what a waste of time the characters were flat and the jokes fell flat
she smiled and said that the product works exactly as described
he sounded angry about the price but happy with the quality
we were surprised by how much we enjoyed the second half
the audio and the video of this review show a very positive speaker
negative neutral positive sentiment opinion emotion speaker voice face
um well you know i guess it is kind of fine i mean sort of
absolutely fantastic amazing brilliant excellent superb outstanding
awful horrible dreadful disappointing mediocre weak poor bad
这部电影很好看 我很喜欢 演员的表演非常精彩
这个产品太差了 我不推荐 服务也不好
还可以 一般般 没什么特别的
""".strip().splitlines()


def build_tokenizer():
    """A small byte-level BPE trained on the built-in corpus, wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def make_backbone(arch: str, preset: str, out: str | Path, config_only: bool = False, seed: int = 0) -> Path:
    """Write a local HF model directory (config, tokenizer, random weights unless ``config_only``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in PRESETS:
        raise UserError(f"--arch: unknown architecture '{arch}'; choose {', '.join(PRESETS)}")
    if preset not in PRESETS[arch]:
        raise UserError(f"--preset: '{preset}' is not a {arch} preset; choose {', '.join(PRESETS[arch])}")
    tokenizer = build_tokenizer()
    kwargs = dict(PRESETS[arch][preset])
    kwargs.setdefault("vocab_size", len(tokenizer))
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = AutoConfig.for_model(arch, **kwargs, **ids)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if config_only:
        config.save_pretrained(out)
    else:
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main_make_backbone(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fusion-dist make-backbone",
        description="Write a randomly initialised HF causal LM (real architecture hyper-parameters) with a tokenizer.",
    )
    parser.add_argument("--arch", required=True, choices=sorted(PRESETS))
    parser.add_argument("--preset", required=True, help="; ".join(f"{a}: {', '.join(p)}" for a, p in PRESETS.items()))
    parser.add_argument("--out", required=True, help="output directory (loadable with from_pretrained)")
    parser.add_argument("--config-only", action="store_true", help="config + tokenizer, no weights (for 'params')")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_backbone(args.arch, args.preset, args.out, args.config_only, args.seed)
    config = json.loads((out / "config.json").read_text())
    what = "config + tokenizer" if args.config_only else "config + tokenizer + random weights"
    print(f"wrote {args.arch} '{args.preset}' ({what}) to {out}; vocab {config['vocab_size']}")
    return 0
