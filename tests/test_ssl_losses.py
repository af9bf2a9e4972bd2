"""DINO, iBOT and KoLeo losses, centering and Sinkhorn-Knopp."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmv.ssl.losses import DinoLoss, IbotLoss, TargetNormalisation, koleo_loss, sinkhorn_knopp


def test_sinkhorn_rows_are_distributions_and_prototypes_share_mass_evenly():
    scores = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 3
    targets = sinkhorn_knopp(scores, temperature=0.5, iterations=50)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(64), rtol=0, atol=1e-5)
    torch.testing.assert_close(targets.sum(dim=0), torch.full((16,), 64 / 16), rtol=2e-2, atol=0)


def test_centering_softmax_and_center_update():
    normalisation = TargetNormalisation(4, "centering", center_momentum=0.9)
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 1.0, 0.0]])
    targets = normalisation.targets(scores, temperature=0.5)
    torch.testing.assert_close(targets, F.softmax(scores / 0.5, dim=-1))
    torch.testing.assert_close(normalisation.center, 0.1 * scores.mean(dim=0, keepdim=True))
    center = normalisation.center.clone()
    second = normalisation.targets(scores, temperature=0.5)
    torch.testing.assert_close(second, F.softmax((scores - center) / 0.5, dim=-1))
    assert not torch.allclose(second, targets)


def test_dino_loss_matches_pairwise_reference_without_self_pairs():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(5, 3, 8, generator=generator)
    teacher = F.softmax(torch.randn(2, 3, 8, generator=generator), dim=-1)
    loss = DinoLoss(8, student_temperature=0.1)(student, teacher)
    total, pairs = 0.0, 0
    for g in range(2):
        for v in range(5):
            if v == g:
                continue
            total += -(teacher[g] * F.log_softmax(student[v] / 0.1, dim=-1)).sum(-1).mean()
            pairs += 1
    torch.testing.assert_close(loss, total / pairs)


def test_dino_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="teacher_targets"):
        DinoLoss(8)(torch.randn(4, 3, 8), torch.rand(2, 2, 8))


def test_ibot_loss_weights_every_masked_image_equally():
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 6, generator=generator)
    targets = F.softmax(torch.randn(2, 6, generator=generator), dim=-1)
    loss = IbotLoss(6, student_temperature=0.1)
    cross_entropy = -(targets * F.log_softmax(scores / 0.1, dim=-1)).sum(-1)
    # Image 0 has one masked token, image 7 has the other token repeated ten times: both count once.
    student = torch.cat((scores[:1], scores[1:].repeat(10, 1)))
    teacher = torch.cat((targets[:1], targets[1:].repeat(10, 1)))
    images = torch.tensor([0] + [7] * 10)
    torch.testing.assert_close(loss(student, teacher, images), cross_entropy.mean())


def test_ibot_loss_without_masked_tokens_is_zero_and_differentiable():
    scores = torch.zeros(0, 6, requires_grad=True)
    value = IbotLoss(6)(scores, torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    value.backward()
    assert float(value.detach()) == 0.0


def test_koleo_of_two_orthogonal_points_and_its_gradient_spreads_them():
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert math.isclose(float(koleo_loss(points)), -math.log(math.sqrt(2.0)), rel_tol=1e-6)
    close = torch.tensor([[1.0, 0.0], [1.0, 0.1]], requires_grad=True)
    koleo_loss(close).backward()
    step = close.detach() - 0.01 * close.grad
    assert float(koleo_loss(step)) < float(koleo_loss(close.detach()))


def test_koleo_rejects_bad_rank():
    with pytest.raises(ValueError, match="features"):
        koleo_loss(torch.zeros(3))
