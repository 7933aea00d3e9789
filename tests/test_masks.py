"""blockrag.masks against the loop reference."""

import pytest
import torch
from reference import reference_block_mask

from blockrag.masks import additive_mask, block_attention_mask, block_position_ids


@pytest.mark.parametrize("lengths,final", [([5], 3), ([1, 4, 2], 1), ([3, 3, 7, 1], 6), ([], 4)])
def test_block_mask_equals_reference(lengths, final):
    assert torch.equal(block_attention_mask(lengths, final), reference_block_mask(lengths, final))


@pytest.mark.parametrize("lengths,final", [([5], 3), ([1, 4, 2], 1), ([3, 3, 7, 1], 6), ([2, 3], 0)])
def test_shared_prefix_mask_equals_reference(lengths, final):
    mask = block_attention_mask(lengths, final, shared_prefix=True)
    assert torch.equal(mask, reference_block_mask(lengths, final, shared_prefix=True))
    if len(lengths) > 1:  # negative control: passages see block 0 here, not in the plain block mask
        assert not torch.equal(mask, block_attention_mask(lengths, final))
        assert mask[lengths[0], 0] and not block_attention_mask(lengths, final)[lengths[0], 0]


def test_block_mask_negative_control_differs_from_causal():
    mask = block_attention_mask([3, 3], 2)
    assert not torch.equal(mask, torch.ones(8, 8, dtype=torch.bool).tril())
    assert not mask[4, 1]  # second block does not see the first
    assert mask[7, 1] and mask[6, 5]  # the final block sees everything before it


def test_positions_with_and_without_reencoding():
    assert block_position_ids([2, 3], 2).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert block_position_ids([2, 3], 2, reencode=False).tolist() == [0, 1, 0, 1, 2, 5, 6]


def test_additive_mask():
    mask = block_attention_mask([2], 1)
    add = additive_mask(mask, torch.float32)
    assert (add[mask] == 0).all() and (add[~mask] == torch.finfo(torch.float32).min).all()
