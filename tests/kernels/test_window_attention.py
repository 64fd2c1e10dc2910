"""Sliding-window + sinks baseline: the chunked form equals the masked reference; masks are what they claim."""

import pytest
import torch

from kernels.window_attention import (
    chunked_sliding_window_sink_attention,
    sliding_window_sink_attention,
    sliding_window_sink_mask,
)


def test_mask_counts():
    mask = sliding_window_sink_mask(20, window_size=4, num_sinks=2)
    counts = mask.sum(-1).tolist()
    assert counts[:6] == [1, 2, 3, 4, 5, 6]  # sinks and window overlap at the start
    assert all(c == 6 for c in counts[6:])   # 2 sinks + 4 window keys afterwards
    assert not mask.triu(1).any()


@pytest.mark.parametrize("length", [1, 9, 40, 77])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
def test_chunked_equals_reference(length, heads):
    gen = torch.Generator().manual_seed(length)
    hq, hkv = heads
    q = torch.randn(2, hq, length, 16, generator=gen)
    k = torch.randn(2, hkv, length, 16, generator=gen)
    v = torch.randn(2, hkv, length, 16, generator=gen)
    ref = sliding_window_sink_attention(q, k, v, window_size=8, num_sinks=3)
    got = chunked_sliding_window_sink_attention(q, k, v, window_size=8, num_sinks=3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="window_size"):
        sliding_window_sink_mask(4, 0, 1)
    with pytest.raises(ValueError, match="heads"):
        sliding_window_sink_attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
