"""bf16 on the real engine path: the CLI on 2 CPU ranks, DeepMLF (LoRA, BatchNorm) and DMPF (BatchNorm), under
ZeRO-2 and ZeRO-3. Training is finite and learns; checkpoints hold the trainable state only (never the frozen
backbone) and a run resumed from a mid-run checkpoint continues exactly as the uninterrupted one."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIG, ROOT, base_args, history, run_cli

pytestmark = pytest.mark.slow

DMPF_CONFIG = str(ROOT / "configs/test/dmpf_tiny_llama.yaml")
COMMON = ["model.loss.lambda_lm=0", "train.precision=bf16", "train.epochs=3", "train.global_batch_size=16", "train.micro_batch_size=4",
          "train.lr=3e-3", "train.checkpoint_every_steps=5", "train.keep_last=10", "train.log_every_steps=1"]
FAMILIES = {
    "deepmlf+lora": [CONFIG, "model.lora.enabled=true", "model.lora.r=2", "model.lora.target_modules=[c_fc,c_proj]"],
    "dmpf": [DMPF_CONFIG],
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama") / "bb"
    assert run_cli("make-backbone", ["--arch", "llama", "--preset", "tiny", "--out", str(out)]).returncode == 0
    return out


def args_for(engine_inputs, llama, family: str, stage: int, run_dir: Path) -> list[str]:
    config, *extra = FAMILIES[family]
    # ZeRO-3 with the prefix cache on disk: every rank computes its share, with the same layer calls
    cache = ["train.prefix_cache=disk"] if stage == 3 else []
    args = base_args(engine_inputs, run_dir, *COMMON, f"train.zero_stage={stage}", *cache, *extra)
    args[0] = config
    return args + ([f"model.backbone={llama}"] if family == "dmpf" else [])


def frozen_bytes(backbone: Path) -> int:
    return sum(t.numel() * 2 for t in load_file(str(backbone / "model.safetensors")).values())  # in bf16


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_trains_checkpoints_trainable_state_only_and_resumes_exactly(engine_inputs, llama, tmp_path, family,
                                                                          stage):
    run_dir = tmp_path / "run"
    r = run_cli("train", args_for(engine_inputs, llama, family, stage, run_dir), ranks=2)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    rows = history(run_dir)
    loss = [row["loss"] for row in rows]
    n_train = json.loads((engine_inputs[0] / "manifest.json").read_text())["splits"]["train"]["rows"]
    assert all(torch.isfinite(torch.tensor(loss))) and len(loss) == 3 * (n_train // 16)
    epoch = lambda e: sum(row["loss"] for row in rows if row["epoch"] == e) / (n_train // 16)  # noqa: E731
    assert epoch(2) < epoch(1) < epoch(0) and epoch(2) < 0.95 * epoch(0), loss

    # a checkpoint is the trainable state (all ranks' partitions: fp32 master weights and two Adam moments, the
    # bf16 weights) plus small metadata, never the backbone: with LoRA the frozen weights outweigh that bound
    ck = run_dir / "checkpoints/seed0"
    tag = (ck / "latest").read_text().strip()
    on_disk = sum(f.stat().st_size for f in (ck / tag).iterdir()
                  if f.name != "trainable.safetensors" and not f.name.startswith("train_state"))
    saved = torch.load(next((ck / tag).glob("*model_states.pt")), map_location="cpu", weights_only=False)
    trained = load_file(str(ck / tag / "trainable.safetensors"))
    assert set(saved["module"]) - set(saved["buffer_names"]) <= trained.keys()  # no frozen weight, no tied alias
    n = sum(t.numel() for t in trained.values())
    bound = 1.25 * 14 * n + 256 * 1024
    assert 12 * n <= on_disk <= bound, (on_disk, n)
    if family == "deepmlf+lora":
        assert bound < 12 * n + frozen_bytes(engine_inputs[1])
    # beside it, the world-size-independent trainable state: fp32 master and two Adam moments of each trainable
    # parameter, gathered, and nothing else
    elastic = {}
    for f in sorted((ck / tag).glob("train_state-*.safetensors")):
        elastic.update(load_file(str(f)))
    masters = {k.split("/", 1)[1]: t for k, t in elastic.items() if k.startswith("fp32/")}
    assert masters.keys() <= trained.keys() and masters and all(t.dtype == torch.float32 for t in elastic.values())
    assert sorted(elastic) == sorted(f"{key}/{k}" for k in masters for key in ("fp32", "exp_avg", "exp_avg_sq"))
    n_trainable = sum(t.numel() for t in masters.values())
    elastic_bytes = sum(f.stat().st_size for f in (ck / tag).glob("train_state*"))
    assert 12 * n_trainable <= elastic_bytes <= 12 * n_trainable + 256 * 1024

    # resume from the first mid-run checkpoint (as after a crash there): the same losses, the same weights
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed, ignore=shutil.ignore_patterns("result.json", "metrics.json", "export"))
    (resumed / "checkpoints/seed0/latest").write_text("step5")
    r = run_cli("train", args_for(engine_inputs, llama, family, stage, resumed), ranks=2)
    assert r.returncode == 0 and "resumed from step5" in r.stdout, r.stdout[-4000:] + r.stderr[-6000:]
    if stage == 3 and family == "deepmlf+lora":  # DMPF's first MM block is after layer 0: no prefix
        assert "(reused)" in r.stdout and len(list((resumed / "prefix_cache").iterdir())) == 1
    assert [row["loss"] for row in history(resumed)] == loss
    a, b = (load_file(str(d / "checkpoints/seed0" / tag / "trainable.safetensors")) for d in (run_dir, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "metrics.json").read_text())["mean"] == \
        json.loads((run_dir / "metrics.json").read_text())["mean"]
