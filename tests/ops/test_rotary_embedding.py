"""``rotary_embedding_2d``: its checks, and the Triton backend against the float64 reference
in Triton's CPU interpreter (a subprocess running this file, see triton_interpreter.py)."""
import pytest
import torch

from mmseg_segman.models.layers import RoPE2d
from mmseg_segman.ops import rotary_embedding_2d
from mmseg_segman.ops.rotary_embedding import _rotary_embedding


def make_inputs(batch, heads, height, width, dim, dtype, seed=0):
    """Queries as the encoder makes them: a permuted view of a ``qkv`` map."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, 3, heads, dim, height, width, generator=g).to(dtype)
    sin, cos = RoPE2d(dim)((height, width))
    return qkv.permute(1, 0, 2, 4, 5, 3)[0], sin, cos


def test_scale_and_refusals():
    x, sin, cos = make_inputs(2, 3, 4, 5, 8, torch.float64)
    torch.testing.assert_close(rotary_embedding_2d(x, sin, cos, 0.25),
                               rotary_embedding_2d(x, sin, cos) * 0.25)
    with pytest.raises(ValueError, match=r'\(B, heads, H, W, d\) with d even'):
        rotary_embedding_2d(x[..., :7], sin[..., :7], cos[..., :7])
    with pytest.raises(ValueError, match=r'sin and cos must be \(4, 5, 8\)'):
        rotary_embedding_2d(x, sin[:3], cos[:3])


def test_not_chosen_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    x, sin, cos = make_inputs(1, 1, 2, 3, 4, torch.float32)
    assert 'TRITON_INTERPRET' in _rotary_embedding.why_not('triton', x, sin, cos, 1.0)
    assert _rotary_embedding.select(x, sin, cos, 1.0) == 'torch'


def test_triton_rotary_embedding_in_interpreter():
    pytest.importorskip('triton')
    from .triton_interpreter import assert_checks_pass_in_interpreter
    assert_checks_pass_in_interpreter(__file__, timeout=300)


# ---- run in Triton's interpreter (python tests/ops/test_rotary_embedding.py, TRITON_INTERPRET=1)

def check(batch, heads, height, width, dim, dtype, scale, tol):
    """Output and input gradient of the Triton backend against the float64 reference."""
    triton_backend = _rotary_embedding.backends['triton'].fn
    reference = _rotary_embedding.backends['torch'].fn
    x, sin, cos = make_inputs(batch, heads, height, width, dim, dtype, seed=height * width)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for fn, dt in ((triton_backend, dtype), (reference, torch.float64)):
        leaf = x.detach().to(dt).requires_grad_()
        out = fn(leaf, sin, cos, scale)
        # the gradient as the op returns it (.grad would be copied to the layout of the leaf)
        results.append((out, *torch.autograd.grad(out, leaf, dy.to(out.dtype))))
    (out, dx), (want, want_dx) = results
    assert out.dtype == dtype and out.is_contiguous() and out.shape == x.shape
    # x is a view of a map: its gradient laid out as a map's, for qkv's gradient to be one cat
    assert dx.permute(0, 1, 4, 2, 3).is_contiguous(), dx.stride()
    for name, a, e in (('out', out, want), ('dx', dx, want_dx)):
        error = (a.double() - e).abs().max().item() / e.abs().max().item()
        assert error < tol, f'{name}: relative error {error:.2e} over {tol} ({x.shape}, {dtype})'


def check_direct_launch_equals_function():
    """Without autograd recording the kernel runs without its autograd.Function: same output."""
    from triton_interpreter import check_launches_directly

    from mmseg_segman.ops import triton_rotary_embedding as trope

    x, sin, cos = make_inputs(2, 2, 5, 7, 12, torch.float32)
    check_launches_directly(trope.ROTARY_EMBEDDING.function, trope.rotary_embedding_triton,
                            [x, sin, cos, 0.5], differentiable=0)


def check_custom_op():
    """The kernel as custom ops (opcheck: schema, fake shapes, autograd, on a strided ``x``);
    eager calls skip them and match them bitwise; torch.compile traces them
    (:func:`triton_interpreter.check_eager_calls_skip_custom_ops`)."""
    from triton_interpreter import check_eager_calls_skip_custom_ops

    from mmseg_segman.ops.triton_rotary_embedding import ROTARY_EMBEDDING, rotary_embedding_triton

    x, sin, cos = make_inputs(2, 2, 5, 7, 12, torch.float32)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2).detach().requires_grad_()
    torch.library.opcheck(ROTARY_EMBEDDING.forward_op, (strided, sin, cos, 0.5, False, False))
    for planar_out in (False, True):
        torch.library.opcheck(ROTARY_EMBEDDING.backward_op, (x, sin, cos, 0.5, True, planar_out))
    # a contiguous x (not a map's view): its gradient contiguous
    leaf = x.contiguous().requires_grad_()
    grad, = torch.autograd.grad(rotary_embedding_triton(leaf, sin, cos), leaf, torch.ones(x.shape))
    assert grad.is_contiguous()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    check_eager_calls_skip_custom_ops(
        lambda x: rotary_embedding_triton(x, sin, cos, 0.5),
        lambda x: ROTARY_EMBEDDING.forward_op(x, sin, cos, 0.5, False, False), [x], dy,
        ('rotary_embedding_forward', 'rotary_embedding_backward'))
    print('custom op: ok')


def main():
    # head dims 8 to 36 (SegMAN's: 8 to 36, 32 padded to powers of two), maps over one block of
    # pixels, one pixel; queries' scale
    for shape in [(2, 3, 4, 5, 8), (1, 2, 9, 17, 36), (1, 1, 1, 1, 4), (2, 1, 3, 30, 24)]:
        check(*shape, torch.float32, 1.0, 1e-6)
    check(2, 3, 4, 5, 8, torch.float32, 0.125, 1e-6)
    check(1, 2, 8, 10, 12, torch.float32, 1.0, 1e-6)  # pixel count a multiple of 8: ALIGN 8
    check(1, 2, 9, 17, 36, torch.bfloat16, 0.2, 1e-2)
    check_direct_launch_equals_function()
    check_custom_op()
    print('all checks passed')


if __name__ == '__main__':
    main()
