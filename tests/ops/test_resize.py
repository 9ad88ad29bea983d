"""``resize_bilinear`` and the interpolation matrices against ``F.interpolate``."""
import pytest
import torch
import torch.nn.functional as F

from mmseg_segman.ops import resize_bilinear
from mmseg_segman.ops.resize import _resize_bilinear, bilinear_matrix

matmul = _resize_bilinear.backends['matmul'].fn


@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('size', [(64, 64), (512, 512), (37, 90), (5, 3), (1, 1), (16, 17)])
def test_matmul_backend_matches_f_interpolate(size, align_corners):
    """Values and input gradients, up and down, odd sizes (float32 coordinate rounding)."""
    x = torch.randn(2, 3, 16, 17, generator=torch.Generator().manual_seed(0), requires_grad=True)
    dy = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    got = matmul(x, size, align_corners)
    (grad_got,) = torch.autograd.grad(got, x, dy)
    want = F.interpolate(x, size=size, mode='bilinear', align_corners=align_corners)
    (grad_want,) = torch.autograd.grad(want, x, dy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-4)


def test_matrices_built_in_inference_mode_serve_training():
    bilinear_matrix.cache_clear()
    x = torch.randn(1, 2, 4, 4)
    with torch.inference_mode():
        matmul(x, (8, 8), False)
    leaf = x.clone().requires_grad_()
    matmul(leaf, (8, 8), False).sum().backward()  # the cached matrices are saved for backward
    assert leaf.grad is not None


def test_under_autocast_computes_in_its_dtype():
    x = torch.randn(1, 2, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = matmul(x, (16, 16), False)
    assert out.dtype == torch.bfloat16
    want = F.interpolate(x, size=(16, 16), mode='bilinear', align_corners=False)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_reference_on_cpu_and_bad_sizes_refused():
    x = torch.randn(1, 2, 8, 8)
    assert 'CUDA only' in _resize_bilinear.why_not('matmul', x, (4, 4), False)
    torch.testing.assert_close(resize_bilinear(x, (4, 5)),
                               F.interpolate(x, size=(4, 5), mode='bilinear', align_corners=False))
    with pytest.raises(ValueError, match='size'):
        resize_bilinear(x, (0, 4))
    with pytest.raises(ValueError, match=r'\(B, C, h, w\)'):
        resize_bilinear(x[0], (4, 4))
