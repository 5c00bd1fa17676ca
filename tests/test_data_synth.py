"""Synthetic MMSA pickles: exact layout, reproducible bytes, and a planted signal that needs all modalities."""

import hashlib
import pickle

import numpy as np
import pytest

from data_prep import mmsa, synth
from fusion_dist.cli import main as cli


@pytest.mark.parametrize("dataset", ["mosi", "mosei", "sims"])
def test_layout_matches_mmsa_unaligned(tmp_path, dataset):
    out = tmp_path / f"{dataset}.pkl"
    assert cli(["synth", "--dataset", dataset, "--out", str(out), "--samples", "12", "--seed", "3"]) == 0
    data = mmsa.load_pickle(str(out))  # the restricted unpickler accepts it
    _, (la, da), (lv, dv), lt, r, _ = synth.SHAPES[dataset]
    assert set(data) == {"train", "valid", "test"}
    for split in data.values():
        n = len(split["id"])
        assert split["audio"].shape == (n, la, da) and split["audio"].dtype == np.float32
        assert split["vision"].shape == (n, lv, dv) and split["vision"].dtype == np.float32
        assert split["text_bert"].shape == (n, 3, lt) and split["text"].shape[:2] == (n, lt)
        assert split["regression_labels"].shape == (n,) and np.abs(split["regression_labels"]).max() <= r
        assert all("$_$" in i for i in split["id"]) and all(isinstance(t, str) for t in split["raw_text"])
        assert {"annotations", "classification_labels"} <= set(split)
        assert (("regression_labels_T" in split) == (dataset == "sims"))
        for mod in ("audio", "vision"):
            lengths = split[f"{mod}_lengths"]
            assert ((lengths >= 1) & (lengths <= split[mod].shape[1])).all()
            for i, length in enumerate(lengths):
                assert not split[mod][i, length:].any()  # zero padding past the true length
    audio = np.concatenate([s["audio"] for s in data.values()])
    assert np.isneginf(audio).any() and not np.isnan(audio).any()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    digests = []
    for seed, name in [(5, "a"), (5, "b"), (6, "c")]:
        out = tmp_path / f"{name}.pkl"
        synth.main(["--dataset", "mosi", "--out", str(out), "--samples", "20", "--seed", str(seed)])
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1] != digests[2]


def _r2(x, y):
    x = np.column_stack([x, np.ones(len(y))])
    resid = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    return 1 - resid.var() / y.var()


def test_planted_signal_needs_text_and_av():
    split = synth.synth("mosi", 800, seed=0)["train"]
    y = split["regression_labels"].astype(np.float64)
    pos = np.array([sum(w in synth.POSITIVE for w in t.split()) for t in split["raw_text"]])
    neg = np.array([sum(w in synth.NEGATIVE for w in t.split()) for t in split["raw_text"]])
    text = (pos - neg) / (pos + neg)

    def mean_frames(mod):
        x = np.where(np.isneginf(split[mod]), 0, split[mod])
        return x.sum(1) / split[f"{mod}_lengths"][:, None]

    av = np.column_stack([mean_frames("audio"), mean_frames("vision")])
    r2_text, r2_av = _r2(text[:, None], y), _r2(av, y)
    r2_additive = _r2(np.column_stack([text, av]), y)
    r2_all = _r2(np.column_stack([text, av, np.abs(text)[:, None] * av]), y)
    assert r2_text > 0.3 and r2_av > 0.05
    assert r2_all > r2_additive + 0.04  # the text x AV interaction carries signal of its own
    assert r2_all > r2_text + 0.3 and r2_all > r2_av + 0.3 and r2_all > 0.95
