"""Exports: the trainable weights of a run + its resolved config + a reference to the frozen backbone,
and the way back (``load_export``: backbone + export -> the trained model) used by ``predict`` and serving.

An export directory holds:

- ``model.safetensors``: the trainable weights (fusion tokens, MM blocks or their LoRA adapters,
  heads) and the AV encoder(s), also when they were kept frozen (``pretrained+frozen``), so the
  export alone rebuilds the model. Never the backbone.
- ``config.yaml``: the resolved run config; ``export.json``: stage, feature dims, metric set and
  the backbone reference: a hub name, or for a local directory its absolute path and a fingerprint of its
  files. The fingerprint is the identity: the backbone loads from any directory that has it (``locate_backbone``),
  and a different backbone at the recorded path is refused.
- ``backbone/`` (optional, ``fusion-dist register --bundle-backbone``): a copy of the backbone, used first.
- Stage 1 (``pretrain-av``) exports also hold ``av_encoder.safetensors`` in the format
  ``model.av.checkpoint`` of stage 2 reads.

Commands::

    fusion-dist export RUN_DIR OUT [--seed S]        # best checkpoint of seed S (default: best seed)
    fusion-dist predict EXPORT_DIR DATA [--split test] [--out FILE.csv]
        DATA: a shard root (with --split), or a .jsonl/.csv of id, text, audio (x.npy), vision (y.npy)[, label]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fusion_dist.config import PRETRAIN_AV, TRAIN, Config, from_yaml, to_yaml
from fusion_dist.data import feature_dims, metric_set, read_manifest
from fusion_dist.errors import UserError
from fusion_dist.rundir import RunDir

WEIGHTS = "model.safetensors"
META = "export.json"
BUNDLED = "backbone"  # an export's own copy of its backbone
SEARCH_ENV = "FUSION_DIST_BACKBONES"  # directories (':'-separated) searched for a backbone by fingerprint
CONFIG = "config.yaml"


# ----------------------------------------------------------------------------- backbone reference


def fingerprint(path: Path) -> str | None:
    """sha256 over config.json, any weights index, and each weights file's size plus its first and last MiB (cheap
    on multi-GB files, yet different for two random initializations of one architecture); None if not a model."""
    if not (path / "config.json").is_file():
        return None
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name == "config.json" or f.name.endswith(".index.json"):
            h.update(f.name.encode() + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            size = f.stat().st_size
            with f.open("rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(max(0, size - (1 << 20)))
                tail = fh.read()
            h.update(f"{f.name}:{size}".encode() + head + tail)
    return h.hexdigest()


def backbone_reference(name_or_dir: str) -> dict:
    """A hub name and the commit it resolves to (``org/name@revision``: that revision's), or a local directory as
    typed, its absolute path and its fingerprint."""
    path = Path(name_or_dir)
    if not (path / "config.json").is_file():
        from fusion_dist.models.backbone import hub_name, resolved_revision

        return {"name": hub_name(name_or_dir)[0], "local": False, "revision": resolved_revision(name_or_dir)}
    return {"name": name_or_dir, "local": True, "path": str(path.resolve()), "fingerprint": fingerprint(path)}


def check_backbone(run: RunDir, backbone: str) -> None:
    """Refuse to continue, evaluate or export a run whose local backbone directory no longer holds what its
    checkpoints were trained on (a hub backbone cannot change: the run loads the commit it started at)."""
    if not (run.has_checkpoints() and run.backbone.is_file()):
        return
    kept = json.loads(run.backbone.read_text())
    now = backbone_reference(backbone) if kept.get("local") else None
    if now and now.get("fingerprint") != kept.get("fingerprint"):
        here = f"fingerprint {now['fingerprint'][:12]}" if now.get("fingerprint") else "not a local directory"
        raise UserError(f"model.backbone: {backbone} holds other config or weights than {run.root} was trained with "
                        f"({here}; {run.backbone}: {kept['name']}, fingerprint {kept['fingerprint'][:12]}); put the "
                        "original back, or use a new run.dir or --restart")


def _search_path() -> list[Path]:
    """``$FUSION_DIST_BACKBONES``: each directory, and the model directories directly inside it."""
    out = []
    for entry in filter(None, os.environ.get(SEARCH_ENV, "").split(os.pathsep)):
        root = Path(entry)
        out.append(root)
        if root.is_dir():
            out += sorted(p for p in root.iterdir() if (p / "config.json").is_file())
    return out


def locate_backbone(ref: dict, export_dir: Path, given: str | None, where: str) -> str:
    """The directory (or hub name) to load an export's backbone from: ``given`` if it is the one (refused if not);
    else the first with the recorded fingerprint of the export's bundled copy, the recorded path, the path as typed
    at training time, and ``$FUSION_DIST_BACKBONES``."""
    if not ref.get("local"):  # a hub backbone loads at the commit it was trained at
        return given or (f"{ref['name']}@{ref['revision']}" if ref.get("revision") else ref["name"])
    want = ref.get("fingerprint")
    if given:
        found = fingerprint(Path(given))
        if found != want:
            found = "is not a model directory" if found is None else "has other config or weights"
            raise UserError(f"{where}: backbone {given} {found} than the one this model was trained on "
                            f"(fingerprint {str(want)[:12]})")
        return given
    candidates = [export_dir / BUNDLED, ref.get("path"), ref["name"], *_search_path()]
    for candidate in filter(None, candidates):
        if fingerprint(Path(candidate)) == want:
            return str(candidate)
    raise UserError(
        f"{where}: the backbone this model was trained on ({ref.get('path') or ref['name']}, fingerprint "
        f"{str(want)[:12]}) is not there; give a directory holding it: --backbone DIR (fusion-dist predict), "
        f"model_config={{'backbone': DIR}} (mlflow.pyfunc.load_model), or {SEARCH_ENV}=DIR[:DIR...] (searched, "
        "with the model directories inside); 'fusion-dist register --bundle-backbone' puts it in the model")


# ----------------------------------------------------------------------------- writing and reading


def check_export_target(out: Path, source: Path) -> None:
    """``out`` may be new or a previous export (it is replaced), never anything else: not the current
    directory, not ``source`` (the run directory) or a folder above it, not a file or folder of other data."""
    target, src = out.resolve(), source.resolve()
    if target == Path.cwd().resolve() or target == src or target in src.parents:
        raise UserError(f"{out}: is the current directory, the run directory or a folder above it; "
                        "export into a new directory")
    if out.exists() and not (out / META).is_file():
        raise UserError(f"{out}: exists and is not an export (no {META}); export into a new directory "
                        "(an existing export is replaced, nothing else)")


def write_export(out: Path, cfg: Config, stage: str, weights: dict[str, torch.Tensor], manifest: dict,
                 source: Path) -> Path:
    """Write an export directory of the run at ``source`` atomically: staged next to ``out``, then swapped in
    (a previous export at ``out`` is replaced only once the new one is complete)."""
    out = Path(out)
    check_export_target(out, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f"{out.name}.staging-*"):  # left by an export that crashed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f"{out.name}.staging-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(tensors, str(tmp / WEIGHTS))
    if stage == PRETRAIN_AV:  # the encoder as model.av.checkpoint of stage 2 reads it, and config.yaml
        from fusion_dist.models.av_encoder import save_av_encoder

        encoder = {k[len("av_encoder."):]: v for k, v in tensors.items() if k.startswith("av_encoder.")}
        save_av_encoder(encoder, feature_dims(manifest), tmp, cfg)
    else:
        (tmp / CONFIG).write_text(to_yaml(cfg))
    meta = {
        "format_version": 1,
        "stage": stage,
        "dataset": manifest.get("dataset"),
        "metrics": metric_set(manifest),
        "features": {m: {"dim": d} for m, d in feature_dims(manifest).items()},
        "backbone": backbone_reference(cfg.model.backbone) if stage == TRAIN else None,
    }
    (tmp / META).write_text(json.dumps(meta, indent=2))
    if out.exists():
        old = tmp.with_name(tmp.name + "-old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def export_meta(export_dir: str | Path) -> dict:
    """``export.json`` of an export directory (UserError when it is not one)."""
    export_dir = Path(export_dir)
    for name in (WEIGHTS, META, CONFIG):
        if not (export_dir / name).is_file():
            raise UserError(f"{export_dir}: not an export directory (no {name}); make one with 'fusion-dist export'")
    return json.loads((export_dir / META).read_text())


def load_export(export_dir: str | Path, backbone: str | None = None):
    """-> (model in eval mode, meta, cfg). ``backbone``: a directory holding the backbone (``locate_backbone``)."""
    export_dir = Path(export_dir)
    meta = export_meta(export_dir)
    cfg = from_yaml((export_dir / CONFIG).read_text())
    if meta["stage"] == TRAIN:
        cfg.model.backbone = locate_backbone(meta["backbone"], export_dir, backbone, f"{export_dir}/{META}")
    from fusion_dist.models.build import rebuild

    model = rebuild(cfg, meta["stage"], feature_dims(meta), load_file(str(export_dir / WEIGHTS)))
    return model, meta, cfg


# ----------------------------------------------------------------------------- commands


def main_export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fusion-dist export", description="trainable weights + config of a run's best checkpoint")
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=None, help="which seed's best checkpoint (default: best validation MAE)")
    p.add_argument("--hub", action="store_true", help="also write a model card (README.md): a folder to upload to "
                                                      "the Hugging Face Hub as is")
    args = p.parse_args(argv)
    run = RunDir(args.run_dir)
    cfg = run.read_config()
    check_backbone(run, cfg.model.backbone)
    cfg.model.backbone = run.trained_backbone(cfg.model.backbone)
    check_export_target(Path(args.out), run.root)
    stage, ckpt = run.best_checkpoint(args.seed)
    if args.hub and (stage != TRAIN or not run.metrics.is_file()):
        raise UserError(f"export --hub: {run.root} has no " + ("metrics.json (its training has not finished)"
                        if stage == TRAIN else "stage-2 model (a pretrain-av run exports an AV encoder)"))
    manifest = read_manifest(cfg.data.root)
    write_export(Path(args.out), cfg, stage, load_file(str(ckpt)), manifest, run.root)
    print(f"exported {ckpt.parent} ({stage}) to {args.out}")
    if args.hub:
        from fusion_dist.hub import write_card

        card = write_card(Path(args.out), cfg, export_meta(args.out), json.loads(run.metrics.read_text()),
                          cfg.data.root, manifest)
        print(f"model card: {card}; upload the folder with: huggingface-cli upload ORG/NAME {args.out}")
    return 0


def main_predict(argv: list[str]) -> int:
    from data_prep import ingest
    from fusion_dist import dist
    from fusion_dist.data import ShardDataset
    from fusion_dist.predict import collator_for, predict_module, write_predictions

    p = argparse.ArgumentParser(prog="fusion-dist predict", description="predictions of an exported model")
    p.add_argument("export_dir")
    p.add_argument("data", help="shard root (with --split), or a .jsonl/.csv of id,text,audio,vision (.npy paths)"
                                "[,label], checked as prepare checks it")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=None, help="CSV path (default: predictions-<split>.csv in the current directory)")
    p.add_argument("--backbone", default=None, help="backbone directory, if it is not where it was at training time "
                                                    f"(or list directories to search in ${SEARCH_ENV})")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    # the data is checked before the model is built
    want = feature_dims(export_meta(args.export_dir))
    if args.data.endswith((".jsonl", ".csv")):  # the rules prepare applies, split and label optional
        samples = list(ingest.records(args.data, ingest.read_rows(args.data, training=False), None, want))
        name = Path(args.data).stem
    else:
        ds = ShardDataset(args.data, args.split)
        if ds.dims != want:
            raise UserError(f"{args.data}: feature dims {ds.dims} differ from the model's {want}")
        samples = [ds[i] for i in range(len(ds))]
        name = args.split
    dist.setup_logging(dist.detect())  # progress lines on stdout
    model, _, cfg = load_export(args.export_dir, args.backbone)
    collator = collator_for(model, cfg.data.max_text_tokens)
    ids, preds, labels = predict_module(model, samples, collator, args.batch_size, progress=f"predict {name}")
    out = Path(args.out or f"predictions-{name}.csv")
    write_predictions(out, ids, preds, labels)
    print(f"wrote {len(ids)} predictions to {out}")
    return 0
