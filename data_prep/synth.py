"""``fusion-dist synth``: planted-signal data in the exact MMSA unaligned pickle layout (SPEC 2.1).

Layout per split (``train``/``valid``/``test``), N samples, as in MMSA's ``unaligned_*.pkl``:
``raw_text`` (N,) str, ``id`` (N,) ``"<video>$_$<clip>"``, ``audio`` (N, L_a, D_a) and ``vision``
(N, L_v, D_v) float32 zero-padded past ``audio_lengths``/``vision_lengths`` (N,) int64,
``regression_labels`` (N,) float32 (+ ``regression_labels_T/_A/_V`` for SIMS), and the fields the models
ignore, kept so the file looks like the real one: ``text`` (N, L_t, d_text) float32 token features
(real files: BERT, d_text 768; here ``--text-dim``, default 16, to keep files small), ``text_bert``
(N, 3, L_t) float32 (token ids, attention mask, segment ids), ``annotations`` (N,) str and
``classification_labels`` (N,) float32 (0 negative, 1 neutral, 2 positive). Audio carries ``-inf``
values inside the real frames, as COVAREP features do.

Generative model (all draws from ``numpy.random.default_rng(seed)``, so a seed fixes every byte):

- text: 1-3 sentiment words (each positive with probability (1 + s_t) / 2, s_t ~ U(-1, 1)) placed among
  neutral filler words; ``text_score = (#positive - #negative) / #sentiment words`` in [-1, 1].
- audio / vision: true length ~ U(L/4, L); frames = N(0, 1) noise + s_m * u_m with s_m ~ U(-1, 1) and u_m
  a fixed random unit direction per modality; ``m_score = mean over the true frames (after -inf -> 0) . u_m``
  (so the score is an exact function of what the reader sees).
- ``av_score = (audio_score + vision_score) / 2``;
  ``y = 0.45 text + 0.1 audio + 0.1 vision + 1.0 |text| * av_score + N(0, 0.05)``, times R / 1.2, clipped to
  [-R, R] and rounded to MMSA's label grid (R = 3 and steps of 0.2 / 1/3 for MOSI / MOSEI; R = 1 and steps of
  0.2 for SIMS, whose unimodal labels are the clipped R * text / audio / vision scores). The interaction
  term (AV counts more when the words carry sentiment) needs text and AV together, so a model that fuses
  all modalities beats unimodal ones; y is odd in (text, audio, vision), so labels are symmetric around 0.
"""

from __future__ import annotations

import argparse
import pickle

import fsspec
import numpy as np

from fusion_dist.errors import UserError

# name: (real split sizes, (L_a, D_a), (L_v, D_v), text length, label range R, label step)
SHAPES = {
    "mosi": ((1284, 229, 686), (375, 5), (500, 20), 50, 3.0, 0.2),
    "mosei": ((16326, 1871, 4659), (500, 74), (500, 35), 50, 3.0, 1 / 3),
    "sims": ((1368, 456, 457), (400, 33), (55, 709), 39, 1.0, 0.2),
}
POSITIVE = ["good", "great", "love", "excellent", "happy", "best", "wonderful", "enjoyed"]
NEGATIVE = ["bad", "terrible", "hate", "awful", "boring", "worst", "sad", "disappointing"]
FILLER = ["the", "movie", "was", "i", "it", "and", "really", "just", "a", "story", "actor", "think", "kind",
          "of", "plot", "scene", "um", "so", "this", "that", "with", "then", "he", "she"]
WEIGHTS = {"text": 0.45, "audio": 0.1, "vision": 0.1, "interaction": 1.0}
INF_RATE = 0.002  # fraction of real audio values set to -inf


def split_sizes(dataset: str, samples: int) -> dict[str, int]:
    """Scale the real train/valid/test proportions to ``samples`` in total (each split >= 2)."""
    real = np.array(SHAPES[dataset][0], dtype=np.float64)
    sizes = np.maximum(2, np.floor(real / real.sum() * samples)).astype(int)
    sizes[0] = max(2, samples - sizes[1:].sum())
    return dict(zip(("train", "valid", "test"), map(int, sizes)))


def _text(rng: np.random.Generator, text_len: int) -> tuple[str, float]:
    s_t = rng.uniform(-1, 1)
    k = int(rng.integers(1, 4))
    positive = rng.random(k) < (1 + s_t) / 2
    words = [str(rng.choice(POSITIVE if p else NEGATIVE)) for p in positive]
    n_words = int(rng.integers(k + 3, min(text_len, 20)))
    sentence = [str(w) for w in rng.choice(FILLER, n_words - k)]
    for w in words:
        sentence.insert(int(rng.integers(0, len(sentence) + 1)), w)
    return " ".join(sentence), float((positive.sum() - (~positive).sum()) / k)


