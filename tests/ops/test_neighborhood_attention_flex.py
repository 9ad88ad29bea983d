"""The FlexAttention backend of neighborhood attention against the gather reference.

On CPU FlexAttention runs its eager math path, forward only (torch has no FlexAttention
backward on CPU): enough to check the block mask and the bias at small and odd sizes. On
CUDA the compiled kernel is also checked with gradients; ``tools/gpu_checks/check_ops.py``
covers it at model sizes and in bfloat16.
"""
import pytest
import torch

from mmseg_segman.ops.neighborhood_attention import (_flex_attention_available,
                                                     _neighborhood_attention,
                                                     _neighborhood_attention_flex,
                                                     _neighborhood_attention_torch)

pytestmark = [
    pytest.mark.skipif(not _flex_attention_available(),
                       reason='torch.nn.attention.flex_attention is missing'),
    pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile'),
]

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
# (H, W, kernel): odd sizes, a square window, axes shorter than the kernel, borders on both ends
SIZES = [(9, 13, 5), (7, 7, 7), (5, 12, 7), (3, 4, 5), (16, 11, 9), (10, 6, 3)]


def inputs(height, width, kernel, device, heads=2, dim=20, batch=2, requires_grad=False):
    q, k, v = (torch.randn(batch, heads, height, width, dim, device=device,
                           requires_grad=requires_grad) for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, device=device,
                      requires_grad=requires_grad)
    return q, k, v, rpb


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('use_rpb', [True, False])
@pytest.mark.parametrize('height,width,kernel', SIZES)
def test_flex_matches_reference(height, width, kernel, use_rpb, device):
    q, k, v, rpb = inputs(height, width, kernel, device)
    rpb = rpb if use_rpb else None
    with torch.no_grad():
        out = _neighborhood_attention_flex(q, k, v, kernel, rpb)
        ref = _neighborhood_attention_torch(q, k, v, kernel, rpb)
    assert out.shape == ref.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason='FlexAttention has no backward on CPU; check_ops.py checks it on CUDA')
@pytest.mark.parametrize('height,width,kernel', SIZES)
def test_flex_gradients_match_reference(height, width, kernel):
    grads = []
    for fn in (_neighborhood_attention_flex, _neighborhood_attention_torch):
        torch.manual_seed(0)
        q, k, v, rpb = inputs(height, width, kernel, 'cuda', requires_grad=True)
        fn(q, k, v, kernel, rpb).pow(2).sum().backward()
        grads.append([t.grad for t in (q, k, v, rpb)])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_backend_order():
    """The fused Triton kernels first, natten (models without rpb, with libnatten) and
    FlexAttention next, the reference last; on the CPU (no interpreter) the reference."""
    assert list(_neighborhood_attention.backends) == ['triton', 'natten', 'flex', 'torch']
    q, k, v, rpb = inputs(8, 8, 5, 'cpu')
    assert _neighborhood_attention.select(q, k, v, 5, rpb) == 'torch'


def test_flex_per_row_bias_table_when_training():
    """With a trainable rpb the flex path indexes per-(batch, query row) copies of it."""
    q, k, v, rpb = inputs(9, 13, 5, 'cpu')
    rpb.requires_grad_()
    with torch.enable_grad():
        out = _neighborhood_attention_flex(q, k, v, 5, rpb)
    with torch.no_grad():
        ref = _neighborhood_attention_torch(q, k, v, 5, rpb)
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-5)
