"""``EncoderConfig``: every hyperparameter of the encoder, its named presets, and its JSON form."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mmv.ops import default_sections
from mmv.ops.checks import check_sections
from mmv.tokenizer import check_patch_size

__all__ = ["EncoderConfig", "PRESETS"]

# Width, depth and heads of the standard ViT sizes (head_dim 64 throughout).
PRESETS: dict[str, dict[str, int]] = {
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}

MLP_KINDS = ("gelu", "swiglu")

# Upper bounds of the sizes, far above any preset, so that a config from an untrusted file cannot make the
# encoder allocate without limit. MAX_PARAMETERS bounds the product of the sizes (2**31 float32 parameters
# are 8 GiB; vit_large has 0.3e9, ViT-g 1.1e9).
SIZE_LIMITS: dict[str, int] = {
    "embed_dim": 16384,
    "depth": 512,
    "num_registers": 1024,
    "mlp_ratio": 64,
    "patch_side": 512,
}
MAX_PARAMETERS = 2**31


@dataclass(frozen=True)
class EncoderConfig:
    """Hyperparameters of :class:`mmv.Encoder` (the defaults are ``vit_small``).

    Attributes:
        embed_dim: token width C.
        depth: number of transformer blocks.
        num_heads: attention heads; ``embed_dim / num_heads`` is the head dimension (even, <= 256).
        mlp_ratio: MLP hidden width over ``embed_dim`` (SwiGLU uses 2/3 of it, rounded up to 8).
        mlp: ``"gelu"`` or ``"swiglu"``.
        patch_size: ``(pz, py, px)``; 2D images use ``(py, px)``.
        num_registers: extra learned tokens per image besides CLS.
        qkv_bias: bias in the qkv projection.
        qk_norm: LayerNorm on each head's queries and keys.
        layer_scale_init: initial LayerScale value, or None for no LayerScale.
        drop_path_rate: stochastic depth of the last block (linear from 0 over depth), per image.
        coordinate_unit_mm: token coordinates are millimetres divided by this length for RoPE.
        rope_sections: rotary pairs per axis (z, y, x); None means ``default_sections(head_dim)``.
        rope_base: base of the rotary frequencies.
        norm_eps: LayerNorm epsilon.

    Sizes are bounded so that a config read from a file cannot exhaust memory: embed_dim <= 16384,
    depth <= 512, num_registers <= 1024, mlp_ratio <= 64, each side of patch_size <= 512 (see
    ``SIZE_LIMITS``), and about 2**31 parameters in all (``MAX_PARAMETERS``); num_heads is bounded by
    embed_dim (an even head dimension of at most 256). Beyond them the constructor raises ValueError.
    """

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    mlp: str = "gelu"
    patch_size: tuple[int, int, int] = (16, 16, 16)
    num_registers: int = 0
    qkv_bias: bool = True
    qk_norm: bool = False
    layer_scale_init: float | None = 1e-5
    drop_path_rate: float = 0.0
    coordinate_unit_mm: float = 16.0
    rope_sections: tuple[int, int, int] | None = None
    rope_base: float = 100.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads"):
            _set(self, name, _positive_int(getattr(self, name), name))
        _set(self, "num_registers", _int(self.num_registers, "num_registers"))
        if self.num_registers < 0:
            raise ValueError(f"EncoderConfig: num_registers must be >= 0, got {self.num_registers}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"EncoderConfig: embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        head_dim = self.head_dim
        if head_dim % 2 or head_dim > 256:
            raise ValueError(f"EncoderConfig: the head dimension embed_dim / num_heads must be even and <= 256, got {head_dim}")
        _set(self, "patch_size", check_patch_size(self.patch_size, "EncoderConfig"))
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"EncoderConfig: mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        for name in ("qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"EncoderConfig: {name} must be a bool, got {getattr(self, name)!r}")
        _set(self, "mlp_ratio", _positive_float(self.mlp_ratio, "mlp_ratio"))
        _set(self, "coordinate_unit_mm", _positive_float(self.coordinate_unit_mm, "coordinate_unit_mm"))
        _set(self, "rope_base", _positive_float(self.rope_base, "rope_base"))
        _set(self, "norm_eps", _positive_float(self.norm_eps, "norm_eps"))
        if self.layer_scale_init is not None:
            _set(self, "layer_scale_init", _positive_float(self.layer_scale_init, "layer_scale_init"))
        rate = float(self.drop_path_rate)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"EncoderConfig: drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        _set(self, "drop_path_rate", rate)
        sections = default_sections(head_dim) if self.rope_sections is None else self.rope_sections
        try:
            sections = tuple(_int(s, "rope_sections") for s in sections)
        except TypeError:
            raise TypeError(f"EncoderConfig: rope_sections must be three ints (z, y, x), got {sections!r}") from None
        check_sections(sections, head_dim // 2, "EncoderConfig (rope_sections)")
        _set(self, "rope_sections", sections)
        _check_size_limits(self)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def approximate_parameters(self) -> int:
        """The encoder's parameter count to within a few percent (attention, MLPs, patch embedding, tokens)."""
        width, hidden = self.embed_dim, int(self.embed_dim * self.mlp_ratio)
        pz, py, px = self.patch_size
        per_block = 4 * width * width + 2 * width * hidden
        return self.depth * per_block + width * (pz * py * px + self.num_registers + 4)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> EncoderConfig:
        """The config of a named preset (``vit_tiny``, ``vit_small``, ``vit_base``, ``vit_large``)."""
        if name not in PRESETS:
            raise ValueError(f"EncoderConfig.from_preset: name must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EncoderConfig:
        """The config from :meth:`to_dict`'s output: every field, no other key.

        A missing or unknown key raises ValueError naming it: a missing field is never filled with its
        default, which would build a different model than the one the values describe.
        """
        if not isinstance(values, dict):
            raise TypeError(f"EncoderConfig.from_dict: values must be a dict, got {type(values).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"EncoderConfig.from_dict: unknown keys {unknown}")
        missing = [name for name in known if name not in values]
        if missing:
            raise ValueError(f"EncoderConfig.from_dict: missing required keys {missing}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)


def _check_size_limits(config: EncoderConfig) -> None:
    """Raise ValueError for sizes beyond :data:`SIZE_LIMITS` or :data:`MAX_PARAMETERS`, before anything is allocated."""
    sizes = {
        "embed_dim": config.embed_dim,
        "depth": config.depth,
        "num_registers": config.num_registers,
        "mlp_ratio": config.mlp_ratio,
        "patch_side": max(config.patch_size),
    }
    for name, value in sizes.items():
        if value > SIZE_LIMITS[name]:
            what = "each side of patch_size" if name == "patch_side" else name
            raise ValueError(f"EncoderConfig: {what} must be at most {SIZE_LIMITS[name]}, got {value}")
    if config.approximate_parameters > MAX_PARAMETERS:
        raise ValueError(
            f"EncoderConfig: about {config.approximate_parameters:.3g} parameters, more than the {MAX_PARAMETERS:.3g} "
            "an encoder may have (embed_dim, depth, mlp_ratio and patch_size together)"
        )


def _set(config: EncoderConfig, name: str, value: Any) -> None:
    object.__setattr__(config, name, value)


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise TypeError(f"EncoderConfig: {name} must be an int, got {value!r}")
    return int(value)


def _positive_int(value: Any, name: str) -> int:
    value = _int(value, name)
    if value < 1:
        raise ValueError(f"EncoderConfig: {name} must be a positive int, got {value}")
    return value


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"EncoderConfig: {name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"EncoderConfig: {name} must be finite and positive, got {value}")
    return float(value)
