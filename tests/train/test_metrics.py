import json
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from fusion_dist.metrics import MOSI_NAMES, SIMS_NAMES, json_safe, mmsa_metrics


# --- independent re-implementation of the MMSA reference formulas (SPEC 4.1), MMSA's style ---
def mmsa_mosi_reference(p, t):
    def multiclass_acc(a, b):
        return np.sum(np.round(a) == np.round(b)) / float(len(b))

    non_zeros = np.array([i for i, e in enumerate(t) if e != 0])
    binary_truth, binary_preds = t >= 0, p >= 0
    res = {
        "Has0_acc_2": accuracy_score(binary_preds, binary_truth),
        "Has0_F1_score": f1_score(binary_truth, binary_preds, average="weighted"),
        "Non0_acc_2": accuracy_score(p[non_zeros] > 0, t[non_zeros] > 0),
        "Non0_F1_score": f1_score(t[non_zeros] > 0, p[non_zeros] > 0, average="weighted"),
        "Mult_acc_5": multiclass_acc(np.clip(p, -2.0, 2.0), np.clip(t, -2.0, 2.0)),
        "Mult_acc_7": multiclass_acc(np.clip(p, -3.0, 3.0), np.clip(t, -3.0, 3.0)),
        "MAE": np.mean(np.absolute(p - t)).astype(np.float64),
        "Corr": np.corrcoef(p, t)[0][1],
    }
    return {k: round(float(v), 4) for k, v in res.items()}


def mmsa_sims_reference(p, t):
    p, t = np.clip(p, -1.0, 1.0), np.clip(t, -1.0, 1.0)

    def classes(x, ms):
        out = x.copy()
        for i in range(len(ms) - 1):
            out[np.logical_and(x > ms[i], x <= ms[i + 1])] = i
        return out

    ms2, ms3, ms5 = [-1.01, 0.0, 1.01], [-1.01, -0.1, 0.1, 1.01], [-1.01, -0.7, -0.1, 0.1, 0.7, 1.01]
    acc = lambda a, b: np.sum(np.round(a) == np.round(b)) / float(len(b))  # noqa: E731
    res = {
        "Mult_acc_2": acc(classes(p, ms2), classes(t, ms2)),
        "Mult_acc_3": acc(classes(p, ms3), classes(t, ms3)),
        "Mult_acc_5": acc(classes(p, ms5), classes(t, ms5)),
        "F1_score": f1_score(classes(t, ms2), classes(p, ms2), average="weighted"),
        "MAE": np.mean(np.absolute(p - t)).astype(np.float64),
        "Corr": np.corrcoef(p, t)[0][1],
    }
    return {k: round(float(v), 4) for k, v in res.items()}


def test_weighted_f1_equals_sklearn_on_random_classes():
    from fusion_dist.metrics import _weighted_f1

    rng = np.random.default_rng(0)
    for n, k in [(1, 2), (7, 2), (50, 3), (200, 5)]:
        truth, pred = rng.integers(0, k, n), rng.integers(0, k + 1, n)  # a class only ever predicted, too
        assert _weighted_f1(truth, pred) == pytest.approx(f1_score(truth, pred, average="weighted", zero_division=0))
        assert _weighted_f1(truth, truth) == 1.0


# --- hand-computed values ---
def test_mosi_hand_computed_with_zero_label_and_half_to_even():
    t = np.array([0.0, 1.5, -2.5, 3.4, -0.4])
    p = np.array([-0.2, 2.5, -1.0, 2.6, 0.5])
    m = mmsa_metrics(p, t, "mosi")
    assert list(m) == MOSI_NAMES
    # Has0: t>=0 -> [T,T,F,T,F]; p>=0 -> [F,T,F,T,T]: 3 of 5 agree
    assert m["Has0_acc_2"] == pytest.approx(3 / 5)
    # Non0 drops t==0: t>0 [T,F,T,F], p>0 [T,F,T,T] -> 3 of 4
    assert m["Non0_acc_2"] == pytest.approx(3 / 4)
    # Acc7: clip to 3: t -> round[0,1.5,-2.5,3,-0.4] = [0,2,-2,3,-0] (half to even: 1.5->2, -2.5->-2)
    #       p -> round[-0.2,2.5,-1,2.6,0.5] = [-0,2,-1,3,0] -> matches: 0,1,3,4 -> 4/5
    assert m["Mult_acc_7"] == pytest.approx(4 / 5)
    # Acc5: clip to 2: t -> [0,1.5,-2,2,-0.4] -> [0,2,-2,2,-0]; p -> [-0.2,2,-1,2,0.5] -> [-0,2,-1,2,0] -> 4/5
    assert m["Mult_acc_5"] == pytest.approx(4 / 5)
    assert m["MAE"] == pytest.approx((0.2 + 1.0 + 1.5 + 0.8 + 0.9) / 5)
    # weighted F1 by hand for Non0: truth [T,F,T,F], pred [T,F,T,T]
    # class T: prec 2/3 rec 1 f1 0.8; class F: prec 1 rec 1/2 f1 2/3; weights 2/4 each
    assert m["Non0_F1_score"] == pytest.approx(0.5 * 0.8 + 0.5 * (2 / 3))
    pc, tc = p - p.mean(), t - t.mean()
    assert m["Corr"] == pytest.approx((pc @ tc) / math.sqrt((pc @ pc) * (tc @ tc)))


