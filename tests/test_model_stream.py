"""mmv.model.stream: the prefix layout of the encoder's token stream and its row permutations."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmv.model.stream import inverse_permutation, permute_rows, prefix_layout
from mmv.packing import cu_seqlens_from_lengths


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 5), min_size=1, max_size=5), num_prefix=st.integers(0, 3))
def test_prefix_layout_matches_inserting_prefix_tokens_one_sequence_at_a_time(lengths, num_prefix):
    cu = cu_seqlens_from_lengths(lengths)
    layout = prefix_layout(cu, sum(lengths), max(lengths), num_prefix)
    patch_rows, prefix_rows, sequence_ids, new_lengths = [], [], [], []
    row = 0
    for b, length in enumerate(lengths):
        prefix_rows.append(list(range(row, row + num_prefix)))
        patch_rows.extend(range(row + num_prefix, row + num_prefix + length))
        sequence_ids.extend([b] * (num_prefix + length))
        new_lengths.append(num_prefix + length)
        row += num_prefix + length
    assert layout.cu_seqlens.tolist() == cu_seqlens_from_lengths(new_lengths).tolist()
    assert layout.cu_seqlens.dtype == torch.int32
    assert layout.max_seqlen == max(lengths) + num_prefix
    assert layout.patch_rows.tolist() == patch_rows
    assert layout.prefix_rows.tolist() == prefix_rows
    assert layout.sequence_ids.tolist() == sequence_ids


def test_permute_rows_gathers_forward_and_backward():
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(7, generator=generator)
    inverse = inverse_permutation(order)
    assert torch.equal(order[inverse], torch.arange(7)) and torch.equal(inverse[order], torch.arange(7))
    rows = torch.randn(7, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.equal(permute_rows(rows, order, inverse), rows[order])
    assert torch.autograd.gradcheck(lambda r: permute_rows(r, order, inverse), (rows,))
