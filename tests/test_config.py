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


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    # data.root / model.backbone may be left for the command line; fill them only if unset.
    text = path.read_text()
    overrides = [o for o, key in zip(REQUIRED, ("root:", "backbone:")) if key not in text]
    load_config(path, overrides)


def test_paper_config_headers_are_commands_that_run_as_written():
    """Every ``fusion-dist ...`` command in a paper config's header names a real subcommand and this file, and its
    overrides load; stage 1 (``pretrain-av``) trains at ``train.av_lr``, so that is the lr its command sets."""
    import re
    import shlex

    from fusion_dist.cli import COMMANDS

    paper = sorted((ROOT / "configs/paper").glob("*.yaml"))
    assert paper
    for path in paper:
        rel = str(path.relative_to(ROOT))
        header = [ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
        commands = [c.strip() for ln in header if ln.startswith("fusion-dist ") for c in ln.split("&&")]
        assert any(c.startswith("fusion-dist pretrain-av ") for c in commands), rel
        for command in commands:
            words = shlex.split(re.sub(r"<[^>]*>", "/placeholder", command))
            assert words[0] == "fusion-dist" and words[1] in COMMANDS, (rel, command)
            assert words[2] == rel, (rel, command)
            overrides = words[3:]
            load_config(str(ROOT / words[2]), overrides)
            if words[1] == "pretrain-av":
                keys = {o.split("=", 1)[0] for o in overrides}
                assert "train.av_lr" in keys and "train.lr" not in keys, (rel, command)
