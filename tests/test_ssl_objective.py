"""The DINOv2 objective: built from the [ssl] section, its terms weighted as the section says."""

import pytest
import torch
from helpers.training import SyntheticImages, tiny_config

from mmv.ssl.objective import LOSS_NAMES, SslObjective, StepLosses
from mmv.train import Trainer
from mmv.train.config import PretrainConfig, SslConfig


@pytest.fixture(autouse=True)
def _restore_threads():
    # The tiny run uses one thread (run.num_threads); the rest of the test session keeps its own.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_objective_takes_the_ssl_section_not_the_run_config():
    with pytest.raises(TypeError, match=r"SslObjective: ssl must be the \[ssl\] section \(an SslConfig\), got PretrainConfig"):
        SslObjective(PretrainConfig())
    objective = SslObjective(SslConfig(num_prototypes=64, dino_weight=0.5, ibot_weight=2.0, koleo_weight=0.3))
    assert objective.weights == (0.5, 2.0, 0.3)
    assert objective.dino.student_temperature == objective.ibot.student_temperature == 0.1
    assert objective.dino.normalisation == objective.ibot.normalisation == "centering"
    sinkhorn = SslObjective(SslConfig(num_prototypes=64, student_temperature=0.2, normalisation="sinkhorn"))
    assert sinkhorn.dino.normalisation == sinkhorn.ibot.normalisation == "sinkhorn"
    assert sinkhorn.dino.student_temperature == sinkhorn.ibot.student_temperature == 0.2


def test_the_loss_is_the_terms_weighted_as_the_ssl_section_says(tmp_path):
    weights = {"dino_weight": 0.5, "ibot_weight": 2.0, "koleo_weight": 0.3}
    config = tiny_config(tmp_path, ssl=weights)
    trainer = Trainer(config, dataset=SyntheticImages())
    batch = next(trainer.batches())
    trainer.student.eval()  # no stochastic depth: both calls see the same student
    # A fresh objective of the same section gives the trainer's losses (its centres start alike).
    losses = SslObjective(config.ssl)(trainer.student, trainer.teacher, batch, 0.04)
    assert isinstance(losses, StepLosses) and tuple(vars(losses)) == LOSS_NAMES
    same = trainer.objective(trainer.student, trainer.teacher, batch, 0.04)
    assert all(torch.equal(getattr(losses, name), getattr(same, name)) for name in LOSS_NAMES)
    assert all(torch.isfinite(getattr(losses, name)) for name in LOSS_NAMES)
    expected = 0.5 * losses.dino + 2.0 * losses.ibot + 0.3 * losses.koleo
    assert torch.allclose(losses.loss, expected)
    assert losses.koleo.abs() > 0 and losses.dino.abs() > 0
