"""The configuration of a pretraining run: sections of typed fields, read from TOML with overrides.

A run config is a TOML file with the sections ``[model]``, ``[data]``, ``[augment]``, ``[ssl]``,
``[optim]`` and ``[run]`` (see each dataclass below for its fields and defaults). Unknown sections or keys
raise a ValueError naming them. Overrides are ``section.key=value`` strings whose value is read as TOML
(``optim.lr=1e-3``, ``run.out_dir="runs/a"``, ``augment.global_size_3d=[64, 64, 64]``), falling back to
a bare string.

Every field is type-checked when a section is built: a value of the wrong type raises a TypeError naming
``section.key`` and the expected type (integers are accepted where a number is expected, TOML arrays where
a tuple is). A warm-up longer than the run (``optim.warmup_steps`` or ``ssl.teacher_temperature_warmup_steps``
beyond ``optim.steps``) is warned about when the whole config is built.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmv.data.preprocess import DEFAULT_CT_SPACING, DEFAULT_CT_WINDOW, DEFAULT_XRAY_SHORT_SIDE
from mmv.model.config import PRESETS, EncoderConfig
from mmv.ssl.augment import CropSpec, MultiCrop

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

__all__ = [
    "ModelConfig",
    "DataConfig",
    "AugmentConfig",
    "SslConfig",
    "OptimConfig",
    "RunSettings",
    "PretrainConfig",
    "load_config",
    "apply_overrides",
]


class _Section:
    """Base of the config sections: each field is checked against its annotation when the section is built."""

    def __post_init__(self) -> None:
        section = _SECTION_NAMES[type(self)]
        hints = typing.get_type_hints(type(self))
        for spec in dataclasses.fields(self):
            value = _conform_field(getattr(self, spec.name), hints[spec.name], f"{section}.{spec.name}")
            setattr(self, spec.name, value)


# TOML cannot write None: this string stands for it in fields that may be None.
_NONE = "none"


class _Mismatch(Exception):
    """A value does not fit a type annotation (reported by :func:`_conform_field` for the whole field)."""


def _conform_field(value: Any, hint: Any, key: str) -> Any:
    try:
        return _conform(value, hint)
    except _Mismatch:
        raise TypeError(f"{key} must be {_expected(hint)}, got {value!r}") from None


def _conform(value: Any, hint: Any) -> Any:
    """``value`` as the annotation ``hint`` holds it (lists become tuples, ints floats), or _Mismatch."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        if type(None) in arguments and value in (None, _NONE):
            return None
        for option in arguments:
            try:
                return _conform(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    if hint is type(None):  # None itself was taken by the union above
        raise _Mismatch
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint in (bool, int, str):
        # bool is an int in Python, but true is no step count.
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(_conform(item, arguments[0]) for item in value)
        if len(value) != len(arguments):
            raise _Mismatch
        return tuple(_conform(item, option) for item, option in zip(value, arguments))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        return [_conform(item, arguments[0]) for item in value]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(name, str) for name in value):
            raise _Mismatch
        return {name: _conform(item, arguments[1]) for name, item in value.items()}
    raise TypeError(f"no type check for the annotation {hint!r}")


