import json

import pytest
import torch

from fusion_dist.config import TrainConfig
from fusion_dist.errors import UserError
from fusion_dist.config import batch_geometry
from fusion_dist.train.engine import deepspeed_config, param_groups, warmup_cosine


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


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(4, 12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(4, 12))
