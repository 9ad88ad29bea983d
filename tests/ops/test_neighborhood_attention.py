"""Neighborhood attention reference against the spec's NATTEN rules, written out literally."""
import pytest
import torch

from mmseg_segman.ops import neighborhood_attention_2d
from mmseg_segman.ops.neighborhood_attention import window_starts

from .autograd_memory import saved_bytes


def natten_start(i, n, k):
    r = k // 2
    return max(i - r, 0) + (i + r >= n) * (n - i - r - 1)


def natten_bias_start(i, n, k):
    r = k // 2
    return r + (i < r) * (r - i) + (i + r >= n) * (n - i - 1 - r)


def brute_force(q, k, v, kernel, rpb):
    """One query at a time, the windows and bias indices of the spec (n >= k only)."""
    batch, heads, height, width, _ = q.shape
    out = torch.empty_like(q)
    for i in range(height):
        for j in range(width):
            si, sj = natten_start(i, height, kernel), natten_start(j, width, kernel)
            pi, pj = natten_bias_start(i, height, kernel), natten_bias_start(j, width, kernel)
            keys = k[:, :, si:si + kernel, sj:sj + kernel].flatten(2, 3)
            vals = v[:, :, si:si + kernel, sj:sj + kernel].flatten(2, 3)
            logits = torch.einsum('bnd,bnjd->bnj', q[:, :, i, j], keys)
            if rpb is not None:
                logits = logits + rpb[:, pi:pi + kernel, pj:pj + kernel].flatten(1)
            out[:, :, i, j] = torch.einsum('bnj,bnjd->bnd', logits.softmax(-1), vals)
    return out


@pytest.mark.parametrize('n,k', [(7, 3), (9, 5), (11, 11), (6, 5), (20, 7)])
def test_window_starts_follow_natten(n, k):
    assert window_starts(n, k).tolist() == [natten_start(i, n, k) for i in range(n)]


@pytest.mark.parametrize('height,width,kernel', [(7, 9, 5), (5, 5, 5), (8, 6, 3), (9, 11, 7)])
@pytest.mark.parametrize('with_rpb', [True, False])
def test_matches_natten_rules(height, width, kernel, with_rpb):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, height, width, 4, dtype=torch.float64)
    rpb = torch.randn(3, 2 * kernel - 1, 2 * kernel - 1, dtype=torch.float64) if with_rpb else None
    torch.testing.assert_close(neighborhood_attention_2d(q, k, v, kernel, rpb),
                               brute_force(q, k, v, kernel, rpb), rtol=1e-10, atol=1e-10)


def test_axis_shorter_than_kernel_attends_to_whole_axis():
    """NATTEN refuses n < k; we attend to all n keys, biased by relative offset."""
    torch.manual_seed(0)
    kernel = 7
    q, k, v = torch.randn(3, 1, 2, 3, 4, 5, dtype=torch.float64)
    rpb = torch.randn(2, 13, 13, dtype=torch.float64)
    out = neighborhood_attention_2d(q, k, v, kernel, rpb)
    # with every key in the window this is full attention with bias rpb[dy + k - 1, dx + k - 1]
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing='ij')
    rows, cols = rows.flatten(), cols.flatten()
    bias = rpb[:, rows[None, :] - rows[:, None] + kernel - 1, cols[None, :] - cols[:, None] + kernel - 1]
    logits = q.flatten(2, 3) @ k.flatten(2, 3).transpose(-1, -2) + bias
    expected = (logits.softmax(-1) @ v.flatten(2, 3)).view_as(out)
    torch.testing.assert_close(out, expected)


def test_gradcheck():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: neighborhood_attention_2d(*t[:3], 3, t[3]), (q, k, v, rpb))


def test_bad_input_is_named():
    q = torch.randn(1, 2, 5, 5, 4)
    with pytest.raises(ValueError, match='odd'):
        neighborhood_attention_2d(q, q, q, 4)
    with pytest.raises(ValueError, match='rpb must be'):
        neighborhood_attention_2d(q, q, q, 3, torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match='share one'):
        neighborhood_attention_2d(q, q[..., :2], q, 3)


@pytest.mark.parametrize('height,width,kernel,dim', [(9, 11, 7, 16), (13, 20, 9, 32)])
def test_natten_backend_matches_reference(height, width, kernel, dim):
    """The ``natten`` backend (models without rpb) wraps natten's ``na2d`` with the layout and
    scaling of the reference; natten runs on the CPU too (its Flex backend), forward only."""
    pytest.importorskip('natten')
    from mmseg_segman.ops.neighborhood_attention import (_neighborhood_attention_natten,
                                                         _neighborhood_attention_torch)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, height, width, dim) for _ in range(3))
    torch.testing.assert_close(_neighborhood_attention_natten(q, k, v, kernel, None),
                               _neighborhood_attention_torch(q, k, v, kernel, None),
                               rtol=1e-4, atol=1e-5)


def test_natten_backend_needs_its_fused_kernels_and_no_rpb():
    """natten (tried first, see test_flex_is_preferred_on_cuda_only) runs only on CUDA, without
    rpb and with libnatten; elsewhere the choice falls through (here on the CPU: to the reference)."""
    from mmseg_segman.ops.neighborhood_attention import _natten_unavailable, _neighborhood_attention
    q = torch.randn(1, 2, 9, 9, 8)
    assert _natten_unavailable(q, q, q, 7, None) == 'needs CUDA tensors'
    assert 'rpb' in _natten_unavailable(q, q, q, 7, torch.zeros(2, 13, 13))
    assert _neighborhood_attention.select(q, q, q, 7, None) == 'torch'


def test_reference_keeps_no_copies_of_the_windows():
    """For its backward the reference keeps less than the k*k neighbours' keys of every query
    (gathering keys and values per query would keep twice that)."""
    kernel = 7
    q, k, v = (torch.randn(1, 2, 24, 24, 16, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 2 * kernel - 1, 2 * kernel - 1, requires_grad=True)
    assert saved_bytes(neighborhood_attention_2d, q, k, v, kernel, rpb) <= \
        kernel * kernel * q.numel() * q.element_size()


@pytest.mark.parametrize('height,width,kernel', [(6, 9, 7), (4, 3, 5)])
def test_gradcheck_at_borders_and_short_axes(height, width, kernel):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, height, width, 3, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    rpb = torch.randn(2, 2 * kernel - 1, 2 * kernel - 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: neighborhood_attention_2d(*t[:3], kernel, t[3]),
                                    (q, k, v, rpb))