def _expected(hint: Any) -> str:
    """The annotation ``hint`` in words, for error messages."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_expected(option) for option in arguments)
    if origin is tuple:
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return f"a list of {_plural(arguments[0])}"
        if len(set(arguments)) == 1:
            return f"a list of {len(arguments)} {_plural(arguments[0])}"
        return f"a list of ({', '.join(_expected(option) for option in arguments)})"
    if origin is list:
        return f"a list of {_plural(arguments[0])}"
    if origin is dict:
        return "a table"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): '"none"'}
    return names.get(hint, repr(hint))


def _plural(hint: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(hint, "tables")


@dataclass
class ModelConfig(_Section):
    """The encoder: a preset (``vit_tiny``, ``vit_small``, ...) and overrides of its config fields
    (:class:`mmv.EncoderConfig`; the string ``"none"`` stands for None, which TOML cannot write, here as in
    every field that may be None). The encoder config is built, and so checked, with the section."""

    preset: str = "vit_small"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        try:
            self.encoder_config()
        except (TypeError, ValueError) as error:
            raise type(error)(f"model.options: {error}") from None

    def encoder_config(self) -> EncoderConfig:
        """The :class:`mmv.EncoderConfig` of the preset with ``options`` applied."""
        # TOML has arrays but no tuples and no null: lists become tuples, "none" becomes None.
        options = {
            key: tuple(value) if isinstance(value, list) else (None if value == _NONE else value)
            for key, value in self.options.items()
        }
        return EncoderConfig.from_preset(self.preset, **options)


@dataclass
class DataConfig(_Section):
    """Where images come from and how they are batched.

    ``sources`` is a list of tables, each with ``kind`` (``manifest``, ``mimic``, ``chexpert``, ``ctrate``),
    ``path`` (the manifest CSV or the data set root), optional ``weight`` (share of samples), ``split``
    (manifest rows of that ``split`` column value only; the data set's split otherwise) and ``id_column``.
    CT is windowed and resampled to ``ct_spacing``; X-rays resized to ``xray_spacing`` mm pixels or to
    ``xray_short_side`` pixels. The defaults are those of :mod:`mmv.data.preprocess` (``DEFAULT_*``).
    """

    sources: list[dict[str, Any]] = field(default_factory=list)
    ct_spacing: tuple[float, float, float] = DEFAULT_CT_SPACING
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW
    xray_spacing: float | None = None
    xray_short_side: int | None = DEFAULT_XRAY_SHORT_SIDE
    max_tokens: int = 16384
    max_images: int | None = None
    window: int = 256
    num_workers: int = 0
    cache_dir: str | None = None


# The views' defaults are written once, in MultiCrop and CropSpec; the [augment] section takes them from here.
_VIEWS = MultiCrop()


@dataclass
class AugmentConfig(_Section):
    """Multi-crop views, token dropping and iBOT masking.

    The view fields and their defaults are those of :class:`mmv.ssl.augment.MultiCrop` and its two
    :class:`~mmv.ssl.augment.CropSpec` (``global_*`` and ``local_*``; one ``aspect_ratio`` for both);
    :meth:`multicrop` builds it.
    """

    num_global: int = _VIEWS.num_global
    num_local: int = _VIEWS.num_local
    global_size_2d: tuple[int, int] = _VIEWS.global_crop.size_2d
    global_size_3d: tuple[int, int, int] = _VIEWS.global_crop.size_3d
    local_size_2d: tuple[int, int] = _VIEWS.local_crop.size_2d
    local_size_3d: tuple[int, int, int] = _VIEWS.local_crop.size_3d
    global_scale: tuple[float, float] = _VIEWS.global_crop.scale
    local_scale: tuple[float, float] = _VIEWS.local_crop.scale
    aspect_ratio: tuple[float, float] = _VIEWS.global_crop.aspect_ratio
    contrast: tuple[float, float] = _VIEWS.contrast
    brightness: tuple[float, float] = _VIEWS.brightness
    blur_probability: float = _VIEWS.blur_probability
    blur_sigma_mm: tuple[float, float] = _VIEWS.blur_sigma_mm
    noise_probability: float = _VIEWS.noise_probability
    noise_std: tuple[float, float] = _VIEWS.noise_std
    flip_axes: tuple[str, ...] = _VIEWS.flip_axes
    token_drop_rate: float = 0.0
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)

    def multicrop(self) -> MultiCrop:
        """The :class:`~mmv.ssl.augment.MultiCrop` of this section."""
        return MultiCrop(
            global_crop=CropSpec(self.global_size_2d, self.global_size_3d, self.global_scale, self.aspect_ratio),
            local_crop=CropSpec(self.local_size_2d, self.local_size_3d, self.local_scale, self.aspect_ratio),
            num_global=self.num_global,
            num_local=self.num_local,
            contrast=self.contrast,
            brightness=self.brightness,
            blur_probability=self.blur_probability,
            blur_sigma_mm=self.blur_sigma_mm,
            noise_probability=self.noise_probability,
            noise_std=self.noise_std,
            flip_axes=self.flip_axes,
        )


# Ranges of the SSL head sizes: far beyond any published recipe (DINOv2: 131072 prototypes, 4096 hidden).
SSL_HEAD_LIMITS = {
    "num_prototypes": (1, 2**20),
    "head_hidden_dim": (1, 2**16),
    "head_bottleneck_dim": (1, 2**16),
    "head_layers": (1, 16),
}
_MAX_HEAD_LAYER_WEIGHTS = 2**31


@dataclass
class SslConfig(_Section):
    """Heads, losses and teacher of the DINOv2 objective.

    The head sizes are bounded (:data:`SSL_HEAD_LIMITS`, and at most 2^31 weights in one head layer), so
    that a mistyped size fails here, naming the key, instead of exhausting memory when the heads are built.
    """

    num_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    head_batch_norm: bool = False
    separate_ibot_head: bool = True
    normalisation: str = "centering"
    student_temperature: float = 0.1
    teacher_temperature: tuple[float, float] = (0.04, 0.07)
    teacher_temperature_warmup_steps: int = 300
    momentum: tuple[float, float] = (0.992, 1.0)
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, (low, high) in SSL_HEAD_LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"ssl.{name} must lie in [{low}, {high}], got {value}")
        largest_layer = max(self.head_hidden_dim**2, self.head_bottleneck_dim * self.num_prototypes)
        if largest_layer > _MAX_HEAD_LAYER_WEIGHTS:
            raise ValueError(
                f"ssl.head_hidden_dim ({self.head_hidden_dim}), ssl.head_bottleneck_dim ({self.head_bottleneck_dim}) "
                f"and ssl.num_prototypes ({self.num_prototypes}) give a head layer of {largest_layer} weights, "
                f"more than {_MAX_HEAD_LAYER_WEIGHTS}"
            )


@dataclass
class OptimConfig(_Section):
    """AdamW with a warm-up + cosine learning rate and a cosine weight-decay schedule."""

    steps: int = 1000
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: tuple[float, float] = (0.04, 0.4)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = 3.0
    accumulation: int = 1
    freeze_last_layer_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, ("steps", "accumulation"))


@dataclass
class RunSettings(_Section):
    """Where and how the run executes.

    ``bf16`` is autocast to bfloat16: true, false, or ``"auto"`` (on for CUDA, and on a CPU with native
    bfloat16 matrix instructions, where it roughly halves the step time).
    """

    out_dir: str = "runs/pretrain"
    seed: int = 0
    device: str = "auto"
    bf16: bool | str = "auto"
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.bf16, str) and self.bf16 != "auto":
            raise ValueError(f"run.bf16 must be true, false or 'auto', got {self.bf16!r}")
        # The training loop takes the step number modulo the first two.
        _check_positive(self, ("log_every", "checkpoint_every", "keep_checkpoints"))


def _check_positive(section: _Section, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ValueError(f"{_SECTION_NAMES[type(section)]}.{name} must be positive, got {getattr(section, name)}")


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "augment": AugmentConfig,
    "ssl": SslConfig,
    "optim": OptimConfig,
    "run": RunSettings,
}
_SECTION_NAMES = {section_class: name for name, section_class in _SECTIONS.items()}


@dataclass
class PretrainConfig:
    """A whole run's configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    ssl: SslConfig = field(default_factory=SslConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        for name, section_class in _SECTIONS.items():
            if not isinstance(getattr(self, name), section_class):
                raise TypeError(f"PretrainConfig: {name} must be a {section_class.__name__}, got {type(getattr(self, name)).__name__}")
        steps = self.optim.steps
        for key, warmup in (
            ("optim.warmup_steps", self.optim.warmup_steps),
            ("ssl.teacher_temperature_warmup_steps", self.ssl.teacher_temperature_warmup_steps),
        ):
            if warmup > steps:
                warnings.warn(
                    f"{key} ({warmup}) is longer than the run (optim.steps = {steps}): the warm-up never finishes",
                    UserWarning,
                    stacklevel=3,
                )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainConfig:
        """A config from nested dicts (a parsed TOML file); unknown sections or keys raise ValueError."""
        if not isinstance(values, dict):
            raise TypeError(f"PretrainConfig: values must be a dict of sections, got {type(values).__name__}")
        unknown = sorted(set(values) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"PretrainConfig: unknown section(s) {unknown}; sections are {sorted(_SECTIONS)}")
        sections = {}
        for name, section_class in _SECTIONS.items():
            section = values.get(name, {})
            if not isinstance(section, dict):
                raise TypeError(f"PretrainConfig: [{name}] must be a table, got {type(section).__name__}")
            known = {f.name: f for f in dataclasses.fields(section_class)}
            unknown = sorted(set(section) - set(known))
            if unknown:
                raise ValueError(f"PretrainConfig: unknown key(s) {unknown} in [{name}]; keys are {sorted(known)}")
            sections[name] = section_class(**section)
        return cls(**sections)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (JSON and TOML ready)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``values`` (nested dicts) with ``section.key=value`` overrides applied; returns a new dict."""
    result = {name: dict(section) if isinstance(section, dict) else section for name, section in values.items()}
    for override in overrides:
        key, separator, text = override.partition("=")
        path = key.strip().split(".")
        if not separator or len(path) < 2 or not all(path):
            raise ValueError(f"override must look like section.key=value, got {override!r}")
        try:
            value = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        target = result.setdefault(path[0], {})
        for part in path[1:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return result


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Read a TOML run config (or start from the defaults when ``path`` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a valid TOML file ({error})") from error
    return PretrainConfig.from_dict(apply_overrides(values, overrides))
