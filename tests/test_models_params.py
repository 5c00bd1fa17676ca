"""Parameter counts on the meta device: the paper's Tables 6-7, and every shipped YAML builds."""

import json
from pathlib import Path

import pytest

from fusion_dist.cli import main as cli
from fusion_dist.config import AVEncoderConfig, ModelConfig, load_config
from fusion_dist.models import build_model, count_parameters
from fusion_dist.models.presets import make_backbone
from model_helpers import backbones, single_thread  # noqa: F401

CONFIGS = sorted(p for p in Path(__file__).resolve().parents[1].glob("configs/**/*.yaml")
                 if p.parent.name != "studies")  # configs/studies/: sweep files
# The hub is unreachable in tests: each hub name a config uses maps to the make-backbone preset of its architecture.
HUB_PRESETS = {
    "gpt2": ("gpt2", "gpt2-base", {}),
    "gpt2-medium": ("gpt2", "gpt2-medium", {}),
    "gpt2-large": ("gpt2", "gpt2-large", {}),
    "HuggingFaceTB/SmolLM2-1.7B": ("llama", "smollm2-1.7b", {}),
    "uer/gpt2-chinese-cluecorpussmall": ("gpt2", "gpt2-base", {"vocab_size": 21128}),
}
PAPER_TABLES = [  # (preset, 0-based MM layers, MM params in millions) from DeepMLF Tables 6-7
    ("gpt2-base", [7, 8, 9, 10, 11], 29.75),
    ("gpt2-base", [5, 6, 7, 8, 9, 10, 11], 41.65),
    ("gpt2-base", [3, 4, 5, 6, 7, 8, 9, 10, 11], 53.55),
    ("gpt2-medium", [8, 11, 14, 17, 20, 23], 63.30),
    ("gpt2-large", [7, 14, 21, 28, 35], 82.35),
]


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("config_only")
    made = {}

    def get(arch, preset, extra=None):
        key = (arch, preset, tuple(sorted((extra or {}).items())))
        if key not in made:
            out = make_backbone(arch, preset, root / f"{arch}-{preset}-{len(made)}", config_only=True)
            if extra:
                cfg = json.loads((out / "config.json").read_text())
                cfg.update(extra)
                (out / "config.json").write_text(json.dumps(cfg))
            made[key] = str(out)
        return made[key]

    return get


@pytest.mark.parametrize("preset, layers, paper_m", PAPER_TABLES)
def test_mm_block_params_match_the_paper(config_only, preset, layers, paper_m, capsys):
    cfg = ModelConfig(backbone=config_only("gpt2", preset), mm_layers=layers, n_fusion=12,
                      av=AVEncoderConfig(d_av=30, init="random+tune"))
    counts = count_parameters(build_model(cfg, 74, 35, meta=True))
    ours = counts["mm_blocks"] / 1e6
    with capsys.disabled():
        print(f"\n{preset:<12} {len(layers)} MM blocks: ours {ours:.2f}M  paper {paper_m:.2f}M")
    assert abs(ours - paper_m) / paper_m < 0.01
    if preset == "gpt2-base":
        assert abs(counts["per_block"][11] / 1e6 - 5.95) / 5.95 < 0.01


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_builds_on_meta(path, config_only, backbones):
    cfg = load_config(path)
    name = cfg.model.backbone
    if name in HUB_PRESETS:
        arch, preset, extra = HUB_PRESETS[name]
        cfg.model.backbone = config_only(arch, preset, extra)
    else:  # local tiny backbones of the demo / test configs
        cfg.model.backbone = backbones["llama" if "llama" in name or "demo" in name else "gpt2"]
    counts = count_parameters(build_model(cfg.model, 20, 35, meta=True))
    assert counts["trainable"] > 0 and counts["frozen"] > counts["mm_blocks"] > 0
    if cfg.model.lora.enabled:  # the FFW copies are frozen under LoRA: only adapters count as trainable
        assert counts["mm_blocks"] < counts["frozen"] / 2
    table = {(preset, tuple(layers)): mm for preset, layers, mm in PAPER_TABLES}
    key = (HUB_PRESETS.get(name, (None, None))[1], tuple(cfg.model.mm_layers))
    if cfg.model.family == "deepmlf" and key in table:  # a paper config of Tables 6-7: its MM-block count
        assert abs(counts["mm_blocks"] / 1e6 - table[key]) / table[key] < 0.01, (path, counts["mm_blocks"])


def test_params_command_prints_json_and_table(config_only, capsys):
    backbone = config_only("gpt2", "gpt2-large")
    argv = ["configs/paper/deepmlf_mosei.yaml", f"model.backbone={backbone}", "--audio-dim", "74", "--vision-dim", "35"]
    root = Path(__file__).resolve().parents[1]
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert cli(["params", *argv, "--json"]) == 0
        counts = json.loads(capsys.readouterr().out)
        assert all(isinstance(counts[k], int) for k in ("trainable", "frozen", "mm_blocks"))
        assert abs(counts["mm_blocks"] / 1e6 - 82.35) < 0.8
        assert cli(["params", *argv]) == 0
        table = capsys.readouterr().out
        assert "MM block after layer 35" in table and "frozen" in table
        assert cli(["params", "configs/paper/deepmlf_mosei.yaml", f"model.backbone={backbone}"]) == 2
        assert "data.root" in capsys.readouterr().err
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("arch, preset, billions", [
    ("llama", "smollm2-1.7b", 1.711), ("llama", "llama-3.1-8b", 8.030), ("qwen2", "qwen2.5-7b", 7.616),
    ("mistral", "mistral-7b", 7.248),
])
def test_large_presets_have_the_published_sizes_and_count_on_meta(tmp_path, arch, preset, billions):
    from fusion_dist.models.backbone import backbone_on_meta

    out = make_backbone(arch, preset, tmp_path / preset, config_only=True)
    lm = backbone_on_meta(str(out))
    assert sum(p.numel() for p in lm.parameters()) == pytest.approx(billions * 1e9, rel=2e-3)
    assert cli(["params", "configs/paper/deepmlf_mosi.yaml", f"model.backbone={out}", "--audio-dim", "5",
                "--vision-dim", "20"]) == 0
