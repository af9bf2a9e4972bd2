import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmv.eval.features import RowSelection
from mmv.eval.metrics import auroc
from mmv.eval.probe import evaluate_probe, fit_linear_probe, paired_macro_auroc_difference

NUM_FEATURES = 24


def planted_data(rng, num_rows, weights, signal):
    """Features far from standardised (offset and scale), labels drawn from a planted logistic model."""
    features = rng.normal(size=(num_rows, NUM_FEATURES))
    logits = features @ weights if signal else rng.normal(size=(num_rows, weights.shape[1]))
    labels = (rng.random(logits.shape) < 1 / (1 + np.exp(-logits))).astype(float)
    return (features * 4.0 + 10.0).astype(np.float32), labels


def splits(signal, seed=0):
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(NUM_FEATURES, 3)) * 1.5
    train, val, test = (planted_data(rng, n, weights, signal) for n in (1500, 500, 800))
    train[1][rng.random(train[1].shape) < 0.15] = np.nan
    return train, val, test


def test_probe_recovers_planted_signal():
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits(signal=True)
    probe = fit_linear_probe(train_x, train_y, val_x, val_y, label_names=("a", "b", "c"), progress=False)
    evaluation = evaluate_probe(probe, test_x, test_y, num_resamples=200)
    assert np.all(evaluation.auroc > 0.9)
    assert evaluation.macro_auroc == pytest.approx(evaluation.auroc.mean())
    assert np.all(evaluation.interval.per_label[:, 0] < evaluation.auroc)
    assert probe.skipped == {}
    assert evaluation.scores.shape == test_y.shape
    np.testing.assert_allclose(probe.predict_proba(test_x), 1 / (1 + np.exp(-evaluation.scores)), rtol=1e-12)


def test_noise_gets_stronger_l2_than_signal():
    (train_x, train_y), (val_x, val_y), _ = splits(signal=True)
    signal_probe = fit_linear_probe(train_x, train_y, val_x, val_y, progress=False)
    (train_x, train_y), (val_x, val_y), _ = splits(signal=False)
    noise_probe = fit_linear_probe(train_x, train_y, val_x, val_y, progress=False)
    assert np.all(noise_probe.l2 > signal_probe.l2)
    assert np.all(noise_probe.l2 >= 1.0)


def test_probe_is_deterministic_and_reads_row_selections_and_tensors():
    (train_x, train_y), (val_x, val_y), (test_x, _) = splits(signal=True)
    first = fit_linear_probe(train_x, train_y, val_x, val_y, progress=False)
    padded = np.concatenate([np.zeros((5, NUM_FEATURES), np.float32), train_x])
    second = fit_linear_probe(
        RowSelection(padded, np.arange(5, 5 + len(train_x))), train_y, torch.from_numpy(val_x), val_y,
        progress=False,
    )
    np.testing.assert_array_equal(first.weight, second.weight)
    np.testing.assert_array_equal(first.l2, second.l2)
    np.testing.assert_array_equal(first.predict_proba(test_x), second.predict_proba(torch.from_numpy(test_x)))


def test_select_by_auroc_picks_best_validation_auroc():
    (train_x, train_y), (val_x, val_y), _ = splits(signal=True)
    probe = fit_linear_probe(train_x, train_y, val_x, val_y, select_by="auroc", progress=False)
    for j in range(3):
        chosen = probe.l2_grid.index(probe.l2[j])
        assert probe.validation_auroc[chosen, j] == np.nanmax(probe.validation_auroc[:, j])
    assert set(probe.selected_by) == {"validation AUROC"}


