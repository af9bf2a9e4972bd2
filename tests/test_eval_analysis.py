import numpy as np
import pytest

from mmv.eval.analysis import (
    LabelledFeatures,
    analyse_modalities,
    classify_modality,
    covariance_alignment,
    cross_modal_transfer,
    linear_cka,
    principal_angles,
    principal_subspace,
    split_subspaces,
)

NUM_FEATURES = 20


def random_rotation(rng, size):
    q, r = np.linalg.qr(rng.normal(size=(size, size)))
    return q * np.sign(np.diag(r))


def planted_modalities(rng, num_rows=500):
    """Both modalities vary along 3 shared directions; A also along 2 of its own, B along 2 others.

    The planted directions are columns of a random rotation, so nothing lines up with the axes.
    """
    basis = random_rotation(rng, NUM_FEATURES)
    shared, specific_a, specific_b, offset = basis[:, :3], basis[:, 3:5], basis[:, 5:7], basis[:, 7]

    def modality(specific, shift):
        features = rng.normal(size=(num_rows, 3)) * [4.0, 3.0, 2.5] @ shared.T
        features += rng.normal(size=(num_rows, 2)) * 3.0 @ specific.T
        features += rng.normal(size=(num_rows, NUM_FEATURES)) * 0.05 + shift * offset
        return features.astype(np.float32)

    return modality(specific_a, 0.0), modality(specific_b, 2.0), (shared, specific_a, specific_b)


def projector(basis):
    return basis @ basis.T


def test_analysis_finds_planted_shared_and_specific_directions():
    rng = np.random.default_rng(0)
    features_a, features_b, (shared, specific_a, specific_b) = planted_modalities(rng)
    analysis = analyse_modalities(features_a, features_b, seed=0)
    assert analysis.ranks == (5, 5)
    np.testing.assert_allclose(np.sort(analysis.subspaces.angles_deg), [0, 0, 0, 90, 90], atol=3.0)
    assert np.linalg.norm(projector(analysis.subspaces.shared) - projector(shared), 2) < 0.05
    assert np.linalg.norm(projector(analysis.subspaces.specific_a) - projector(specific_a), 2) < 0.05
    assert np.linalg.norm(projector(analysis.subspaces.specific_b) - projector(specific_b), 2) < 0.05
    # Shared: 4^2 + 3^2 + 2.5^2 = 31.25 of each modality's variance 31.25 + 18 = 49.25.
    np.testing.assert_allclose(analysis.variance_shares[:, 0], 31.25 / 49.25, atol=0.05)
    np.testing.assert_allclose(analysis.variance_shares[0, 1:3], [18 / 49.25, 0.0], atol=0.05)
    np.testing.assert_allclose(analysis.variance_shares[1, 1:3], [0.0, 18 / 49.25], atol=0.05)
    assert np.all(analysis.variance_shares[:, 3] < 0.01)
    assert analysis.classification.accuracy > 0.95
    assert analysis.linear_cka is None and analysis.paired_rows == 0


def test_identical_subspaces_are_all_shared_and_disjoint_ones_all_specific():
    rng = np.random.default_rng(1)
    basis = random_rotation(rng, 8)
    split = split_subspaces(basis[:, :3], basis[:, :3] @ random_rotation(rng, 3))
    assert split.shared.shape[1] == 3 and split.specific_a.shape[1] == 0
    split = split_subspaces(basis[:, :3], basis[:, 3:5])
    assert split.shared.shape[1] == 0 and (split.specific_a.shape[1], split.specific_b.shape[1]) == (3, 2)
    np.testing.assert_allclose(principal_angles(basis[:, :3], basis[:, 3:5]), np.pi / 2)


def test_principal_angle_between_tilted_lines():
    angle = np.radians(25.0)
    line_a = np.array([[1.0], [0.0], [0.0]])
    line_b = np.array([[np.cos(angle)], [np.sin(angle)], [0.0]])
    np.testing.assert_allclose(principal_angles(line_a, line_b), [angle])
    assert split_subspaces(line_a, line_b, shared_angle_deg=30).shared.shape[1] == 1
    assert split_subspaces(line_a, line_b, shared_angle_deg=20).shared.shape[1] == 0


