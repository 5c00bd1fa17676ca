"""The frozen prefix: the decoder layers up to the first MM block, where the text depends on the transcript alone.

Text never attends to fusion tokens and nothing trainable acts on it before the first MM block (the block after
layer ``l`` first changes what layer ``l`` wrote; without MM blocks nothing ever does), so there:

- **split** (``model.prefix_split``): each layer runs the text without autograd, keeping its keys / values, then the
  fusion tokens, which attend to those (detached) and to their own. Result and gradients are the full sequence's to
  float rounding; training skips the backward of every text position there.
- **cache** (``train.prefix_cache``, built by ``fusion_dist/train/prefix_cache.py``): where the text's path is
  deterministic (evaluation always; training without text augmentation and without the LM's own dropout), every
  transcript's per-layer keys / values and its states after the prefix are computed once, before training, and
  the prefix runs only the fusion tokens. A transcript is a *row block*: one row per real token of ``width`` values,
  ``[layer 0 keys | layer 0 values | layer 1 keys | ... | states]``, in the model's dtype. Transcripts of one length
  are computed together in fixed chunks (no padding), so an entry is the same number on any number of ranks and in
  any run that rebuilds it. Rows live in CPU memory or in files mapped from disk; a batch is assembled with one
  gather per file, left-aligned, zeros at padding (nothing reads them: padding keys are masked, padding states feed
  no loss and no prediction).

The decoder layers take these objects as their KV cache: HF attention calls ``update(keys, values, layer_idx)`` and
attends to what it returns.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CHUNK = 32  # transcripts of one length computed together (a fixed size: entries do not depend on the world size)


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


@dataclass(frozen=True)
class RowLayout:
    """What a row holds: ``layers`` x (keys, values) of ``kv_heads`` x ``head_dim``, then ``hidden`` states."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    dtype: str

    @property
    def width(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim + self.hidden

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def rows(self, kept: KeepKV, states: torch.Tensor) -> torch.Tensor:
        """(c, n, width) rows of ``c`` transcripts of ``n`` tokens: their kept keys / values and states."""
        c, n, _ = states.shape
        parts = [t.transpose(1, 2).reshape(c, n, -1) for i in range(self.layers) for t in kept.layers[i]]
        return torch.cat([*parts, states], -1)

    @classmethod
    def of(cls, kept: KeepKV, states: torch.Tensor) -> RowLayout:
        keys = kept.layers[0][0]  # (c, kv_heads, n, head_dim)
        return cls(len(kept.layers), keys.shape[1], keys.shape[3], states.shape[-1], str(states.dtype).split(".")[-1])


def chunks(keys) -> list[list[tuple]]:
    """The distinct transcripts in a fixed order (by length, then ids), cut into chunks of one length."""
    out: list[list[tuple]] = []
    for key in sorted(set(keys), key=lambda k: (len(k), k)):
        if out and len(out[-1][0]) == len(key) and len(out[-1]) < CHUNK:
            out[-1].append(key)
        else:
            out.append([key])
    return out


class PrefixCache:
    """Row blocks of transcripts (keyed by their real token ids) in ``parts`` (tensors or mapped files)."""

    def __init__(self, layout: RowLayout, parts: list[torch.Tensor], index: dict[tuple, tuple[int, int]]):
        self.layout, self.parts, self.index = layout, parts, index

    @property
    def bytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def __len__(self) -> int:
        return len(self.index)

    @staticmethod
    def keys(input_ids: torch.Tensor, text_valid: torch.Tensor) -> list[tuple]:
        return [tuple(ids[valid].tolist()) for ids, valid in zip(input_ids, text_valid)]

    def has(self, keys: list[tuple]) -> bool:
        return all(k in self.index for k in keys)

    @classmethod
    def compute(cls, rows_of, work: list[list[tuple]], progress=None) -> PrefixCache:
        """Every chunk of ``work`` (not empty) computed here, into CPU memory. ``rows_of(ids) -> (rows, layout)``;
        ``progress``: a ``fusion_dist.progress.Progress`` over the transcripts."""
        tensors, index, start = [], {}, 0
        for chunk in work:
            rows, layout = rows_of(torch.tensor(chunk))
            tensors.append(rows.reshape(-1, rows.shape[-1]).cpu())
            for key in chunk:
                index[key] = (0, start)
                start += len(key)
            if progress:
                progress.update(len(chunk), sum(map(len, chunk)))
        return cls(layout, [torch.cat(tensors)], index)

    # ------------------------------------------------------------------ the on-disk store

    @staticmethod
    def write_part(directory: Path, part: int, rows_of, work: list[list[tuple]], progress=None) -> None:
        """Compute ``work`` and write it as ``part-<part>.bin`` (raw rows) + ``part-<part>.json`` (its index)."""
        index, start = [], 0
        with (directory / f"part-{part}.bin").open("wb") as fh:
            for chunk in work:
                rows, _ = rows_of(torch.tensor(chunk))
                fh.write(rows.cpu().contiguous().view(torch.uint8).numpy().tobytes())
                for key in chunk:
                    index.append([list(key), start])
                    start += len(key)
                if progress:
                    progress.update(len(chunk), sum(map(len, chunk)))
        (directory / f"part-{part}.json").write_text(json.dumps({"rows": start, "index": index}))

    @staticmethod
    def write_meta(directory: Path, layout: RowLayout, parts: int, identity: dict) -> None:
        (directory / "meta.json").write_text(json.dumps({"layout": asdict(layout), "parts": parts,
                                                          "identity": identity}, indent=1))

    @staticmethod
    def identity_of(directory: Path) -> dict | None:
        """What a store was computed from, or None when it is missing or unfinished."""
        meta = directory / "meta.json"
        return json.loads(meta.read_text())["identity"] if meta.is_file() else None

    @classmethod
    def open(cls, directory: Path) -> PrefixCache:
        """A finished store, its files mapped (read-only pages shared by every process of the node)."""
        meta = json.loads((directory / "meta.json").read_text())
        layout = RowLayout(**meta["layout"])
        parts, index = [], {}
        for p in range(meta["parts"]):
            part = json.loads((directory / f"part-{p}.json").read_text())
            if not part["rows"]:
                parts.append(torch.empty(0, layout.width, dtype=layout.torch_dtype))
                continue
            parts.append(torch.from_file(str(directory / f"part-{p}.bin"), shared=False,
                                         size=part["rows"] * layout.width, dtype=layout.torch_dtype)
                         .view(-1, layout.width))
            index.update({tuple(key): (p, start) for key, start in part["index"]})
        return cls(layout, parts, index)

    # ------------------------------------------------------------------ a batch

    def lookup(self, keys: list[tuple], like: torch.Tensor) -> tuple[torch.Tensor, KeepKV]:
        """The batch's text states and keys / values (left-aligned, zeros at padding); every transcript is known."""
        B, T, _ = like.shape
        lay = self.layout
        src: dict[int, list[torch.Tensor]] = {}
        dst: dict[int, list[torch.Tensor]] = {}
        for b, key in enumerate(keys):
            part, start = self.index[key]
            src.setdefault(part, []).append(torch.arange(start, start + len(key)))
            dst.setdefault(part, []).append(torch.arange((b + 1) * T - len(key), (b + 1) * T))
        out = like.new_zeros(B * T, lay.width)
        for part, rows in src.items():
            out[torch.cat(dst[part]).to(like.device)] = self.parts[part][torch.cat(rows)].to(like.device)
        out = out.view(B, T, lay.width)
        kv, per = KeepKV(), lay.kv_heads * lay.head_dim
        for i in range(lay.layers):
            k, v = (out[..., (2 * i + j) * per:(2 * i + j + 1) * per].view(B, T, lay.kv_heads, lay.head_dim)
                    .transpose(1, 2) for j in (0, 1))
            kv.layers[i] = k, v
        return out[..., lay.width - lay.hidden:], kv


def run_prefix(layers, cache_argument: str, layer_kwargs, h: torch.Tensor, mask: torch.Tensor,
               position_ids: torch.Tensor, T: int, n_layers: int, cache: PrefixCache | None,
               keys: list[tuple] | None) -> torch.Tensor:
    """States after decoder layers ``0..n_layers-1`` of [text | fusion] (``h``: their input), split, and through
    ``cache`` when given. ``layer_kwargs(states, position_ids)``: the backbone's per-forward layer arguments."""
    text, fusion = h[:, :T], h[:, T:]
    if cache is not None:
        text, text_kv = cache.lookup(keys, text)
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
