"""``fusion-dist plan``: the per-rank memory arithmetic, the paper GPT2-large plan, the recommendation, bad input."""

from __future__ import annotations

import argparse
import json

import pytest

from fusion_dist.cli import main as cli
from fusion_dist.errors import UserError
from fusion_dist.models import make_backbone
from fusion_dist.params import meta_model
from fusion_dist.plan import OPTIONS, Option, Shape, activation_bytes, make_plan, option_memory, parse_size

GIB = 1024**3
DIMS = ["--audio-dim", "74", "--vision-dim", "35"]


def test_parse_size():
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("80G") == parse_size("80GiB") == 80 * 2**30
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("16000MB") == 16 * 10**9
    assert parse_size("1.5TiB") == int(1.5 * 2**40)
    for bad in ("lots", "80XB", "0GB", "-5G", "GB", ""):
        with pytest.raises(UserError, match="--gpu-mem"):
            parse_size(bad)


SHAPE = Shape(trainable=1000, frozen=8000, largest_module=500, layers=3, hidden=16, vocab=100, seq_len=10,
              micro_batch=2, lm_loss=True)


def test_activation_formula():
    # b * S * (17 * h * L * w + V * 4): 2 * 10 * (17 * 16 * 3 * 2 + 100 * 4)
    assert activation_bytes(SHAPE, 2) == 40640
    assert activation_bytes(Shape(**{**SHAPE.__dict__, "lm_loss": False}), 4) == 2 * 10 * 17 * 16 * 3 * 4


