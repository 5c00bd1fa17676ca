"""``fusion-dist make-backbone``: a local HF model directory of a real architecture's shape (presets), random
weights and the project's own small tokenizer, for tests, demos and benchmarks where model hubs are unreachable."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fusion_dist.errors import UserError

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
