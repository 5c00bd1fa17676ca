from pathlib import Path

import pytest

from fusion_dist.config import ConfigError, from_yaml, load_config, to_flat_dict, to_yaml

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["data.root=/data", "model.backbone=/bb"]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_precedence_cli_over_file_over_defaults(tmp_path):
    p = write(tmp_path, "data: {root: /d}\nmodel: {backbone: /b, n_fusion: 12}\ntrain: {lr: 0.5}\n")
    cfg = load_config(p, ["model.n_fusion=4", "model.mm_layers=[1,3]"])
    assert cfg.model.n_fusion == 4  # CLI beats file
    assert cfg.train.lr == 0.5  # file beats default
    assert cfg.train.zero_stage == 2  # default
    assert cfg.model.mm_layers == [1, 3]


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    p = write(tmp_path, "data: {root: /d}\nmodel: {backbone: /b, n_fusoin: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and "model.n_fusoin" in msg and "model.n_fusion" in msg


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"command line: unknown config key 'train\.lrr'.*train\.lr"):
        load_config(None, REQUIRED + ["train.lrr=1"])


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, "data: {root: /d}\nmodel: {backbone: /b}\ntrain: {epochs: many}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: bad value for config key 'train\.epochs'"):
        load_config(p)


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        load_config(None, ["model.backbone=/b"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.n_fusion"])


def test_yaml_round_trip():
    cfg = load_config(None, REQUIRED + ["model.mm_layers=[0,2]"])
    again = from_yaml(to_yaml(cfg))
    assert to_flat_dict(again) == to_flat_dict(cfg)


CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "studies")  # studies: sweep files


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    # data.root / model.backbone may be left for the command line; fill them only if unset.
    text = path.read_text()
    overrides = [o for o, key in zip(REQUIRED, ("root:", "backbone:")) if key not in text]
    load_config(path, overrides)


def test_paper_config_headers_are_commands_that_run_as_written():
    """Every ``fusion-dist ...`` command in a paper config's header names a real subcommand and this file, and its
    arguments parse as that command parses them (``pretrain-av`` refuses the train keys its section replaces)."""
    import re
    import shlex

    from fusion_dist.cli import COMMANDS
    from fusion_dist.train.commands import _parse

    paper = sorted((ROOT / "configs/paper").glob("*.yaml"))
    assert paper
    for path in paper:
        rel = str(path.relative_to(ROOT))
        header = [ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
        commands = [c.strip() for ln in header if ln.startswith("fusion-dist ") for c in ln.split("&&")]
        assert [c.split()[1] for c in commands if c.split()[1] in ("pretrain-av", "train", "evaluate")] == \
            ["pretrain-av", "train", "evaluate"], rel
        for command in commands:
            words = shlex.split(re.sub(r"<[^>]*>", "/placeholder", command))
            assert words[0] == "fusion-dist" and words[1] in COMMANDS, (rel, command)
            assert words[2] == rel, (rel, command)
            if words[1] in ("pretrain-av", "train", "evaluate"):
                _parse([str(ROOT / words[2]), *words[3:]], words[1])
            else:
                load_config(str(ROOT / words[2]), words[3:])


def test_pretrain_section_is_stage_one_and_its_keys_are_refused_as_train_keys(tmp_path):
    from fusion_dist.config import stage_config
    from fusion_dist.train.commands import _parse

    cfg = load_config(ROOT / "configs/paper/deepmlf_sims.yaml", ["train.zero_stage=3"])
    one = stage_config(cfg, "pretrain-av")
    assert (one.train.lr, one.train.av_lr, one.train.global_batch_size, one.train.schedule) == (5e-4, 5e-4, 128, "plateau")
    assert (one.train.grad_clip_mode, one.train.grad_clip, one.train.grad_clip_av) == ("value", 1.0, True)
    assert (one.train.patience, one.train.weight_decay, one.train.zero_stage) == (8, 0.01, 3)  # ZeRO: train's
    assert (one.model.av.maxlen, one.model.av.softperm, one.model.av.batchnorm) == (39, 0.2, ["audio", "vision"])
    assert stage_config(cfg, "train") is cfg and cfg.model.av.maxlen == 55 and cfg.train.lr == 1e-4
    unset = stage_config(load_config(ROOT / "configs/paper/deepmlf_mosi.yaml"), "pretrain-av")
    assert unset.model.av.maxlen == 50  # pretrain.maxlen unset: model.av's
    for key, instead in [("train.av_lr=1e-3", "pretrain.lr"), ("train.epochs=3", "pretrain.epochs"),
                         ("model.av.batchnorm=[]", "pretrain.batchnorm")]:
        with pytest.raises(ConfigError, match=f"{key.split('=')[0]} does not apply to pretrain-av: stage 1 "
                                              f"trains with {instead}"):
            _parse([str(ROOT / "configs/paper/deepmlf_sims.yaml"), key], "pretrain-av")
    _parse([str(ROOT / "configs/paper/deepmlf_sims.yaml"), "train.av_lr=1e-3"], "train")
    with pytest.raises(ConfigError, match=r"pretrain\.plateau_factor=1\.5: must be in \(0, 1\)"):
        load_config(ROOT / "configs/paper/deepmlf_sims.yaml", ["pretrain.plateau_factor=1.5"])
    with pytest.raises(ConfigError, match="train.grad_clip_av=false needs train.grad_clip_mode=value"):
        load_config(ROOT / "configs/paper/deepmlf_sims.yaml", ["train.grad_clip_mode=norm"])
