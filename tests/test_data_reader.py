"""Reader side: rank sampling (disjoint, exactly-once for eval, resumable), collate shapes/masks, mmap."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from fusion_dist.cli import main as cli
from fusion_dist.data import Collator, RankSampler, ShardDataset


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (2, 4)])
def test_eval_sampler_exactly_once(n, world):
    parts = [list(RankSampler(n, r, world, shuffle=False, seed=0)) for r in range(world)]
    assert sorted(sum(parts, [])) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("n,world,drop_last", [(10, 2, False), (11, 2, False), (11, 2, True), (7, 3, False)])
def test_train_sampler_disjoint_equal_and_reshuffled(n, world, drop_last):
    samplers = [RankSampler(n, r, world, shuffle=True, seed=4, drop_last=drop_last) for r in range(world)]
    parts = [list(s) for s in samplers]
    assert len({len(p) for p in parts}) == 1  # ranks step together
    flat = sum(parts, [])
    if drop_last:
        assert len(set(flat)) == len(flat) == n // world * world
    else:
        assert set(flat) == set(range(n)) and len(flat) - n < world  # padding repeats fewer than `world` indices
    if n % world == 0:
        assert len(set(flat)) == len(flat)  # no repeats when nothing needs padding
    again = [list(RankSampler(n, r, world, shuffle=True, seed=4, drop_last=drop_last)) for r in range(world)]
    assert again == parts  # deterministic from seed + epoch
    for s in samplers:
        s.set_epoch(1)
    assert [list(s) for s in samplers] != parts


@pytest.mark.parametrize("n", [48, 53])
def test_train_sampler_same_micro_batches_on_any_world_size(n):
    """Micro-batch a of step s on rank r is order[s*G + (a*W + r)*m :][:m]: a step's micro-batches are the
    same whether 1 rank accumulates them all or W ranks share them."""
    m, global_batch = 3, 12

    def steps(world):
        accum = global_batch // (m * world)
        ranks = [RankSampler(n, r, world, shuffle=True, seed=7, drop_last=True, chunk=m).indices() for r in range(world)]
        micro = [[idx[i : i + m] for i in range(0, len(idx), m)] for idx in ranks]
        n_steps = len(micro[0]) // accum
        return [sorted(tuple(mb) for r in range(world) for mb in micro[r][s * accum : (s + 1) * accum])
                for s in range(n_steps)]

    one = steps(1)
    assert len(one) == n // global_batch  # the incomplete final global batch is dropped
    assert steps(2) == one and steps(4) == one
    order = np.random.default_rng(7).permutation(n).tolist()
    assert RankSampler(n, 1, 2, shuffle=True, seed=7, drop_last=True, chunk=m).indices()[:m] == order[m : 2 * m]
    parts = [list(RankSampler(n, r, 2, shuffle=False, seed=0, chunk=m)) for r in range(2)]
    assert sorted(sum(parts, [])) == list(range(n))  # evaluation: exactly once with chunks too


def test_start_at_resumes_mid_epoch():
    s = RankSampler(20, 1, 2, shuffle=True, seed=0)
    s.set_epoch(3)
    full = list(s)
    s.start_at(4)
    assert len(s) == len(full) - 4
    assert list(s) == full[4:]
    assert list(s) == full  # only the next pass is shortened


def _sample(la, lv, label, text="hi"):
    return {"id": f"x{la}", "raw_text": text, "audio": np.ones((la, 3), np.float32),
            "vision": np.full((lv, 2), 2, np.float32), "label": label}


def test_collate_pads_and_masks():
    batch = Collator()([_sample(4, 1, 1.0), _sample(2, 3, -0.5), _sample(0, 2, 0.0)])
    assert batch["audio"].shape == (3, 4, 3) and batch["audio"].dtype == torch.float32
    assert batch["vision"].shape == (3, 3, 2)
    assert batch["audio_lengths"].tolist() == [4, 2, 1]  # a 0-frame sample keeps one zero frame
    assert batch["audio_mask"].tolist() == [[True] * 4, [True, True, False, False], [True, False, False, False]]
    assert batch["audio"][1, 2:].abs().sum() == 0 and batch["audio"][2].abs().sum() == 0
    assert batch["vision_mask"].sum(1).tolist() == [1, 3, 2]
    assert batch["label"].dtype == torch.float32 and batch["label"].tolist() == [1.0, -0.5, 0.0]
    assert batch["ids"] == ["x4", "x2", "x0"] and "input_ids" not in batch


class CharTokenizer:
    """A minimal HF-like tokenizer: one id per character, no special tokens added."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, truncation, max_length):
        return {"input_ids": [ord(c) for c in text][:max_length]}


def test_collate_tokenizes_truncates_and_fills_empty():
    batch = Collator(CharTokenizer(), max_text_tokens=5)([_sample(1, 1, 0, "abcdefgh"), _sample(1, 1, 0, "")])
    assert batch["input_ids"].tolist() == [[97, 98, 99, 100, 101], [1, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 0, 0, 0, 0]]
    assert batch["input_ids"].dtype == torch.int64


def test_dataset_is_memory_mapped_and_loads_in_workers(tmp_path):
    src = tmp_path / "mosi.pkl"
    assert cli(["synth", "--dataset", "mosi", "--out", str(src), "--samples", "40"]) == 0
    assert cli(["prepare", str(src), str(tmp_path / "shards"), "--rows-per-shard", "8"]) == 0
    ds = ShardDataset(str(tmp_path / "shards"), "train")
    before = pa.total_allocated_bytes()
    rows = [ds[i] for i in range(len(ds))]
    assert pa.total_allocated_bytes() - before < 1 << 16  # no shard copied into Arrow memory
    assert not rows[0]["audio"].flags.writeable and not rows[0]["audio"].flags.owndata  # views over the map
    sampler = RankSampler(len(ds), 0, 2, shuffle=False, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=Collator(), num_workers=1)
    ids = [i for b in loader for i in b["ids"]]
    assert ids == [rows[i]["id"] for i in sampler.indices()]
    with pytest.raises(Exception, match="no split 'dev'"):
        ShardDataset(str(tmp_path / "shards"), "dev")
