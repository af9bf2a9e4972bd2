"""Direction matrices that are signed permutations: the volumes mmv turns to LPS by axis swaps and flips.

Shared by the file readers (:mod:`mmv.data.io`, ITK's direction cosines) and the MetaTensor path
(:mod:`mmv.meta_tensor`, MONAI's affine), so both read the same orientation the same way.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PERMUTATION_TOLERANCE", "signed_permutation"]

# A direction matrix closer than this to a signed permutation is treated as one: DICOM stores
# orientation cosines with ~6 decimals, and 1e-4 rad moves a voxel 200 mm away by 0.02 mm.
PERMUTATION_TOLERANCE = 1e-4


def signed_permutation(direction: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """For a direction matrix (physical axis by row, index axis by column) within
    :data:`PERMUTATION_TOLERANCE` of a signed permutation: the index axis running along each physical
    axis and its sign; None for an oblique one."""
    source_axis = np.argmax(np.abs(direction), axis=1)
    if len(set(source_axis.tolist())) != direction.shape[0]:
        return None
    signs = np.sign(direction[np.arange(direction.shape[0]), source_axis])
    permutation = np.zeros_like(direction)
    permutation[np.arange(direction.shape[0]), source_axis] = signs
    if np.max(np.abs(direction - permutation)) > PERMUTATION_TOLERANCE:
        return None
    return source_axis, signs
