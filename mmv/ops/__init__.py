"""mmv's two fused ops, with autograd, fake kernels for torch.compile, and a reference fallback.

``rope3d`` rotates query/key channels by 3D token positions; ``packed_attention`` runs block-diagonal
attention over sequences packed end to end. Both dispatch to compiled CPU and CUDA kernels
(``torch.ops.mmv.*``); on a device without a kernel they warn once and run :mod:`mmv.ops.reference`.
"""

from mmv.ops._kernels import extension_loaded, has_kernel
from mmv.ops.packed_attention import packed_attention
from mmv.ops.rope3d import default_sections, rope3d, rope_freqs

__all__ = ["rope3d", "rope_freqs", "default_sections", "packed_attention", "has_kernel", "extension_loaded"]
