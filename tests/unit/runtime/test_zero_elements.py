"""ZeRO-1 reads only its share of a bucket: runtime.zero._elements equals slicing the whole bucket flattened."""

from __future__ import annotations

import torch

from runtime.zero import _elements


def test_a_shares_elements_equal_the_flattened_buckets_slice():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=gen) for shape in ((3, 4), (5,), (2, 2, 2), (7,))]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    for lo, hi in [(0, flat.numel()), (0, 12), (12, 17), (5, 30), (13, 14), (25, 32), (30, 32)]:
        assert torch.equal(_elements(tensors, lo, hi), flat[lo:hi]), (lo, hi)
