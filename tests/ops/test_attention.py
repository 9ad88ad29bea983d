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


@pytest.mark.parametrize('dim', [4, 8])  # padded to 8 / as it comes
def test_sdpa_matches_the_reference_with_and_without_bias(dim):
    q, k, v, bias = make_inputs(dim=dim)
    for b in (bias, None):
        want = _biased_attention.backends['torch'].fn(q, k, v, b)
        got = _biased_attention.backends['sdpa'].fn(q, k, v, b)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def record_sdpa_calls(monkeypatch) -> list:
    """Each call of ``F.scaled_dot_product_attention`` from the op: its inputs' head dims and
    strides along them, and whether cuDNN's kernel was allowed."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append(dict(dims=[t.size(-1) for t in (q, k, v)], strides=[t.stride(-1) for t in (q, k, v)],
                         cudnn=torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, 'scaled_dot_product_attention', recording)
    return seen


@pytest.mark.parametrize('dim', [4, 8, 28])
def test_sdpa_gets_what_the_fused_kernels_take(monkeypatch, dim):
    # head dims that are multiples of 8, unit stride along them (else PyTorch's fused CUDA
    # kernels fall back to float32 math), and cuDNN's kernel off (an execution plan for every
    # new sequence length)
    seen = record_sdpa_calls(monkeypatch)
    q, k, v, bias = make_inputs(dim=dim)
    assert v.stride(-1) != 1
    _biased_attention.backends['sdpa'].fn(q, k, v, bias)
    padded = -(-dim // 8) * 8
    assert seen == [dict(dims=[padded] * 3, strides=[1, 1, 1], cudnn=False)]
    assert torch.backends.cuda.cudnn_sdp_enabled()  # as it was, after the call


def test_bad_shapes_are_refused():
    q, k, v, bias = make_inputs()
    with pytest.raises(ValueError, match='share one'):
        biased_attention(q, k[:, :2], v, bias)
    with pytest.raises(ValueError, match='bias must be'):
        biased_attention(q, k, v, bias[:2])
