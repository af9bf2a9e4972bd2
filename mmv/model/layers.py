"""The pieces of the encoder that act on a packed ``(T, C)`` token stream.

Every module here takes the stream and a :class:`PackedContext` describing it (sequence offsets,
token coordinates, which image every token belongs to); none knows whether a token came from a 2D
or a 3D image.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmv.ops import packed_attention, rope3d

__all__ = ["PackedContext", "PatchEmbed", "Attention", "GeluMlp", "SwiGluMlp", "LayerScale", "Block"]


class PackedContext(NamedTuple):
    """What every block needs to know about the packed stream, computed once per forward.

    Attributes:
        cu_seqlens: int32 ``(B + 1,)`` sequence offsets (prefix tokens included).
        max_seqlen: bound on every sequence length.
        coords: float32 ``(T, 3)`` rotary positions (prefix tokens at the origin).
        freqs: float32 ``(head_dim / 2,)`` rotary frequencies.
        sections: rotary pairs per axis (z, y, x).
        sequence_ids: int64 ``(T,)``: the image of every token (for per-image stochastic depth).
        num_sequences: B.
        validate: whether packed_attention must check ``cu_seqlens`` (False for a validated batch).
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    coords: torch.Tensor
    freqs: torch.Tensor
    sections: tuple[int, int, int]
    sequence_ids: torch.Tensor
    num_sequences: int
    validate: bool


class PatchEmbed(nn.Module):
    """One linear patch embedding ``W[C, pz, py, px]`` for volumes and 2D images alike.

    A 3D patch is embedded with W; a 2D patch with W summed over z, which equals the embedding of the
    2D image repeated pz times along z, at the cost of one 2D patch.
    """

    def __init__(self, embed_dim: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.weight = nn.Parameter(torch.empty(embed_dim, *self.patch_size))
        self.bias = nn.Parameter(torch.empty(embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As a Conv3d with this kernel would be initialised (timm keeps PyTorch's default here).
        bound = 1.0 / math.sqrt(math.prod(self.patch_size))
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, patches_2d: torch.Tensor, patches_3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``(N2, C)`` and ``(N3, C)`` of flattened 2D and 3D patches."""
        weight = self.weight
        weight_2d = weight.sum(dim=1).flatten(1)
        embedded_2d = F.linear(patches_2d.to(weight.dtype), weight_2d, self.bias)
        embedded_3d = F.linear(patches_3d.to(weight.dtype), weight.flatten(1), self.bias)
        return embedded_2d, embedded_3d


class Attention(nn.Module):
    """Multi-head self-attention over a packed stream: qkv -> (q/k norm) -> rope3d -> packed_attention."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_norm: bool, norm_eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: PackedContext) -> torch.Tensor:
        num_tokens, dim = x.shape
        # q, k, v are strided views of one (T, 3, H, D) tensor; the ops read them without a copy.
        q, k, v = self.qkv(x).view(num_tokens, 3, self.num_heads, self.head_dim).unbind(1)
        # Under autocast LayerNorm returns float32; attention needs q, k, v in one dtype.
        q = self.q_norm(q).to(v.dtype)
        k = self.k_norm(k).to(v.dtype)
        q = rope3d(q, context.coords, context.freqs, context.sections)
        k = rope3d(k, context.coords, context.freqs, context.sections)
        out = packed_attention(
            q, k, v, context.cu_seqlens, context.max_seqlen, validate=context.validate
        )
        return self.proj(out.reshape(num_tokens, dim))


class GeluMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGluMlp(nn.Module):
    """SwiGLU feed-forward; the hidden width is 2/3 of the GELU one (rounded up to 8) for equal cost."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        hidden_dim = (int(hidden_dim * 2 / 3) + 7) // 8 * 8
        self.fc12 = nn.Linear(dim, 2 * hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc12(x).chunk(2, dim=-1)
        return self.fc3(F.silu(gate) * value)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def drop_path_per_image(branch: torch.Tensor, rate: float, context: PackedContext) -> torch.Tensor:
    """Stochastic depth that drops a residual branch for whole images, never for single tokens."""
    keep_probability = 1.0 - rate
    keep = torch.empty(context.num_sequences, device=branch.device).bernoulli_(keep_probability)
    scale = (keep / keep_probability).to(branch.dtype)
    return branch * scale[context.sequence_ids, None]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)), with LayerScale and drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        mlp: str,
        qkv_bias: bool,
        qk_norm: bool,
        layer_scale_init: float | None,
        drop_path_rate: float,
        norm_eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, norm_eps)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        mlp_class = SwiGluMlp if mlp == "swiglu" else GeluMlp
        self.mlp = mlp_class(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, context: PackedContext) -> torch.Tensor:
        x = x + self._drop_path(self.ls1(self.attn(self.norm1(x), context)), context)
        return x + self._drop_path(self.ls2(self.mlp(self.norm2(x))), context)

    def _drop_path(self, branch: torch.Tensor, context: PackedContext) -> torch.Tensor:
        if not self.training or self.drop_path_rate == 0.0:
            return branch
        return drop_path_per_image(branch, self.drop_path_rate, context)
