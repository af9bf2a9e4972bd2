"""``mmv.Encoder``: one Vision Transformer over packed 2D and 3D token sequences.

Every image becomes its own sequence in one packed stream: its CLS token and optional register
tokens, then its patch tokens. Attention never crosses sequences (``packed_attention``), and positions
enter only through 3D rotary embeddings of physical token coordinates (``rope3d``), so 2D and 3D
images, of any size, share every weight.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmv.data.preprocess import ModalityPreprocess
from mmv.image import Image
from mmv.model.checkpoint import (
    CONFIG_NAME,
    SAFETENSORS_NAME,
    TORCH_NAME,
    CheckpointError,
    check_state_dict,
    read_checkpoint,
    write_checkpoint,
)
from mmv.model.config import EncoderConfig
from mmv.model.layers import Block, LayerScale, PackedContext, PatchEmbed
from mmv.model.stream import PatchStream, PrefixLayout, inverse_permutation, permute_rows, prefix_layout
from mmv.ops import rope_freqs
from mmv.packing import PackedBatch, pack, unpack
from mmv.tokenizer import Tokenizer, as_image

__all__ = ["Encoder", "EncoderOutput", "MissingPreprocessWarning", "PREPROCESS_KEY"]

# The key of config.json that holds the preprocessing the encoder was trained with.
PREPROCESS_KEY = "preprocess"


class MissingPreprocessWarning(UserWarning):
    """An encoder directory does not record its preprocessing (written before mmv did), so the default is used."""


@dataclass
class EncoderOutput:
    """What :class:`Encoder` returns for a batch of B images with T patch tokens in all.

    Attributes:
        cls: ``(B, C)``, the final CLS token of each image.
        patch_tokens: ``(T, C)``, the final patch tokens, packed in the order of ``batch``.
        pooled: ``(B, C)``, the mean patch token of each image (NaN for an image with no tokens).
        registers: ``(B, num_registers, C)``, the final register tokens.
        cu_seqlens: int32 ``(B + 1,)``: image b owns ``patch_tokens[cu_seqlens[b]:cu_seqlens[b + 1]]``.
        batch: the :class:`PackedBatch` that was encoded (grid shapes, kept indices, modalities).
    """

    cls: torch.Tensor
    patch_tokens: torch.Tensor
    pooled: torch.Tensor
    registers: torch.Tensor
    cu_seqlens: torch.Tensor
    batch: PackedBatch

    def split(self) -> list[torch.Tensor]:
        """The patch tokens of each image, ``(L_b, C)``, in packed order."""
        return self.batch.split(self.patch_tokens)

    def unpack(self) -> list[torch.Tensor]:
        """The patch tokens of each image on its token grid: ``(gz, gy, gx, C)`` for a volume,
        ``(gy, gx, C)`` for a 2D image, with NaN where a token was dropped."""
        return unpack(self.batch, self.patch_tokens)


class Encoder(nn.Module):
    """A ViT over packed token sequences of 2D images and volumes.

    Args:
        config: the hyperparameters; see :class:`EncoderConfig` and :meth:`from_preset`.

    Call it on a list of :class:`mmv.Image`, MONAI MetaTensors (spacing and orientation from their
    affine) or arrays (read with 1 mm spacing; the accepted layouts are those of
    :func:`mmv.tokenizer.as_image`), or on a :class:`PackedBatch` from a data loader; it returns an
    :class:`EncoderOutput`::

        enc = Encoder.from_preset("vit_small")
        out = enc([Image(xray, (0.2, 0.2)), Image(ct, (1.5, 1.0, 1.0))])
        out.cls, out.pooled, out.unpack()

    Attributes:
        config: the :class:`EncoderConfig`.
        preprocess: the :class:`mmv.data.ModalityPreprocess` its inputs are meant to have been through (CT
            and X-ray pipelines); the default preprocessing for a new encoder, the one the encoder was
            trained with after :meth:`from_pretrained` (``mmv pretrain`` records it). It travels with the
            weights: :meth:`save_pretrained` writes it, and ``mmv embed`` applies it.
    """

    def __init__(self, config: EncoderConfig | None = None) -> None:
        super().__init__()
        if config is None:
            config = EncoderConfig()
        if not isinstance(config, EncoderConfig):
            raise TypeError(f"Encoder: config must be an EncoderConfig, got {type(config).__name__}")
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(dim, config.patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, dim))
        if config.num_registers:
            self.register_tokens = nn.Parameter(torch.empty(config.num_registers, dim))
        else:
            self.register_parameter("register_tokens", None)
        # Replaces the embedding of masked patch tokens (masked image modelling).
        self.mask_token = nn.Parameter(torch.empty(dim))
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        drop_path_rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim,
                config.num_heads,
                config.mlp_ratio,
                config.mlp,
                config.qkv_bias,
                config.qk_norm,
                config.layer_scale_init,
                rate,
                config.norm_eps,
            )
            for rate in drop_path_rates
        )
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.register_buffer("rope_freqs", self._rope_freqs(), persistent=False)
        self.tokenizer = Tokenizer(config.patch_size)
        self.preprocess = ModalityPreprocess()
        self.init_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Encoder:
        """A freshly initialised encoder of a named size (``vit_tiny``, ``vit_small``, ``vit_base``,
        ``vit_large``); keyword arguments override config fields."""
        return cls(EncoderConfig.from_preset(name, **overrides))

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens at the start of every sequence."""
        return 1 + self.config.num_registers

    def init_weights(self) -> None:
        """Initialise as timm's ViT: linear layers truncated normal (std 0.02) with zero bias, CLS and
        registers normal (std 1e-6), the patch embedding as a convolution, LayerScale constant."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm | PatchEmbed | LayerScale):
                module.reset_parameters()
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)

    def _rope_freqs(self, device: torch.device | str | None = None) -> torch.Tensor:
        config = self.config
        return rope_freqs(config.head_dim, config.rope_sections, config.rope_base, device=device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # The rotary frequencies stay float32 whatever dtype the weights are cast to.
        self.rope_freqs = self._rope_freqs(self.rope_freqs.device)
        return self

    # ----------------------------------------------------------------------------------------------

    def forward(
        self,
        inputs: PackedBatch | Sequence[Image | torch.Tensor],
        token_mask: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Encode a batch.

        Args:
            inputs: a :class:`PackedBatch` whose patch size is ``config.patch_size``, or a list of
                :class:`mmv.Image` / MONAI MetaTensors / arrays (tokenised here, without dropping any
                token; see :func:`mmv.tokenizer.as_image`). An ambiguous array layout raises a ValueError
                naming ``inputs[i]`` and its shape.
            token_mask: optional bool ``(T,)`` over the packed patch tokens; True replaces a token's
                embedding by the learned mask token (masked image modelling).

        Returns:
            An :class:`EncoderOutput`.
        """
        batch, stream = self._prepare(inputs, token_mask)
        cls, registers, patch_tokens, pooled = self._encode(stream)
        return EncoderOutput(cls, patch_tokens, pooled, registers, batch.cu_seqlens, batch)

    @torch.compiler.disable
    def _prepare(self, inputs, token_mask) -> tuple[PackedBatch, PatchStream]:
        """Tokenise and pack a list of images, check a batch against the config, move it to the weights;
        the batch, and its stream for :meth:`_encode`."""
        device = self.cls_token.device
        if isinstance(inputs, PackedBatch):
            batch = inputs
            if batch.patch_size != self.config.patch_size:
                raise ValueError(
                    f"Encoder: inputs was packed with patch_size {batch.patch_size}, the encoder's is "
                    f"{self.config.patch_size}"
                )
        elif isinstance(inputs, Sequence) and not isinstance(inputs, str):
            if len(inputs) == 0:
                raise ValueError("Encoder: inputs must hold at least one image, got an empty list")
            images = [as_image(image, f"inputs[{i}]") for i, image in enumerate(inputs)]
            batch = pack([self.tokenizer(image) for image in images])
        else:
            raise TypeError(
                f"Encoder: inputs must be a PackedBatch or a list of mmv.Image / MetaTensors / tensors, got "
                f"{type(inputs).__name__}"
            )
        if batch.device != device:
            batch = batch.to(device)
        if token_mask is not None:
            if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
                raise TypeError(f"Encoder: token_mask must be a bool tensor, got {getattr(token_mask, 'dtype', type(token_mask))}")
            if tuple(token_mask.shape) != (batch.num_tokens,):
                raise ValueError(
                    f"Encoder: token_mask must have shape ({batch.num_tokens},) (one per patch token), "
                    f"got {tuple(token_mask.shape)}"
                )
            token_mask = token_mask.to(device)
        stream = PatchStream(
            batch.patches_2d,
            batch.patches_3d,
            batch.rows_2d,
            batch.rows_3d,
            batch.coords_mm,
            batch.cu_seqlens,
            batch.max_seqlen,
            validate=not batch.validated,
            token_mask=token_mask,
        )
        return batch, stream

    def _encode(self, stream: PatchStream) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """CLS ``(B, C)``, registers ``(B, R, C)``, patch tokens ``(T, C)`` and their per-image mean."""
        x, context, layout = self._embed(stream)
        for block in self.blocks:
            x = block(x, context)
        return self._readout(self.norm(x), layout, stream.cu_seqlens)

    def _embed(self, stream: PatchStream) -> tuple[torch.Tensor, PackedContext, PrefixLayout]:
        """The input stream ``(T + B * num_prefix, C)``: each image's prefix tokens, then its embedded
        patches; with the context the blocks need and the layout that locates every row."""
        config = self.config
        num_images = stream.cu_seqlens.shape[0] - 1
        num_tokens = stream.coords_mm.shape[0]
        num_prefix = self.num_prefix_tokens
        layout = prefix_layout(stream.cu_seqlens, num_tokens, stream.max_seqlen, num_prefix)
        num_rows = num_tokens + num_images * num_prefix

        embedded_2d, embedded_3d = self.patch_embed(stream.patches_2d, stream.patches_3d)
        prefix = self.cls_token if self.register_tokens is None else torch.cat((self.cls_token, self.register_tokens))
        prefix = prefix.to(embedded_3d.dtype).repeat(num_images, 1)
        # One permutation moves every embedded row (2D patches, 3D patches, prefix tokens) to its stream row.
        destination = torch.cat(
            (layout.patch_rows[stream.rows_2d], layout.patch_rows[stream.rows_3d], layout.prefix_rows.flatten())
        )
        x = permute_rows(
            torch.cat((embedded_2d, embedded_3d, prefix)), inverse_permutation(destination), destination
        )
        if stream.token_mask is not None:
            masked_rows = torch.zeros(num_rows, dtype=torch.bool, device=x.device)
            masked_rows = masked_rows.index_copy(0, layout.patch_rows, stream.token_mask)
            x = torch.where(masked_rows[:, None], self.mask_token.to(x.dtype), x)

        coords = torch.zeros(num_rows, 3, dtype=torch.float32, device=x.device)
        coords = coords.index_copy(0, layout.patch_rows, stream.coords_mm / config.coordinate_unit_mm)
        context = PackedContext(
            cu_seqlens=layout.cu_seqlens,
            max_seqlen=layout.max_seqlen,
            coords=coords,
            freqs=self.rope_freqs,
            sections=config.rope_sections,
            sequence_ids=layout.sequence_ids,
            num_sequences=num_images,
            validate=stream.validate,
        )
        return x, context, layout

    def _readout(
        self, x: torch.Tensor, layout: PrefixLayout, cu_seqlens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """CLS ``(B, C)``, registers ``(B, R, C)``, patch tokens ``(T, C)`` and their per-image mean."""
        num_images, num_prefix = layout.prefix_rows.shape
        # One permutation puts every image's prefix tokens first, then all patch tokens in packed order.
        order = torch.cat((layout.prefix_rows.flatten(), layout.patch_rows))
        x = permute_rows(x, order, inverse_permutation(order))
        prefix = x[: num_images * num_prefix].view(num_images, num_prefix, -1)
        patch_tokens = x[num_images * num_prefix :]
        token_image = layout.sequence_ids[layout.patch_rows]
        counts = (cu_seqlens[1:] - cu_seqlens[:-1]).to(patch_tokens.dtype)
        sums = patch_tokens.new_zeros(num_images, patch_tokens.shape[1])
        sums = sums.scatter_add(0, token_image[:, None].expand_as(patch_tokens), patch_tokens)
        return prefix[:, 0], prefix[:, 1:], patch_tokens, sums / counts[:, None]

    # ----------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` (the config, and :attr:`preprocess` under ``"preprocess"``) and the weights
        (``model.safetensors``) into ``directory``."""
        if not isinstance(self.preprocess, ModalityPreprocess):
            raise TypeError(
                f"Encoder.preprocess must be an mmv.data.ModalityPreprocess, got {type(self.preprocess).__name__}"
            )
        config = {**self.config.to_dict(), PREPROCESS_KEY: self.preprocess.to_dict()}
        write_checkpoint(directory, config, self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: torch.device | str = "cpu") -> Encoder:
        """Load an encoder written by :meth:`save_pretrained`, in eval mode, without executing code.

        ``directory`` is the folder :meth:`save_pretrained` wrote, or its ``config.json`` or weights file.
        The encoder's :attr:`preprocess` is the one recorded in ``config.json``; a folder written before mmv
        recorded it loads with the default preprocessing and a :class:`MissingPreprocessWarning`.

        Raises:
            FileNotFoundError: the directory, its config or its weights are missing.
            CheckpointError: a file is unreadable or truncated, the config lacks a field or has an invalid
                one, or the weights do not fit the config.
        """
        directory = _checkpoint_directory(directory)
        config_values, state_dict, weights_path = read_checkpoint(directory)
        config_path = directory / CONFIG_NAME
        preprocess_values = config_values.pop(PREPROCESS_KEY, None)
        try:
            config = EncoderConfig.from_dict(config_values)
        except (TypeError, ValueError) as error:
            raise CheckpointError(config_path, f"invalid encoder config ({error})") from error
        try:
            preprocess = None if preprocess_values is None else ModalityPreprocess.from_dict(preprocess_values)
        except (TypeError, ValueError) as error:
            raise CheckpointError(config_path, f"invalid {PREPROCESS_KEY!r} section ({error})") from error
        encoder = cls(config)
        check_state_dict(weights_path, state_dict, encoder.state_dict())
        encoder.load_state_dict(state_dict)
        if preprocess is None:
            warnings.warn(
                f"{config_path} does not record the encoder's preprocessing (written by an older mmv): "
                f"encoder.preprocess is the default, {encoder.preprocess!r}; set it to the preprocessing "
                "the encoder was trained with",
                MissingPreprocessWarning,
                stacklevel=2,
            )
        else:
            encoder.preprocess = preprocess
        return encoder.to(map_location).eval()


def _checkpoint_directory(path: str | os.PathLike) -> Path:
    """The encoder directory of ``path``: the path itself, or the folder of its config or weights file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Encoder.from_pretrained: directory must be a path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        return path
    if path.name in (CONFIG_NAME, SAFETENSORS_NAME, TORCH_NAME):
        return path.parent
    raise CheckpointError(
        path,
        f"Encoder.from_pretrained takes the directory save_pretrained wrote ({CONFIG_NAME} and the weights), not a file",
    )