def test_option_memory_by_hand_bf16():
    world, w, bucket, act = 4, 2, 1000, 40640
    zero0 = option_memory(Option(0), SHAPE, world, w, bucket)
    assert zero0 == {"frozen": 16000, "trainable": 2000, "grads": 2000, "optimizer": 12000, "buffers": 0,
                     "activations": act, "total": 16000 + 2000 + 2000 + 12000 + act, "cpu": 0}
    zero1 = option_memory(Option(1), SHAPE, world, w, bucket)
    assert (zero1["frozen"], zero1["grads"], zero1["optimizer"], zero1["buffers"]) == (16000, 2000, 3000, 2000)
    zero2 = option_memory(Option(2), SHAPE, world, w, bucket)
    assert (zero2["frozen"], zero2["grads"], zero2["optimizer"]) == (16000, 500, 3000)
    zero3 = option_memory(Option(3), SHAPE, world, w, bucket)
    # the frozen backbone is partitioned only under ZeRO-3: frozen params x bytes / world
    assert (zero3["frozen"], zero3["trainable"], zero3["grads"], zero3["optimizer"]) == (8000 * 2 // 4, 500, 500, 3000)
    assert zero3["buffers"] == bucket * w + 500 * w  # reduce bucket + the largest module gathered
    full = option_memory(Option(3, True, True), SHAPE, world, w, bucket)
    assert (full["frozen"], full["trainable"], full["optimizer"]) == (0, 0, 0)
    assert full["cpu"] == 1000 * (12 + 4) // 4 + 9000 * 2 // 4
    assert full["total"] == full["grads"] + full["buffers"] + act


def test_option_memory_fp32_adam_is_two_moments():
    zero1 = option_memory(Option(1), SHAPE, 4, 4, 0)
    assert (zero1["frozen"], zero1["trainable"], zero1["optimizer"]) == (32000, 4000, 1000 * 8 // 4)


def test_fits_needs_the_reserve_and_recommendation_is_cheapest_fitting():
    big = Shape(**{**SHAPE.__dict__, "frozen": 4 * 10**9})  # a backbone worth partitioning
    bucket = make_plan(big, "bf16", 4, 1, 1)["reduce_bucket_size"]  # sized from the trainable count
    need = {o.name: option_memory(o, big, 4, 2, bucket)["total"] for o in OPTIONS}
    assert make_plan(big, "bf16", 4, 1, 10**12)["recommended"] == "zero0"
    # just enough for ZeRO-3 with the 10% reserve, not for ZeRO-0..2
    mem = int(need["zero3"] / 0.9) + 1
    assert min(need["zero0"], need["zero1"], need["zero2"]) > 0.9 * mem
    plan = make_plan(big, "bf16", 4, 1, mem)
    assert plan["recommended"] == "zero3"
    assert [o["fits"] for o in plan["options"][:4]] == [False, False, False, True]
    tight = make_plan(big, "bf16", 4, 1, need["zero3"])["options"]
    assert not next(o for o in tight if o["name"] == "zero3")["fits"]  # it fits, but leaves no headroom
    assert make_plan(big, "bf16", 4, 1, 1000)["recommended"] is None
    with pytest.raises(UserError, match="train.precision"):
        make_plan(big, "int8", 4, 1, mem)


@pytest.fixture(scope="module")
def gpt2_large(tmp_path_factory) -> str:
    return str(make_backbone("gpt2", "gpt2-large", tmp_path_factory.mktemp("gpt2-large"), config_only=True))


@pytest.fixture(scope="module")
def mosei_shape(gpt2_large):
    from fusion_dist.plan import model_shape

    args = argparse.Namespace(config="configs/paper/deepmlf_mosei.yaml", overrides=[f"model.backbone={gpt2_large}"],
                              audio_dim=74, vision_dim=35)
    cfg, model = meta_model(args)
    return model_shape(cfg, model, 8)


def test_paper_mosei_plan_is_sensible(mosei_shape):
    assert 770e6 < mosei_shape.frozen < 780e6  # GPT2-large is 774M parameters, all frozen
    assert 80e6 < mosei_shape.trainable < 85e6  # paper Table 7: 82.35M in the MM blocks
    assert (mosei_shape.layers, mosei_shape.hidden, mosei_shape.seq_len) == (36 + 5, 1280, 50 + 12)
    plan = make_plan(mosei_shape, "bf16", 8, 1, parse_size("80GB"))
    by_name = {o["name"]: o for o in plan["options"]}
    assert plan["recommended"] == "zero0"
    assert by_name["zero0"]["frozen"] == mosei_shape.frozen * 2
    assert by_name["zero3"]["frozen"] == -(-mosei_shape.frozen * 2 // 8)
    # DeepSpeed's estimator gives the frozen backbone gradients and optimizer state: far above ours
    ours = sum(by_name["zero2"][k] for k in ("frozen", "trainable", "grads", "optimizer"))
    assert plan["deepspeed_estimate"]["zero2"]["gpu"] > 1.8 * ours
    assert "trainable" in plan["deepspeed_note"]


def test_recommendation_follows_gpu_memory(mosei_shape):
    def recommended(mem: str) -> str | None:
        return make_plan(mosei_shape, "fp32", 8, 1, parse_size(mem))["recommended"]

    big, small, tiny = recommended("80GB"), recommended("11GiB"), recommended("2GiB")
    assert big == "zero0"
    assert small is not None and small.startswith("zero3")  # only partitioning the frozen backbone fits
    assert tiny is None


def test_cli_json_and_table(gpt2_large, capsys):
    assert cli(["plan", "configs/test/deepmlf_tiny_gpt2.yaml", f"model.backbone={gpt2_large}", *DIMS,
                "model.mm_layers=[7,14]", "train.precision=bf16", "--gpus", "4", "--nodes", "2",
                "--gpu-mem", "24GiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["world_size"] == 8 and plan["precision"] == "bf16" and plan["gpu_mem"] == 24 * GIB
    assert [o["name"] for o in plan["options"]] == [o.name for o in OPTIONS]
    assert {"zero2", "zero3"} <= set(plan["deepspeed_estimate"])
    assert cli(["plan", "configs/test/deepmlf_tiny_gpt2.yaml", f"model.backbone={gpt2_large}", *DIMS,
                "model.mm_layers=[7,14]", "--gpus", "1", "--gpu-mem", "80G"]) == 0
    out = capsys.readouterr().out
    assert "recommended: zero0" in out and "counts every parameter as trainable" in out


@pytest.mark.parametrize("extra, message", [
    (["--gpus", "0", "--gpu-mem", "80GB"], "--gpus and --nodes must be positive"),
    (["--gpus", "2", "--nodes", "-1", "--gpu-mem", "80GB"], "--gpus and --nodes must be positive"),
    (["--gpus", "2", "--gpu-mem", "lots"], "--gpu-mem: cannot read 'lots'"),
])
def test_bad_input(extra, message, capsys):
    assert cli(["plan", "configs/test/deepmlf_tiny_gpt2.yaml", *DIMS, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusion-dist plan: error:") and message in err