def _frames(rng, length: int, padded: int, dim: int, direction: np.ndarray, with_inf: bool):
    out = np.zeros((padded, dim), dtype=np.float32)
    s = rng.uniform(-1, 1)
    out[:length] = rng.standard_normal((length, dim)) + s * direction
    if with_inf:
        out[:length][rng.random((length, dim)) < INF_RATE] = -np.inf
    real = np.where(np.isneginf(out[:length]), 0.0, out[:length])
    return out, float(real.mean(axis=0) @ direction)


def make_split(rng, dataset: str, n: int, split: str, text_dim: int, directions) -> dict[str, np.ndarray]:
    _, (la, da), (lv, dv), lt, r, step = SHAPES[dataset]
    audio = np.zeros((n, la, da), dtype=np.float32)
    vision = np.zeros((n, lv, dv), dtype=np.float32)
    a_len = rng.integers(max(1, la // 4), la + 1, size=n)
    v_len = rng.integers(max(1, lv // 4), lv + 1, size=n)
    raw_text, scores = [], np.zeros((n, 3))
    for i in range(n):
        sentence, scores[i, 0] = _text(rng, lt)
        raw_text.append(sentence)
        audio[i], scores[i, 1] = _frames(rng, a_len[i], la, da, directions[0], with_inf=True)
        vision[i], scores[i, 2] = _frames(rng, v_len[i], lv, dv, directions[1], with_inf=False)
    t, a, v = scores.T
    y = (WEIGHTS["text"] * t + WEIGHTS["audio"] * a + WEIGHTS["vision"] * v
         + WEIGHTS["interaction"] * np.abs(t) * (a + v) / 2 + rng.normal(0, 0.05, n))

    def to_label(x):
        return (np.round(np.clip(x * r / 1.2, -r, r) / step) * step + 0.0).astype(np.float32)  # + 0.0: no -0.0

    label = to_label(y)
    tokens = np.zeros((n, 3, lt), dtype=np.float32)
    for i, sentence in enumerate(raw_text):
        ids = [101] + [1000 + (sum(map(ord, w)) * 31) % 20000 for w in sentence.split()][: lt - 2] + [102]
        tokens[i, 0, : len(ids)] = ids
        tokens[i, 1, : len(ids)] = 1
    text_feats = rng.standard_normal((n, lt, text_dim)).astype(np.float32) * tokens[:, 1, :, None]
    out = {
        "raw_text": np.array(raw_text, dtype=object),
        "audio": audio,
        "vision": vision,
        "audio_lengths": a_len.astype(np.int64),
        "vision_lengths": v_len.astype(np.int64),
        "id": np.array([f"{split}{i // 8:04d}$_${i % 8 + 1}" for i in range(n)], dtype=object),
        "text": text_feats,
        "text_bert": tokens,
        "regression_labels": label,
        "classification_labels": (np.sign(label) + 1).astype(np.float32),
        "annotations": np.array([("Negative", "Neutral", "Positive")[int(c)] for c in np.sign(label) + 1], dtype=object),
    }
    if dataset == "sims":
        for key, score in zip("TAV", (t, a, v)):
            out[f"regression_labels_{key}"] = to_label(score * 1.2)
    return out


def synth(dataset: str, samples: int, seed: int, text_dim: int = 16) -> dict[str, dict[str, np.ndarray]]:
    if dataset not in SHAPES:
        raise UserError(f"--dataset: unknown dataset '{dataset}'; choose from {sorted(SHAPES)}")
    if samples < 6:
        raise UserError(f"--samples: need at least 6 samples (2 per split), got {samples}")
    rng = np.random.default_rng(seed)
    directions = []
    for dim in (SHAPES[dataset][1][1], SHAPES[dataset][2][1]):
        u = rng.standard_normal(dim)
        directions.append((u / np.linalg.norm(u)).astype(np.float32))
    return {split: make_split(rng, dataset, n, split, text_dim, directions)
            for split, n in split_sizes(dataset, samples).items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fusion-dist synth", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(SHAPES), help="which MMSA file's shapes to mimic")
    parser.add_argument("--out", required=True, help="output pickle (local path or fsspec URL)")
    parser.add_argument("--samples", type=int, default=1000, help="total samples, split like the real dataset (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    parser.add_argument("--text-dim", type=int, default=16, help="width of the unused 'text' features (real files: 768)")
    args = parser.parse_args(argv)
    data = synth(args.dataset, args.samples, args.seed, args.text_dim)
    with fsspec.open(args.out, "wb", auto_mkdir=True) as f:
        pickle.dump(data, f, protocol=4)
    sizes = {s: len(d["id"]) for s, d in data.items()}
    print(f"synth: wrote {args.out} ({args.dataset}-shaped, splits {sizes}, seed {args.seed})")
    return 0
