import pytest
import torch

from mmv.eval.lbfgs import minimise_lbfgs


def test_minimises_a_quadratic_with_spread_curvatures():
    generator = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(30, 30, generator=generator, dtype=torch.float64))
    hessian = rotation @ torch.diag(torch.logspace(-1, 1, 30, dtype=torch.float64)) @ rotation.T
    target = torch.randn(30, generator=generator, dtype=torch.float64)

    def objective(x):
        difference = x - target
        return float(0.5 * difference @ hessian @ difference), hessian @ difference

    result = minimise_lbfgs(objective, torch.zeros(30), max_iter=300, gradient_tolerance=1e-9, change_tolerance=0.0)
    assert result.converged and result.iterations < 300
    torch.testing.assert_close(result.x, target, atol=1e-7, rtol=0)
    assert result.value == pytest.approx(0.0, abs=1e-12)


def test_stops_at_max_iter_without_claiming_convergence():
    def objective(x):
        return float((x**2).sum() + x.sum() ** 4), 2 * x + 4 * x.sum() ** 3

    start = torch.full((5,), 3.0)
    result = minimise_lbfgs(objective, start, max_iter=2, gradient_tolerance=1e-12, change_tolerance=0.0)
    assert result.iterations == 2 and not result.converged
    assert result.value < objective(start)[0]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="x0 must be a 1-D tensor"):
        minimise_lbfgs(lambda x: (0.0, x), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="max_iter and history_size must be positive"):
        minimise_lbfgs(lambda x: (0.0, x), torch.zeros(2), max_iter=0)