def test_label_without_both_classes_is_skipped_not_scored():
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits(signal=True)
    train_y[:, 1] = np.where(np.isnan(train_y[:, 1]), np.nan, 1.0)
    probe = fit_linear_probe(train_x, train_y, val_x, val_y, label_names=("a", "b", "c"), progress=False)
    assert list(probe.skipped) == ["b"]
    assert math.isnan(probe.l2[1])
    evaluation = evaluate_probe(probe, test_x, test_y, num_resamples=50)
    assert np.isnan(evaluation.scores[:, 1]).all() and math.isnan(evaluation.auroc[1])
    assert evaluation.macro_auroc == pytest.approx(np.mean(evaluation.auroc[[0, 2]]))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(train_labels=a["train_labels"][:-1]), "train_labels must have shape"),
        (lambda a: a.update(val_features=a["val_features"][:, :-1]), "val_features must have 24 columns"),
        (lambda a: a.update(val_labels=a["val_labels"][:, :2]), "val_labels must have 3 columns"),
        (lambda a: a.update(train_features=a["train_features"][0]), "train_features must be a 2-D"),
        (lambda a: a.update(l2_grid=(1.0, -1.0)), "l2_grid must hold positive"),
        (lambda a: a.update(select_by="accuracy"), "select_by must be"),
        (lambda a: a.update(label_names=("a",)), "label_names must name 3 labels"),
        (lambda a: a["train_features"].__setitem__((3, 3), np.nan), "train_features must be finite"),
    ],
)
def test_bad_arguments_are_named(change, message):
    (train_x, train_y), (val_x, val_y), _ = splits(signal=True)
    arguments = dict(train_features=train_x, train_labels=train_y, val_features=val_x, val_labels=val_y)
    change(arguments)
    with pytest.raises(ValueError, match=message):
        fit_linear_probe(**arguments, progress=False)


def test_probe_weights_match_a_newton_solution():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(1000, 8)) * 3.0 + 1.0
    labels = (rng.random(1000) < 1 / (1 + np.exp(-(features - 1.0) @ rng.normal(size=8)))).astype(float)
    l2 = 0.01
    probe = fit_linear_probe(
        features.astype(np.float32), labels, features[:50], labels[:50], l2_grid=(l2,), progress=False
    )
    # Newton's method in float64 on the same objective: mean cross-entropy + l2/2 |w|^2 on standardised features.
    design = np.c_[(features - features.mean(0)) / features.std(0), np.ones(1000)]
    penalty = np.diag([l2] * 8 + [0.0])
    solution = np.zeros(9)
    for _ in range(25):
        probabilities = 1 / (1 + np.exp(-design @ solution))
        gradient = design.T @ (probabilities - labels) / 1000 + penalty @ solution
        hessian = design.T @ (design * (probabilities * (1 - probabilities))[:, None]) / 1000 + penalty
        solution -= np.linalg.solve(hessian, gradient)
    np.testing.assert_allclose(probe.weight[:, 0], solution[:8], atol=1e-4)
    assert probe.bias[0] == pytest.approx(solution[8], abs=1e-4)


def _evaluation(scores, labels):
    return SimpleNamespace(scores=scores, labels=labels, auroc=np.atleast_1d(auroc(scores, labels)))


def test_paired_macro_auroc_difference_is_the_macro_gap_with_a_paired_interval():
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 3)) < 0.5).astype(np.float64)
    informative = _evaluation(labels + 0.8 * rng.standard_normal(labels.shape), labels)
    noise = _evaluation(rng.standard_normal(labels.shape), labels)

    same = paired_macro_auroc_difference(informative, informative, seed=1, num_resamples=200)
    assert same["macro_auroc"] == 0.0 and same["interval"] == [0.0, 0.0]

    gap = paired_macro_auroc_difference(informative, noise, seed=1, num_resamples=200)
    expected = informative.auroc.mean() - noise.auroc.mean()
    assert gap["macro_auroc"] == pytest.approx(expected)
    low, high = gap["interval"]
    assert 0.0 < low < expected < high
    assert paired_macro_auroc_difference(noise, informative, seed=1, num_resamples=200)["macro_auroc"] == pytest.approx(-expected)

    with pytest.raises(ValueError, match="same test rows"):
        paired_macro_auroc_difference(informative, _evaluation(noise.scores, 1.0 - labels), seed=1)
    with pytest.raises(ValueError, match="num_resamples"):
        paired_macro_auroc_difference(informative, noise, seed=1, num_resamples=0)