def test_linear_cka_properties():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(200, 6))
    rotated = features @ random_rotation(rng, 6) * 3.0 + 5.0
    assert linear_cka(features, rotated) == pytest.approx(1.0)
    assert linear_cka(features, rng.normal(size=(200, 6))) < 0.15
    with pytest.raises(ValueError, match="features_b must have one row per row of features_a"):
        linear_cka(features, features[:10])


def test_covariance_alignment_compares_where_modalities_vary():
    rng = np.random.default_rng(3)
    along_first = rng.normal(size=(300, 4)) * [3, 0.01, 0.01, 0.01]
    along_second = rng.normal(size=(300, 4)) * [0.01, 3, 0.01, 0.01]
    assert covariance_alignment(along_first, along_first[::-1] + 7.0) == pytest.approx(1.0)
    assert covariance_alignment(along_first, along_second) < 0.01


def test_principal_subspace_rank_from_variance_fraction():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(400, 6)) * [5, 4, 3, 0.1, 0.1, 0.1]
    assert principal_subspace(features).shape == (6, 3)
    assert principal_subspace(features, rank=2).shape == (6, 2)
    with pytest.raises(ValueError, match="rank must lie in 1..6"):
        principal_subspace(features, rank=7)


def test_paired_rows_give_cka_and_transfer_works_across_modalities():
    rng = np.random.default_rng(5)
    num_rows = 300
    latent = rng.normal(size=(num_rows, 3))
    labels = (latent[:, :2] > 0).astype(float)
    mixing = rng.normal(size=(3, NUM_FEATURES))
    features_a = (latent @ mixing + rng.normal(size=(num_rows, NUM_FEATURES)) * 0.3).astype(np.float32)
    features_b = (latent @ mixing + rng.normal(size=(num_rows, NUM_FEATURES)) * 0.3 + 1.0).astype(np.float32)
    splits = tuple(["train"] * 180 + ["val"] * 40 + ["test"] * 80)
    groups = tuple(f"phantom{i}" for i in range(num_rows))
    transfer = cross_modal_transfer(
        {
            "xray": LabelledFeatures(features_a, labels, splits, groups),
            "ct": LabelledFeatures(features_b, labels, splits, groups),
        },
        ("left", "right"),
        num_resamples=50,
    )
    assert set(transfer.evaluations) == {("xray", "xray"), ("xray", "ct"), ("ct", "xray"), ("ct", "ct")}
    assert all(evaluation.macro_auroc > 0.85 for evaluation in transfer.evaluations.values())
    pairs = np.stack([np.arange(num_rows), np.arange(num_rows)], axis=1)
    analysis = analyse_modalities(
        features_a, features_b, pairs=pairs, groups_a=groups, groups_b=groups, transfer=transfer
    )
    assert analysis.paired_rows == num_rows and analysis.linear_cka > 0.8
    assert analysis.transfer is transfer


def test_modality_classifier_at_chance_without_a_modality_signal():
    rng = np.random.default_rng(6)
    features = rng.normal(size=(600, 8)).astype(np.float32)
    result = classify_modality(features[:300], features[300:], seed=1)
    assert 0.35 < result.balanced_accuracy < 0.65 and 0.35 < result.auroc < 0.65


def test_bad_arguments_are_named():
    rng = np.random.default_rng(7)
    features = rng.normal(size=(50, 4))
    with pytest.raises(ValueError, match="features_b must have 4 columns"):
        analyse_modalities(features, features[:, :3])
    with pytest.raises(ValueError, match="pairs must be a"):
        analyse_modalities(features, features, pairs=np.zeros((3, 3), dtype=int))
    with pytest.raises(ValueError, match="basis_a must have orthonormal columns"):
        principal_angles(features[:4], np.eye(4)[:, :2])
    with pytest.raises(ValueError, match="shared_angle_deg must lie in"):
        split_subspaces(np.eye(4)[:, :2], np.eye(4)[:, :2], shared_angle_deg=95)