def test_round_half_to_even_changes_acc7():
    # 0.5 rounds to 0 and 1.5 to 2 (numpy), so p=0.5 matches t=0.4 but p=1.5 does not match t=1.4
    m = mmsa_metrics([0.5, 1.5], [0.4, 1.4], "mosi")
    assert m["Mult_acc_7"] == 0.5


def test_sims_hand_computed_bins_are_half_open():
    t = np.array([0.0, 0.1, -0.1, 0.7, -1.5, 1.0])
    p = np.array([0.05, 0.1001, -0.1, 0.69, -0.8, 2.0])
    m = mmsa_metrics(p, t, "sims")
    assert list(m) == SIMS_NAMES
    # 2 classes (-1.01,0],(0,1.01]: t -> [0,1,0,1,0,1]; p -> [1,1,0,1,0,1] -> 5/6
    assert m["Mult_acc_2"] == pytest.approx(5 / 6)
    # 3 classes: t -> [1,1,0,2,0,2]; p -> [1,2,0,2,0,2] -> 5/6 (0.1 is in (-0.1,0.1], 0.1001 is not)
    assert m["Mult_acc_3"] == pytest.approx(5 / 6)
    # 5 classes: t -> [2,2,1,3,0,4]; p -> [2,3,1,3,0,4] -> 5/6 (0.7 in (0.1,0.7], 0.69 too)
    assert m["Mult_acc_5"] == pytest.approx(5 / 6)
    # MAE on clipped values: |0.05|,|0.0001|,0,0.01,|-0.8+1|=0.2,|1-1|=0
    assert m["MAE"] == pytest.approx((0.05 + 0.0001 + 0 + 0.01 + 0.2 + 0) / 6)


def test_constant_predictions_give_nan_corr_and_json_null():
    m = mmsa_metrics([0.3, 0.3, 0.3], [1.0, -1.0, 2.0], "mosi")
    assert math.isnan(m["Corr"])
    text = json.dumps(json_safe({"test": m}), allow_nan=False)
    assert json.loads(text)["test"]["Corr"] is None


def test_all_labels_zero_non0_is_nan():
    m = mmsa_metrics([0.3, -0.3], [0.0, 0.0], "mosi")
    assert math.isnan(m["Non0_acc_2"]) and math.isnan(m["Non0_F1_score"])
    assert m["Has0_acc_2"] == 0.5


def test_bad_input():
    with pytest.raises(ValueError):
        mmsa_metrics([1.0], [1.0, 2.0], "mosi")
    with pytest.raises(ValueError):
        mmsa_metrics([1.0], [1.0], "imdb")


@pytest.mark.parametrize("seed", range(5))
def test_rounded_values_equal_mmsa_reference(seed):
    rng = np.random.default_rng(seed)
    n = 200
    t = np.round(rng.uniform(-3, 3, n) * 3) / 3  # MOSI-like thirds, includes exact 0 and .5-ish ties
    t[:7] = 0.0
    p = t + rng.normal(0, 0.8, n)
    p[7:12] = [0.5, -0.5, 1.5, -2.5, 2.5]
    ours = mmsa_metrics(p, t, "mosi")
    assert {k: round(v, 4) for k, v in ours.items()} == mmsa_mosi_reference(p, t)

    ts = np.round(rng.uniform(-1, 1, n) * 5) / 5
    ts[:5] = [0.0, 0.1, -0.1, 0.7, -0.7]
    ps = ts + rng.normal(0, 0.3, n)
    ps[5:10] = [0.0, 0.1, -0.1, 0.7, -0.7]
    ours = mmsa_metrics(ps, ts, "sims")
    assert {k: round(v, 4) for k, v in ours.items()} == mmsa_sims_reference(ps, ts)


def test_metrics_json_says_how_its_std_and_accuracies_are_computed():
    from fusion_dist.rundir import summarize

    results = {s: {"valid": {"MAE": v}, "test": {"MAE": v, "Has0_acc_2": 0.8, "Non0_acc_2": 0.82}}
               for s, v in ((0, 0.5), (1, 0.7), (2, 0.9))}
    summary = summarize(results, "mosi")
    assert summary["std"]["test"]["MAE"] == pytest.approx(0.2)  # ddof=1: sqrt(((-.2)^2 + 0 + .2^2) / 2)
    assert "ddof=1" in summary["notes"]["std"] and "Has0_*" in summary["notes"]["Acc2/F1"]
    assert "Non0_*" in summary["notes"]["Acc2/F1"] and "ddof=1" in summarize(results, "sims")["notes"]["std"]
