"""The frozen prefix: the decoder layers before the first MM block, where the text depends on the transcript alone.

Text never attends to fusion tokens and nothing trainable acts on it before the first MM block, so there:

- **split** (``model.prefix_split``): each layer runs the text without autograd, keeping its keys / values, then the
  fusion tokens, which attend to those (detached) and to their own. Result and gradients are the full sequence's to
  float rounding; training skips the backward of every text position there.
- **cache** (``train.prefix_cache=auto``, not under ZeRO-3, whose ranks must make the same layer calls): where the
  text's path is deterministic (evaluation always; training without text augmentation and without the LM's own
  dropout), each transcript's per-layer keys / values and its
  states after the prefix are kept in CPU memory, keyed by its token ids, and the prefix runs only the fusion
  tokens. A transcript seen for the first time is computed alone (no padding, no batch), so its entry is the same
  number whichever batch brings it: a run resumed with an empty cache trains exactly as the uninterrupted one. Only
  real positions are kept: a batch's padding rows are zeros, which nothing reads (padding keys are masked, padding
  states feed no loss and no prediction).

The decoder layers take these objects as their KV cache: HF attention calls ``update(keys, values, layer_idx)`` and
attends to what it returns.
"""

from __future__ import annotations

import torch


class KeepKV:
    """The text calls' cache: keeps each layer's keys / values."""

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.layers[layer_idx] = keys, values
        return keys, values


class AfterTextKV:
    """The fusion calls' cache: each layer attends to the text's keys / values, then to the fusion tokens' own."""

    def __init__(self, text: KeepKV):
        self.text = text

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        text_keys, text_values = self.text.layers[layer_idx]
        return torch.cat([text_keys, keys], -2), torch.cat([text_values, values], -2)


class PrefixCache:
    """Per transcript (its real token ids): the prefix layers' keys / values and the states after the prefix."""

    def __init__(self):
        self.entries: dict[tuple, tuple[list, torch.Tensor]] = {}
        self.bytes = 0

    @staticmethod
    def keys(input_ids: torch.Tensor, text_valid: torch.Tensor) -> list[tuple]:
        return [tuple(ids[valid].tolist()) for ids, valid in zip(input_ids, text_valid)]

    def lookup(self, keys: list[tuple], like: torch.Tensor, n_layers: int) -> tuple[torch.Tensor, KeepKV]:
        """The batch's text states and keys / values (left-aligned, zeros at padding); every transcript is known."""
        B, T, _ = like.shape
        text, kv = like.new_zeros(like.shape), KeepKV()
        for b, key in enumerate(keys):
            n = len(key)
            text[b, T - n:] = self.entries[key][1].to(like.device)
        for i in range(n_layers):
            first = self.entries[keys[0]][0][i][0]
            k = like.new_zeros((B, first.shape[0], T, first.shape[-1]))
            v = torch.zeros_like(k)
            for b, key in enumerate(keys):
                n = len(key)
                ck, cv = self.entries[key][0][i]
                k[b, :, T - n:], v[b, :, T - n:] = ck.to(like.device), cv.to(like.device)
            kv.layers[i] = k, v
        return text, kv

    @torch.no_grad()
    def fill(self, keys: list[tuple], layers, cache_argument: str, layer_kwargs, text: torch.Tensor,
             mask: torch.Tensor, position_ids: torch.Tensor, n_layers: int) -> None:
        """Compute and keep the transcripts of the batch not known yet, each alone (its real positions only), layer
        by layer (ZeRO-3 gathers each layer once)."""
        T = text.shape[1]
        todo = {key: b for b, key in enumerate(keys) if key not in self.entries}
        rows = {key: slice(T - len(key), T) for key in todo}
        states = {key: text[b:b + 1, rows[key]] for key, b in todo.items()}
        kept = {key: KeepKV() for key in todo}
        for layer in layers[:n_layers]:
            for key, b in todo.items():
                r = rows[key]
                states[key] = layer(states[key], attention_mask=mask[b:b + 1, :, r, r],
                                    **layer_kwargs(states[key], position_ids[b:b + 1, r]), **{cache_argument: kept[key]})
        for key in todo:
            entry = ([tuple(t[0].to("cpu", copy=True) for t in kept[key].layers[i]) for i in range(n_layers)],
                     states[key][0].to("cpu", copy=True))
            self.entries[key] = entry
            self.bytes += entry[1].nbytes + sum(t.nbytes for pair in entry[0] for t in pair)


def run_prefix(layers, cache_argument: str, layer_kwargs, h: torch.Tensor, mask: torch.Tensor,
               position_ids: torch.Tensor, T: int, n_layers: int, cache: PrefixCache | None,
               keys: list[tuple] | None) -> torch.Tensor:
    """States after decoder layers ``0..n_layers-1`` of [text | fusion] (``h``: their input), split, and through
    ``cache`` when given. ``layer_kwargs(states, position_ids)``: the backbone's per-forward layer arguments."""
    text, fusion = h[:, :T], h[:, T:]
    if cache is not None:
        cache.fill(keys, layers, cache_argument, layer_kwargs, text, mask, position_ids, n_layers)
        text, text_kv = cache.lookup(keys, text, n_layers)
    else:
        text_kv = KeepKV()
        text_kwargs = {**layer_kwargs(text, position_ids[:, :T]), cache_argument: text_kv}
    fusion_kwargs = {**layer_kwargs(fusion, position_ids[:, T:]), cache_argument: AfterTextKV(text_kv)}
    for layer in layers[:n_layers]:
        if cache is None:  # the layer's two calls back to back: ZeRO-3 gathers its weights once
            with torch.no_grad():
                text = layer(text, attention_mask=mask[:, :, :T, :T], **text_kwargs)
        fusion = layer(fusion, attention_mask=mask[:, :, T:, :], **fusion_kwargs)
    return torch.cat([text, fusion], 1)
