"""``biased_attention``: its checks, and the ``sdpa`` backend against the reference."""
import pytest
import torch
import torch.nn.functional as F

from mmseg_segman.ops import attention
from mmseg_segman.ops.attention import _biased_attention, biased_attention


def make_inputs(batch=2, heads=3, length=10, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, length, dim, generator=g) for _ in range(2))
    # the value as SegMAN's stage 4 passes it: laid out along the tokens (d strided)
    v = torch.randn(batch, heads, dim, length, generator=g).transpose(-1, -2)
    return q, k, v, torch.randn(heads, length, length, generator=g)


def test_sdpa_matches_the_reference_with_and_without_bias():
    q, k, v, bias = make_inputs()
    for b in (bias, None):
        want = _biased_attention.backends['torch'].fn(q, k, v, b)
        got = _biased_attention.backends['sdpa'].fn(q, k, v, b)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sdpa_gets_unit_stride_along_the_head_dim(monkeypatch):
    # PyTorch's fused CUDA kernels refuse other strides and fall back to float32 math
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append([t.stride(-1) for t in (q, k, v)])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, 'scaled_dot_product_attention', recording)
    q, k, v, bias = make_inputs()
    assert v.stride(-1) != 1
    _biased_attention.backends['sdpa'].fn(q, k, v, bias)
    assert seen == [[1, 1, 1]]


def test_bad_shapes_are_refused():
    q, k, v, bias = make_inputs()
    with pytest.raises(ValueError, match='share one'):
        biased_attention(q, k[:, :2], v, bias)
    with pytest.raises(ValueError, match='bias must be'):
        biased_attention(q, k, v, bias[:2])
