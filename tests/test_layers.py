"""model/layers.py: rotary embeddings against their defining formula."""
from __future__ import annotations

import pytest
import torch

from blt_dist.model.layers import apply_rotary, rotary_cos_sin


def rotary_by_the_formula(x, cos, sin):
    """(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos) for each interleaved pair."""
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_the_pair_formula_forward_and_backward(dtype):
    torch.manual_seed(0)
    # [B, T, H, hd] transposed to [B, H, T, hd], as the attention layers call it (not contiguous)
    x = torch.randn(2, 37, 3, 16, dtype=dtype).transpose(1, 2).requires_grad_()
    cos, sin = rotary_cos_sin(37, 16, 10000.0, "cpu", start=5)
    out, ref = apply_rotary(x, cos, sin), rotary_by_the_formula(x, cos, sin)
    assert out.dtype == dtype and torch.equal(out, ref)
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, x, grad)
    (theirs,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_rotary_scores_depend_only_on_the_distance():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = rotary_cos_sin(64, 8, 10000.0, "cpu")

    def score(m, n):
        return (apply_rotary(q, cos[m:m + 1], sin[m:m + 1]) * apply_rotary(k, cos[n:n + 1], sin[n:n + 1])).sum()

    assert score(3, 1).item() == pytest.approx(score(40, 38).item(), abs=1e-5)  # fp32 angles
    assert score(3, 1).item() != pytest.approx(score(3, 2).item(), abs=1e-3)
    assert torch.equal(apply_rotary(q, cos[:1], sin[:1]), q)  # position 0 is not rotated
