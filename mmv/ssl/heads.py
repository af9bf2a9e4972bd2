"""The projection head of DINO and iBOT: MLP, bottleneck, L2 normalisation, weight-normalised prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DinoHead", "BatchStandardise"]


class BatchStandardise(nn.Module):
    """Batch normalisation over rows with batch statistics always, and a learned scale and shift."""

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 2:
            return x
        mean = x.mean(dim=0, keepdim=True)
        variance = x.var(dim=0, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(variance + self.eps) * self.weight + self.bias


class DinoHead(nn.Module):
    """Maps token features to scores over ``num_prototypes`` prototypes.

    ``x -> MLP (num_layers linear layers, GELU between) -> bottleneck -> L2 norm -> prototypes``, where the
    prototype layer is weight-normalised with its norms fixed at 1, so every score is a cosine similarity.

    Args:
        in_dim: width of the encoder's features.
        num_prototypes: output width K (65,536 in DINOv2).
        hidden_dim: width of the MLP's hidden layers.
        bottleneck_dim: width before the prototypes.
        num_layers: linear layers in the MLP (1 maps straight to the bottleneck).
        batch_norm: standardise each hidden feature over the rows of the batch (DINO's ``use_bn``). At
            initialisation a ViT maps different images to nearly the same CLS direction; without this
            the head's outputs agree, the teacher's targets are all but uniform, and a short run learns
            little. Uses batch statistics in training and evaluation alike (the head only serves
            training), and leaves batches of fewer than two rows as they are.
    """

    def __init__(
        self,
        in_dim: int,
        num_prototypes: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("num_prototypes", num_prototypes),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("num_layers", num_layers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DinoHead: {name} must be a positive int, got {value!r}")
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if i < num_layers - 1:
                if batch_norm:
                    layers.append(BatchStandardise(width_out))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = weight_norm(nn.Linear(bottleneck_dim, num_prototypes, bias=False))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal MLP weights (std 0.02), zero biases, prototype norms fixed at 1."""
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        parametrization = self.prototypes.parametrizations.weight
        nn.init.trunc_normal_(parametrization.original1, std=0.02)
        with torch.no_grad():
            parametrization.original0.fill_(1.0)
        parametrization.original0.requires_grad_(False)

    @property
    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The trainable prototype weights (frozen for the first steps of training, as in DINO)."""
        return [p for p in self.prototypes.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_dim) -> (N, num_prototypes)`` scores."""
        bottleneck = F.normalize(self.mlp(x), dim=-1)
        return self.prototypes(bottleneck)
