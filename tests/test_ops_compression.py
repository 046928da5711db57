"""Block extraction for phi: block i covers tokens [i*d, i*d + l) of its document."""

from __future__ import annotations

import pytest
import torch

from nsa_hf.ops import compress_blocks, mean_compress, num_compressed_blocks


@pytest.mark.parametrize("block_size,stride", [(32, 16), (8, 4), (16, 16), (8, 2)])
def test_blocks_are_the_strided_windows_of_each_row(block_size, stride):
    x = torch.randn(2, 75, 3, 4)
    blocks = compress_blocks(x, block_size, stride)
    count = num_compressed_blocks(75, block_size, stride)
    assert blocks.shape == (2, count, block_size, 3, 4)
    for i in range(count):
        assert torch.equal(blocks[:, i], x[:, i * stride : i * stride + block_size])
    torch.testing.assert_close(mean_compress(x, block_size, stride), blocks.mean(2))


def test_packed_documents_restart_their_blocks():
    lengths = [5, 40, 19]
    docs = [torch.randn(1, n, 2, 4) for n in lengths]
    cu = torch.tensor([0] + lengths).cumsum(0)
    packed = compress_blocks(torch.cat(docs, 1), 8, 4, cu_seqlens=cu)
    alone = torch.cat([compress_blocks(doc, 8, 4) for doc in docs], dim=1)
    assert torch.equal(packed, alone)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="`x`"):
        compress_blocks(torch.randn(10, 2, 4), 8, 4)
    with pytest.raises(ValueError, match="batch size must be 1"):
        compress_blocks(torch.randn(2, 10, 2, 4), 8, 4, cu_seqlens=torch.tensor([0, 10, 20]))
