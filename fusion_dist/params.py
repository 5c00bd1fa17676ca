"""``fusion-dist params CONFIG [key=value ...] [--json]``: the trainable / frozen parameter table.

Built on the meta device from the backbone's config alone (a ``make-backbone --config-only`` directory is
enough), so it answers in seconds for any backbone size. Feature dims come from the data manifest at
``data.root``, or from ``--audio-dim/--vision-dim``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from fusion_dist.config import Config, load_config
from fusion_dist.errors import UserError

if TYPE_CHECKING:
    from torch import nn


def _feature_dims(root: str, audio_dim: int | None, vision_dim: int | None) -> tuple[int, int]:
    if audio_dim is not None and vision_dim is not None:
        return audio_dim, vision_dim
    manifest = Path(root) / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"data.root: no manifest.json at '{root}'; give --audio-dim and --vision-dim instead")
    feats = json.loads(manifest.read_text())["features"]
    return audio_dim or feats["audio"]["dim"], vision_dim or feats["vision"]["dim"]


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every meta-device command takes: CONFIG, overrides and the feature dims."""
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--audio-dim", type=int, help="audio feature dim (default: from the manifest at data.root)")
    parser.add_argument("--vision-dim", type=int, help="vision feature dim (default: from the manifest at data.root)")


def meta_model(args: argparse.Namespace) -> tuple[Config, nn.Module]:
    """The resolved config and the model built on the meta device (shapes only, no weights)."""
    from fusion_dist.models import build_model

    cfg = load_config(args.config, args.overrides)
    audio_dim, vision_dim = _feature_dims(cfg.data.root, args.audio_dim, args.vision_dim)
    return cfg, build_model(cfg.model, audio_dim, vision_dim, meta=True)


def main(argv: list[str]) -> int:
    from fusion_dist.models import count_parameters

    parser = argparse.ArgumentParser(prog="fusion-dist params", description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_intermixed_args(argv)
    cfg, model = meta_model(args)
    counts = count_parameters(model)
    if args.json:
        print(json.dumps(counts))
        return 0
    rows = [(f"MM block after layer {i}", n) for i, n in counts["per_block"].items()]
    rows += [(f"trainable: {name}", n) for name, n in counts["components"].items()]
    rows += [("trainable (total)", counts["trainable"]), ("frozen", counts["frozen"]),
             ("MM blocks (total)", counts["mm_blocks"])]
    width = max(len(r[0]) for r in rows)
    print(f"{cfg.model.family} on {cfg.model.backbone}")
    for name, n in rows:
        print(f"  {name:<{width}}  {n:>14,}  ({n / 1e6:.2f}M)")
    return 0
