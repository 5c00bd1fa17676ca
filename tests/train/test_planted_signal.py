"""The paper's story on data where it is known to be true.

``fusion-dist synth`` plants a label that needs the words, the AV features and their interaction
(y ~ 0.45 text + 0.1 audio + 0.1 vision + |text| x AV, data_prep/synth.py), so a model that fuses the
modalities must beat either modality alone. Three real CLI runs on the same data, each over two seeds:
the AV-only encoder (``pretrain-av``), the text-only baseline (DeepMLF with ``model.mm_layers=[]``) and the
full DeepMLF on the stage-1 encoder (``pretrained+tune``, the paper's curriculum). The full model's mean
test MAE must be clearly lower than both. One rank each, two processes at a time (one per core).
"""

import csv
import json
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, _env, command, run_cli

pytestmark = pytest.mark.slow

CONFIG = str(ROOT / "configs/test/planted_mosi.yaml")
SAMPLES, DATA_SEED = 1500, 0
MARGIN = 0.9  # full DeepMLF's MAE must be at least 10% below each unimodal model's


def start(sub: str, args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as fh:
        return subprocess.Popen(command(sub, args, 1), env=_env(), stdout=fh, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]


def test_full_deepmlf_beats_text_only_and_av_only(tmp_path):
    pkl, shards, bb = tmp_path / "planted.pkl", tmp_path / "shards", tmp_path / "backbone"
    runs = {name: tmp_path / name for name in ("av", "text", "full")}
    logs = {name: tmp_path / f"{name}.log" for name in ("backbone", *runs)}
    procs = []
    try:
        backbone_args = ["--arch", "llama", "--preset", "tiny", "--out", str(bb)]
        procs.append(start("make-backbone", backbone_args, logs["backbone"]))
        for sub, args in [("synth", ["--dataset", "mosi", "--samples", str(SAMPLES), "--seed", str(DATA_SEED),
                                     "--out", str(pkl)]),
                          ("prepare", [str(pkl), str(shards)])]:
            r = run_cli(sub, args)
            assert r.returncode == 0, r.stderr
        finish(procs[-1], logs["backbone"])

        common = [CONFIG, f"data.root={shards}", f"model.backbone={bb}", "tracking.enabled=false",
                  "train.log_every_steps=1000"]
        text = start("train", [*common, "model.mm_layers=[]", f"run.dir={runs['text']}"], logs["text"])
        procs.append(text)
        # meanwhile on the other core: stage 1, then the full model on its encoder
        procs.append(start("pretrain-av", [*common, f"run.dir={runs['av']}"], logs["av"]))
        finish(procs[-1], logs["av"])
        procs.append(start("train", [*common, "model.av.init=pretrained+tune",
                                     f"model.av.checkpoint={runs['av'] / 'export'}", f"run.dir={runs['full']}"],
                           logs["full"]))
        finish(procs[-1], logs["full"])
        finish(text, logs["text"])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    metrics = {name: json.loads((d / "metrics.json").read_text()) for name, d in runs.items()}
    for name, m in metrics.items():
        assert sorted(m["seeds"]) == ["0", "1"], f"{name}: seeds {sorted(m['seeds'])}"
    test = {name: m["mean"]["test"] for name, m in metrics.items()}
    with (runs["full"] / "predictions" / "test-seed0.csv").open() as fh:
        labels = [float(row["label"]) for row in csv.DictReader(fh)]
    constant = sum(abs(y) for y in labels) / len(labels)  # the labels are symmetric around 0

    print(f"\nplanted-signal MOSI, {SAMPLES} samples (test {len(labels)}), mean over seeds 0, 1; "
          f"predicting 0 everywhere: MAE {constant:.4f}")
    for name, label in [("av", "AV-only (pretrain-av)"), ("text", "text-only (no MM blocks)"),
                        ("full", "full DeepMLF")]:
        print(f"  {label:26s} MAE {test[name]['MAE']:.4f}  Corr {test[name]['Corr']:.4f}")

    full = test["full"]["MAE"]
    assert full < MARGIN * test["text"]["MAE"], f"full {full:.4f} vs text-only {test['text']['MAE']:.4f}"
    assert full < MARGIN * test["av"]["MAE"], f"full {full:.4f} vs AV-only {test['av']['MAE']:.4f}"
    assert full < MARGIN * constant, f"full {full:.4f} vs predicting 0: {constant:.4f}"
