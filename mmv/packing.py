"""``PackedBatch``: the patch tokens of many 2D and 3D images packed end to end, and its helpers.

A batch of B images becomes one stream of T patch tokens: image b owns stream rows
``cu_seqlens[b]:cu_seqlens[b + 1]``. Pixels stay as two matrices, one per kind of patch (2D patches
have ``py * px`` values, 3D patches ``pz * py * px``), with the stream row of each patch, so 2D patches
are never repeated along z; after embedding both kinds lie in one ``(T, C)`` stream.

A ``PackedBatch`` is validated once, when it is built; the encoder then skips the per-call checks of
``cu_seqlens``. It is what a data loader's collate function returns: it pickles, moves with ``.to()``
and pins with ``.pin_memory()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from mmv.ops.checks import check_cu_seqlens_values
from mmv.tokenizer import PatchSize, TokenizedImage, check_patch_size

__all__ = ["PackedBatch", "pack", "unpack", "cu_seqlens_from_lengths"]

_TENSOR_FIELDS = ("patches_2d", "patches_3d", "rows_2d", "rows_3d", "coords_mm", "cu_seqlens", "kept_indices")


def cu_seqlens_from_lengths(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """int32 ``(B + 1,)`` cumulative offsets ``[0, l0, l0 + l1, ...]`` of sequences of the given lengths."""
    lengths = [int(n) for n in lengths]
    if any(n < 0 for n in lengths):
        raise ValueError(f"cu_seqlens_from_lengths: lengths must be non-negative, got {lengths}")
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


class PackedBatch:
    """Patch tokens of B images (2D and 3D mixed) packed into one stream of T tokens.

    Build one with :func:`pack` from :class:`mmv.tokenizer.TokenizedImage` items, or directly (all
    arguments keyword-only; every tensor on one device):

    Args:
        patches_2d: float32 ``(N2, py * px)``: the patches of the 2D images, one per row.
        patches_3d: float32 ``(N3, pz * py * px)``: the patches of the volumes, flattened (z, y, x).
        rows_2d: int64 ``(N2,)``: the stream row (0 .. T-1) of each row of ``patches_2d``.
        rows_3d: int64 ``(N3,)``: the stream row of each row of ``patches_3d``. Together the rows
            cover 0 .. T-1 once, with T = N2 + N3, and each row lies in an image of its kind.
        coords_mm: float32 ``(T, 3)``: (z, y, x) of each token's patch centre in mm from its image's
            centre (z = 0 for 2D images).
        cu_seqlens: int32 ``(B + 1,)``: image b owns rows ``cu_seqlens[b]:cu_seqlens[b + 1]``.
        max_seqlen: an upper bound on every image's token count.
        kept_indices: int64 ``(T,)``: the row-major index of each token in its image's token grid;
            unique within an image.
        grid_shapes: B tuples ``(gz, gy, gx)``: each image's full token grid (gz = 1 for 2D).
        is_3d: B bools: whether each image is a volume.
        modalities: B modality tags (str or None).
        patch_size: ``(pz, py, px)`` the images were cut with.
        validate: check everything above (the default). Pass False only for data already checked.

    Raises:
        ValueError / TypeError naming the argument that is inconsistent.
    """

    def __init__(
        self,
        *,
        patches_2d: torch.Tensor,
        patches_3d: torch.Tensor,
        rows_2d: torch.Tensor,
        rows_3d: torch.Tensor,
        coords_mm: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        kept_indices: torch.Tensor,
        grid_shapes: Sequence[Sequence[int]],
        is_3d: Sequence[bool],
        modalities: Sequence[str | None],
        patch_size: Sequence[int],
        validate: bool = True,
    ) -> None:
        self.patches_2d = patches_2d
        self.patches_3d = patches_3d
        self.rows_2d = rows_2d
        self.rows_3d = rows_3d
        self.coords_mm = coords_mm
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = int(max_seqlen)
        self.kept_indices = kept_indices
        self.grid_shapes = tuple(tuple(int(g) for g in shape) for shape in grid_shapes)
        self.is_3d = tuple(bool(flag) for flag in is_3d)
        self.modalities = tuple(modalities)
        self.patch_size: PatchSize = check_patch_size(patch_size, "PackedBatch")
        if validate:
            self._validate()
        offsets = self._offsets()
        self.lengths: tuple[int, ...] = tuple(end - start for start, end in zip(offsets[:-1], offsets[1:]))
        self.validated = bool(validate)

    # ----------------------------------------------------------------------------------------------
    # Shape facts

    @property
    def num_images(self) -> int:
        return len(self.is_3d)

    @property
    def num_tokens(self) -> int:
        return int(self.coords_mm.shape[0])

    @property
    def device(self) -> torch.device:
        return self.coords_mm.device

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (
            f"PackedBatch(images={self.num_images} ({sum(self.is_3d)} 3D), tokens={self.num_tokens}, "
            f"max_seqlen={self.max_seqlen}, patch_size={self.patch_size}, device={self.device})"
        )

    def sequence_ids(self) -> torch.Tensor:
        """int64 ``(T,)``: the image index of every token."""
        starts = self.cu_seqlens.long()
        return torch.searchsorted(starts[1:], torch.arange(self.num_tokens, device=self.device), right=True)

    # ----------------------------------------------------------------------------------------------
    # Moving

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """The same batch with every tensor on ``device`` (no new validation)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        """The same batch with every tensor in pinned host memory (DataLoader(pin_memory=True) calls this)."""
        return self._map_tensors(lambda t: t.pin_memory())

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedBatch:
        moved = object.__new__(PackedBatch)
        moved.__dict__.update(self.__dict__)
        for name in _TENSOR_FIELDS:
            setattr(moved, name, fn(getattr(self, name)))
        return moved

    # ----------------------------------------------------------------------------------------------
    # Per-image views of per-token results

    def split(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Per-image slices ``(L_b, ...)`` of per-token ``features`` ``(T, ...)`` in packed order."""
        self._check_features(features, "split")
        return list(torch.split(features, list(self.lengths)))

    def _check_features(self, features: torch.Tensor, op: str) -> None:
        if not isinstance(features, torch.Tensor) or features.dim() < 1 or features.shape[0] != self.num_tokens:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"PackedBatch.{op}: features must have shape ({self.num_tokens}, ...), got {shape}")

    # ----------------------------------------------------------------------------------------------
    # Validation, once, when built

    def _offsets(self) -> list[int]:
        if "_offsets_host" not in self.__dict__:
            self._offsets_host = self.cu_seqlens.tolist()
        return self._offsets_host

    def _validate(self) -> None:
        pz, py, px = self.patch_size
        device = self.coords_mm.device if isinstance(self.coords_mm, torch.Tensor) else None
        expected = {
            "patches_2d": (torch.float32, 2),
            "patches_3d": (torch.float32, 2),
            "rows_2d": (torch.int64, 1),
            "rows_3d": (torch.int64, 1),
            "coords_mm": (torch.float32, 2),
            "cu_seqlens": (torch.int32, 1),
            "kept_indices": (torch.int64, 1),
        }
        for name, (dtype, rank) in expected.items():
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"PackedBatch: {name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dtype != dtype:
                raise TypeError(f"PackedBatch: {name} must be {dtype}, got {value.dtype}")
            if value.dim() != rank:
                raise ValueError(f"PackedBatch: {name} must have {rank} dimensions, got shape {tuple(value.shape)}")
            if value.device != device:
                raise ValueError(f"PackedBatch: {name} must be on coords_mm's device {device}, got {value.device}")
        num_2d, num_3d = self.patches_2d.shape[0], self.patches_3d.shape[0]
        num_tokens = num_2d + num_3d
        if self.patches_2d.shape[1] != py * px:
            raise ValueError(
                f"PackedBatch: patches_2d must have py * px = {py * px} columns for patch_size {self.patch_size}, "
                f"got shape {tuple(self.patches_2d.shape)}"
            )
        if self.patches_3d.shape[1] != pz * py * px:
            raise ValueError(
                f"PackedBatch: patches_3d must have pz * py * px = {pz * py * px} columns for patch_size "
                f"{self.patch_size}, got shape {tuple(self.patches_3d.shape)}"
            )
        if self.rows_2d.shape[0] != num_2d or self.rows_3d.shape[0] != num_3d:
            raise ValueError(
                f"PackedBatch: rows_2d and rows_3d must have one entry per patch ({num_2d} and {num_3d}), got "
                f"{self.rows_2d.shape[0]} and {self.rows_3d.shape[0]}"
            )
        if tuple(self.coords_mm.shape) != (num_tokens, 3):
            raise ValueError(f"PackedBatch: coords_mm must have shape ({num_tokens}, 3), got {tuple(self.coords_mm.shape)}")
        if self.kept_indices.shape[0] != num_tokens:
            raise ValueError(
                f"PackedBatch: kept_indices must have one entry per token ({num_tokens}), got {self.kept_indices.shape[0]}"
            )
        if self.max_seqlen < 0:
            raise ValueError(f"PackedBatch: max_seqlen must be non-negative, got {self.max_seqlen}")
        num_images = self.cu_seqlens.shape[0] - 1
        if num_images < 1:
            raise ValueError("PackedBatch: cu_seqlens must describe at least one image, got shape (1,)")
        check_cu_seqlens_values(self.cu_seqlens, num_tokens, self.max_seqlen, "PackedBatch")
        for name in ("grid_shapes", "is_3d", "modalities"):
            if len(getattr(self, name)) != num_images:
                raise ValueError(
                    f"PackedBatch: {name} must have one entry per image ({num_images}), got {len(getattr(self, name))}"
                )
        for b, (shape, is_3d) in enumerate(zip(self.grid_shapes, self.is_3d)):
            if len(shape) != 3 or any(g < 1 for g in shape) or (not is_3d and shape[0] != 1):
                raise ValueError(
                    f"PackedBatch: grid_shapes[{b}] must be (gz, gy, gx) of positive sizes with gz = 1 for a 2D "
                    f"image, got {shape}"
                )
        for b, modality in enumerate(self.modalities):
            if modality is not None and not isinstance(modality, str):
                raise TypeError(f"PackedBatch: modalities[{b}] must be a string or None, got {type(modality).__name__}")
        for name in ("patches_2d", "patches_3d", "coords_mm"):
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise ValueError(f"PackedBatch: {name} must be finite, got NaN or infinite values")
        self._validate_rows_and_indices(num_tokens, num_images)

    def _validate_rows_and_indices(self, num_tokens: int, num_images: int) -> None:
        sequence = self.sequence_ids()
        image_is_3d = torch.tensor(self.is_3d, dtype=torch.bool, device=self.device)
        rows = torch.cat((self.rows_2d, self.rows_3d))
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_tokens):
            raise ValueError(f"PackedBatch: rows_2d and rows_3d must lie in [0, {num_tokens}), got values outside it")
        if not bool((torch.bincount(rows, minlength=num_tokens) == 1).all()):
            raise ValueError("PackedBatch: rows_2d and rows_3d together must name every stream row exactly once")
        if bool(image_is_3d[sequence[self.rows_2d]].any()):
            raise ValueError("PackedBatch: rows_2d must only name rows of 2D images (is_3d False)")
        if not bool(image_is_3d[sequence[self.rows_3d]].all()):
            raise ValueError("PackedBatch: rows_3d must only name rows of 3D images (is_3d True)")
        grid_sizes = torch.tensor([math.prod(s) for s in self.grid_shapes], dtype=torch.int64, device=self.device)
        token_grid_size = grid_sizes[sequence]
        kept = self.kept_indices
        if bool(((kept < 0) | (kept >= token_grid_size)).any()):
            raise ValueError("PackedBatch: kept_indices must lie inside each image's grid (0 <= index < gz * gy * gx)")
        unique_keys = torch.unique(sequence * int(grid_sizes.max()) + kept)
        if unique_keys.numel() != num_tokens:
            raise ValueError("PackedBatch: kept_indices must not repeat a grid position within an image")


def pack(items: Sequence[TokenizedImage]) -> PackedBatch:
    """Pack tokenised images, in order, into one validated :class:`PackedBatch`.

    All items must share a patch size and a device. This is the collate function of a data loader
    whose dataset returns :class:`~mmv.tokenizer.TokenizedImage` items.
    """
    items = list(items)
    if not items:
        raise ValueError("pack: items must hold at least one TokenizedImage, got none")
    for i, item in enumerate(items):
        if not isinstance(item, TokenizedImage):
            raise TypeError(f"pack: items[{i}] must be a TokenizedImage, got {type(item).__name__}")
    patch_size = items[0].patch_size
    device = items[0].patches.device
    for i, item in enumerate(items):
        if item.patch_size != patch_size:
            raise ValueError(f"pack: items[{i}] has patch_size {item.patch_size}, items[0] has {patch_size}")
        if item.patches.device != device:
            raise ValueError(f"pack: items[{i}] is on {item.patches.device}, items[0] on {device}")
    lengths = [item.num_tokens for item in items]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    pz, py, px = patch_size
    rows = {False: [], True: []}
    patches = {False: [], True: []}
    for item, start in zip(items, offsets[:-1]):
        rows[item.is_3d].append(torch.arange(start, start + item.num_tokens, device=device))
        patches[item.is_3d].append(item.patches)
    empty_rows = torch.zeros(0, dtype=torch.int64, device=device)
    return PackedBatch(
        patches_2d=torch.cat(patches[False]) if patches[False] else torch.zeros(0, py * px, device=device),
        patches_3d=torch.cat(patches[True]) if patches[True] else torch.zeros(0, pz * py * px, device=device),
        rows_2d=torch.cat(rows[False]) if rows[False] else empty_rows,
        rows_3d=torch.cat(rows[True]) if rows[True] else empty_rows,
        coords_mm=torch.cat([item.coords_mm for item in items]),
        cu_seqlens=torch.tensor(offsets, dtype=torch.int32, device=device),
        max_seqlen=max(lengths),
        kept_indices=torch.cat([item.kept_indices for item in items]),
        grid_shapes=[item.grid_shape for item in items],
        is_3d=[item.is_3d for item in items],
        modalities=[item.modality for item in items],
        patch_size=patch_size,
    )


def unpack(batch: PackedBatch, features: torch.Tensor) -> list[torch.Tensor]:
    """Scatter per-token ``features`` ``(T, ...)`` back onto each image's token grid.

    Returns one tensor per image, ``(gz, gy, gx, ...)`` for a volume and ``(gy, gx, ...)`` for a 2D
    image; grid positions whose token was dropped hold NaN. ``features`` must be floating point.
    """
    batch._check_features(features, "unpack")
    if not features.is_floating_point():
        raise TypeError(f"unpack: features must be floating point (dropped tokens become NaN), got {features.dtype}")
    grids = []
    for image_features, kept, shape, is_3d in zip(
        batch.split(features), batch.split(batch.kept_indices), batch.grid_shapes, batch.is_3d
    ):
        grid = image_features.new_full((math.prod(shape), *features.shape[1:]), float("nan"))
        grid[kept] = image_features
        grids.append(grid.reshape(*(shape if is_3d else shape[1:]), *features.shape[1:]))
    return grids
