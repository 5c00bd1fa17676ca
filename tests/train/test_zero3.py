"""ZeRO-3 on 2 CPU ranks: the backbone is loaded partitioned, each MM block's FFW copy holds the source
layer's full MLP weights, training steps run, the exported trainable weights are gathered (full size) and
go back into the partitions.

The model is built the way the trainer builds it (``engine.model_init`` + ``build_model``), in two real
processes, so each rank holds only half of every backbone tensor and the copy has to gather the other half.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import base_args, history, run_cli
from fusion_dist.models.presets import make_backbone

CONFIG = str(Path(__file__).resolve().parents[2] / "configs/test/deepmlf_tiny_gpt2.yaml")

WORKER = textwrap.dedent("""
    import sys

    import numpy as np
    import torch
    from safetensors.torch import load_file
    from fusion_dist.config import load_config
    from fusion_dist.data import Collator
    from fusion_dist.models import build_model, gathered
    from fusion_dist import dist
    from fusion_dist.train import engine as E
    from fusion_dist.train.checkpoint import gathered_weights, load_weights

    config, backbone, extra_ds = sys.argv[1:4]
    denv = dist.init_distributed(timeout_s=120)
    cfg = load_config(config, [f"model.backbone={backbone}", "train.zero_stage=3", "train.global_batch_size=8",
                               "train.micro_batch_size=4", f"train.deepspeed_config={extra_ds}"])
    ds_config = E.deepspeed_config(cfg.train, denv.world_size)
    with E.model_init(ds_config):
        model = build_model(cfg.model, audio_dim=5, vision_dim=7)
    source = load_file(f"{backbone}/model.safetensors")

    # 1. the backbone is partitioned: every rank holds an empty placeholder and half of the elements
    for name, p in model.lm.named_parameters():
        assert p.numel() == 0 and p.ds_numel == source[name].numel(), name
        assert p.ds_tensor.numel() == -(-p.ds_numel // 2), name

    # 2. each FFW copy is the source layer's MLP, whole, in fresh parameters (before and after DeepSpeed
    #    partitions the copy too)
    def check_copies():
        for i, block in model.mm_blocks.items():
            mlp = model.adapter.mlp(int(i))
            with gathered([*mlp.parameters(), *block.ffw.parameters()]):
                copied, original = dict(block.ffw.named_parameters()), dict(mlp.named_parameters())
                assert copied.keys() == original.keys()
                for name, p in copied.items():
                    assert p is not original[name] and p.requires_grad and not original[name].requires_grad
                    ref = source[f"transformer.h.{i}.mlp.{name}"]
                    assert p.shape == ref.shape, (i, name, p.shape)
                    torch.testing.assert_close(p.detach(), ref, rtol=0, atol=0)
                    torch.testing.assert_close(original[name].detach(), ref, rtol=0, atol=0)

    check_copies()
    assert not any(hasattr(p, "ds_id") for p in model.mm_blocks.parameters())  # no shared partition state
    engine = E.initialize(model, cfg.train, ds_config, steps_per_epoch=4)
    check_copies()

    # 3. training steps run: the fusion tokens, owned by the model itself, get their gradient
    rng = np.random.default_rng(denv.rank)
    rows = [dict(id=str(k), raw_text="the movie was great", audio=rng.standard_normal((3, 5), dtype=np.float32),
                 vision=rng.standard_normal((4, 7), dtype=np.float32), label=float(k % 3 - 1)) for k in range(4)]
    batch = Collator(model.tokenizer, cfg.data.max_text_tokens)(rows)
    before = gathered_weights(engine.module)
    for _ in range(ds_config["gradient_accumulation_steps"]):
        out = engine(batch)
        assert torch.isfinite(out.loss), out.loss
        engine.backward(out.loss)
        engine.step()

    # 4. export gathers: full-size trainable weights, identical on both ranks, changed by the step
    trainable = dict(engine.module.named_parameters())
    assert all(p.numel() == 0 for n, p in trainable.items() if p.requires_grad)  # partitioned now
    weights = gathered_weights(engine.module)
    assert weights.keys() == model.trainable_state_dict().keys()
    params = {name: w for name, w in weights.items() if name in trainable}  # not BatchNorm statistics
    for name, w in params.items():
        assert w.shape == trainable[name].ds_shape and w.numel() > 0, (name, w.shape)
    sums = {name: w.sum().item() for name, w in params.items()}
    assert dist.all_gather_object(sums)[0] == sums
    assert not torch.equal(weights["fusion_tokens"], before["fusion_tokens"])
    with gathered([p for n, p in trainable.items() if "gate" in n]):  # a partitioned gate has no value
        assert all(0 < v < 1 for v in model.gate_values().values())

    # 5. the final evaluation puts an earlier checkpoint's weights back into the partitions: exactly those
    load_weights(engine.module, before)
    restored = gathered_weights(engine.module)
    assert restored.keys() == before.keys() and all(torch.equal(restored[k], before[k]) for k in before)
    assert all(p.numel() == 0 for n, p in trainable.items() if p.requires_grad)  # partitioned again
    print("zero3 ok", denv.rank, flush=True)
""")


def test_zero3_partitions_backbone_copies_mlp_and_exports_full_weights(tmp_path):
    backbone = make_backbone("gpt2", "tiny", tmp_path / "bb")
    # DeepSpeed keeps parameters under 1e5 elements whole after the first step; every tiny-model tensor is
    # that small, so persistence is switched off to make ZeRO-3 partition (and the export gather) everything
    extra_ds = tmp_path / "ds.json"
    extra_ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), CONFIG, str(backbone), str(extra_ds)],
            env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"zero3 ok {r}" in out, "\n".join(o[-3000:] for o in outs)


def test_zero3_reads_whole_small_parameters_in_place(engine_inputs, tmp_path):
    """With DeepSpeed's default persistence, ZeRO-3 keeps small tensors whole; the fused LM loss reads the tied head
    (Llama tiny: a 746 x 64 embedding) while the embedding's own module holds it, and must leave it so (gathering and
    re-partitioning it there stopped the first step)."""
    llama = make_backbone("llama", "tiny", tmp_path / "llama")
    run_dir = tmp_path / "run"
    args = base_args(engine_inputs, run_dir, "train.zero_stage=3", "train.epochs=1", f"model.backbone={llama}",
                     "model.loss.lambda_lm=0.5")
    r = run_cli("train", args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert all(row["lm"] > 0 for row in history(run_dir))
