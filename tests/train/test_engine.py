import json
import math

import pytest
import torch

from fusion_dist.config import TrainConfig
from fusion_dist.errors import UserError
from fusion_dist.config import batch_geometry
from fusion_dist.train.engine import _clip_by_value, deepspeed_config, lr_factor, param_groups


def test_accumulation_from_global_batch():
    t = TrainConfig(global_batch_size=32, micro_batch_size=4)
    assert batch_geometry(t, 2).accumulation == 4
    assert batch_geometry(t, 8).accumulation == 1
    assert (batch_geometry(t, 16).micro, batch_geometry(t, 16).accumulation) == (2, 1)  # the cap is an upper bound
    with pytest.raises(UserError, match="global_batch_size=32 is not divisible by the world size 3"):
        batch_geometry(t, 3)


def test_deepspeed_config_from_train_config(tmp_path):
    t = TrainConfig(global_batch_size=16, micro_batch_size=4, zero_stage=3, precision="bf16",
                    offload_optimizer=True, offload_params=True, grad_clip=0.5)
    c = deepspeed_config(t, 2)
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (16, 4, 2)
    z = c["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert c["bf16"]["enabled"] and not c["fp16"]["enabled"] and c["gradient_clipping"] == 0.5
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 2.0}))
    t.deepspeed_config = str(extra)
    c = deepspeed_config(t, 2)
    assert c["zero_optimization"]["reduce_bucket_size"] == 1000 and c["zero_optimization"]["stage"] == 3
    assert c["gradient_clipping"] == 2.0
    # buckets and ZeRO-3 gather limits follow the trainable count, not DeepSpeed's 5e8/1e9 defaults
    z = deepspeed_config(TrainConfig(global_batch_size=16, micro_batch_size=4, zero_stage=3), 2, 122_000_000)
    z = z["zero_optimization"]
    assert z["reduce_bucket_size"] == z["allgather_bucket_size"] == z["stage3_prefetch_bucket_size"] == 30_500_000
    assert z["stage3_max_live_parameters"] == 61_000_000 and z["stage3_max_reuse_distance"] == 30_500_000
    tiny = deepspeed_config(TrainConfig(global_batch_size=16, micro_batch_size=4, zero_stage=2), 2, 20_000)
    assert tiny["zero_optimization"]["reduce_bucket_size"] == 1_000_000
    with pytest.raises(UserError, match="offload_params needs train.zero_stage 3"):
        deepspeed_config(TrainConfig(global_batch_size=4, micro_batch_size=4, offload_params=True), 1)


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lm = torch.nn.Linear(4, 4)
        self.lm.requires_grad_(False)
        self.av_encoder = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        self.fusion_tokens = torch.nn.Parameter(torch.zeros(3, 4))
        self.gate = torch.nn.Parameter(torch.zeros(1))
        self.head = torch.nn.Linear(4, 1)


def test_param_groups_lr_and_no_decay_rules():
    t = TrainConfig(lr=1e-3, av_lr=5e-3, weight_decay=0.1)
    m = Toy()
    groups = {g["name"]: g for g in param_groups(m, t)}
    ids = lambda g: {id(p) for p in groups[g]["params"]}  # noqa: E731
    assert ids("lm") == {id(m.head.weight)}
    assert ids("lm_no_decay") == {id(m.head.bias), id(m.fusion_tokens), id(m.gate)}
    assert ids("av") == {id(m.av_encoder[0].weight)}
    assert ids("av_no_decay") == {id(m.av_encoder[0].bias), id(m.av_encoder[1].weight), id(m.av_encoder[1].bias)}
    assert groups["av"]["lr"] == 5e-3 and groups["lm"]["lr"] == 1e-3
    assert groups["lm"]["weight_decay"] == 0.1 and groups["lm_no_decay"]["weight_decay"] == 0.0
    frozen = {id(p) for p in m.lm.parameters()}
    assert not frozen & set().union(*map(ids, groups))


def test_warmup_then_cosine_to_zero_over_the_epochs_without_a_horizon():
    f = lr_factor(TrainConfig(epochs=3, warmup_epochs=1), steps_per_epoch=4, peak=1e-3)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0) and f(20) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(4, 12))


def test_cosine_over_the_horizon_to_min_lr_then_restarts_or_holds():
    t = TrainConfig(epochs=100, warmup_epochs=1, schedule_epochs=2, min_lr=1e-4)
    f = lr_factor(t, steps_per_epoch=5, peak=1e-3)  # warmup steps 0-4, cosine over steps 5-14, restart at 15
    assert f(4) == 1.0 and f(5) == 1.0
    assert f(10) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert f(15) == 1.0 and f(20) == pytest.approx(f(10))
    held = lr_factor(TrainConfig(epochs=100, warmup_epochs=1, schedule_epochs=2, min_lr=1e-4, lr_restarts=False),
                     steps_per_epoch=5, peak=1e-3)
    assert held(15) == pytest.approx(0.1) and held(400) == pytest.approx(0.1)
    scale = [1.0]
    plateau = lr_factor(TrainConfig(schedule="plateau", warmup_epochs=0), 5, 1e-3, plateau_scale=lambda: scale[0])
    assert plateau(0) == plateau(99) == 1.0
    scale[0] = 0.1
    assert plateau(100) == 0.1


def test_value_clipping_clamps_the_groups_it_names_before_the_update():
    t = TrainConfig(lr=1.0, av_lr=1.0, weight_decay=0.0, grad_clip=0.5, grad_clip_mode="value", grad_clip_av=False)
    m = Toy()
    groups = param_groups(m, t)
    assert {g["name"]: g["clip_value"] for g in groups} == {"av": 0.0, "av_no_decay": 0.0, "lm": 0.5,
                                                            "lm_no_decay": 0.5}
    assert all(g["clip_value"] == 0.0 for g in param_groups(m, TrainConfig(grad_clip=0.5)))  # norm mode: DeepSpeed's
    opt = torch.optim.SGD(groups, lr=1.0)
    opt.register_step_pre_hook(_clip_by_value)
    for p in m.parameters():
        p.grad = torch.full_like(p, 3.0) if p.requires_grad else None
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.step()
    step = {n: (before[n] - p.detach()).unique().tolist() for n, p in m.named_parameters() if p.requires_grad}
    assert step["head.weight"] == step["fusion_tokens"] == [0.5] and step["av_encoder.0.weight"] == [3.0]
