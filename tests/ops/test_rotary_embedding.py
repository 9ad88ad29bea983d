"""``rotary_embedding_2d``: its checks, and the Triton backend against the float64 reference
in Triton's CPU interpreter (a subprocess running this file, see triton_interpreter.py)."""
import pytest
import torch

from mmseg_segman.models.layers import RoPE2d
from mmseg_segman.ops import rotary_embedding_2d
from mmseg_segman.ops.rotary_embedding import _rotary_embedding


def make_inputs(batch, heads, height, width, dim, dtype, seed=0):
    """Queries and keys as the encoder makes them: permuted views of a ``qkv`` map."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, 3, heads, dim, height, width, generator=g).to(dtype)
    sin, cos = RoPE2d(dim)((height, width))
    q, k, _ = qkv.permute(1, 0, 2, 4, 5, 3)
    return q, k, sin, cos


def test_scale_and_refusals():
    q, k, sin, cos = make_inputs(2, 3, 4, 5, 8, torch.float64)
    q_scaled, k_rotated = rotary_embedding_2d(q, k, sin, cos, 0.25)
    q_rotated, k_again = rotary_embedding_2d(q, k, sin, cos)
    torch.testing.assert_close(q_scaled, q_rotated * 0.25)
    assert torch.equal(k_rotated, k_again)  # the keys are not scaled
    # the keys are rotated as queries would be
    torch.testing.assert_close(rotary_embedding_2d(k, q, sin, cos)[0], k_rotated)
    with pytest.raises(ValueError, match=r'\(B, heads, H, W, d\) with d even'):
        rotary_embedding_2d(q[..., :7], k[..., :7], sin[..., :7], cos[..., :7])
    with pytest.raises(ValueError, match=r'sin and cos must be \(4, 5, 8\)'):
        rotary_embedding_2d(q, k, sin[:3], cos[:3])
    with pytest.raises(ValueError, match='k must have the shape, dtype and device of q'):
        rotary_embedding_2d(q, k[:1], sin, cos)
    with pytest.raises(ValueError, match='k must have the shape, dtype and device of q'):
        rotary_embedding_2d(q, k.float(), sin, cos)


def test_not_chosen_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    q, k, sin, cos = make_inputs(1, 1, 2, 3, 4, torch.float32)
    assert 'TRITON_INTERPRET' in _rotary_embedding.why_not('triton', q, k, sin, cos, 1.0, False)
    assert _rotary_embedding.select(q, k, sin, cos, 1.0, False) == 'torch'


def test_refused_by_triton_for_keys_of_other_strides(monkeypatch):
    """The kernel reads queries and keys through one set of strides: others go elsewhere."""
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    q, k, sin, cos = make_inputs(1, 2, 2, 3, 4, torch.float32)
    assert _rotary_embedding.why_not('triton', q, k, sin, cos, 1.0, False) is None
    reason = _rotary_embedding.why_not('triton', q, k.contiguous(), sin, cos, 1.0, False)
    assert 'different strides' in reason


def test_triton_rotary_embedding_in_interpreter():
    pytest.importorskip('triton')
    from .triton_interpreter import assert_checks_pass_in_interpreter
    assert_checks_pass_in_interpreter(__file__, timeout=300)


# ---- run in Triton's interpreter (python tests/ops/test_rotary_embedding.py, TRITON_INTERPRET=1)

def check(batch, heads, height, width, dim, dtype, scale, tol, planar=False):
    """Outputs and input gradients of the Triton backend against the float64 reference; with
    ``planar`` the outputs laid out as ``(B, heads, d, H, W)``."""
    triton_backend = _rotary_embedding.backends['triton'].fn
    reference = _rotary_embedding.backends['torch'].fn
    q, k, sin, cos = make_inputs(batch, heads, height, width, dim, dtype, seed=height * width)
    g = torch.Generator().manual_seed(1)
    dq, dk = torch.randn(q.shape, generator=g), torch.randn(q.shape, generator=g)
    results = []
    for fn, dt in ((triton_backend, dtype), (reference, torch.float64)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k)]
        outs = fn(*leaves, sin, cos, scale, planar)
        # the gradients as the op returns them (.grad would be copied to the leaves' layout)
        results.append((*outs, *torch.autograd.grad(outs, leaves, (dq.to(dt), dk.to(dt)))))
    for out in results[0][:2]:
        assert out.dtype == dtype and out.shape == q.shape
        assert (out.permute(0, 1, 4, 2, 3) if planar else out).is_contiguous(), out.stride()
    for grad in results[0][2:]:
        # q and k view a map: their gradients laid out as a map's, for qkv's to be one cat
        assert grad.permute(0, 1, 4, 2, 3).is_contiguous(), grad.stride()
    for name, a, e in zip(('q out', 'k out', 'dq', 'dk'), *results):
        error = (a.double() - e).abs().max().item() / e.abs().max().item()
        assert error < tol, f'{name}: relative error {error:.2e} over {tol} ({q.shape}, {dtype})'


def check_direct_launch_equals_function():
    """Without autograd recording the kernel runs without its autograd.Function: same
    outputs."""
    from triton_interpreter import check_launches_directly

    from mmseg_segman.ops import triton_rotary_embedding as trope

    q, k, sin, cos = make_inputs(2, 2, 5, 7, 12, torch.float32)
    check_launches_directly(trope.ROTARY_EMBEDDING.function,
                            lambda *args: torch.stack(trope.rotary_embedding_triton(*args)),
                            [q, k, sin, cos, 0.5], differentiable=0)


def check_one_missing_gradient():
    """Where only the rotated queries get a gradient, the keys' is zero (and the other way
    round)."""
    from mmseg_segman.ops import triton_rotary_embedding as trope

    q, k, sin, cos = make_inputs(1, 2, 3, 5, 8, torch.float32)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    for used in (0, 1):
        outs = trope.rotary_embedding_triton(q, k, sin, cos, 0.5)
        grads = torch.autograd.grad(outs[used].sum(), (q, k))
        assert torch.count_nonzero(grads[used]) > 0 and torch.count_nonzero(grads[1 - used]) == 0


def check_custom_op():
    """The kernel as custom ops (opcheck: schema, fake shapes, autograd, on a strided ``x``);
    eager calls skip them and match them bitwise; torch.compile traces them
    (:func:`triton_interpreter.check_eager_calls_skip_custom_ops`)."""
    from triton_interpreter import check_eager_calls_skip_custom_ops

    from mmseg_segman.ops.triton_rotary_embedding import ROTARY_EMBEDDING, rotary_embedding_triton

    q, k, sin, cos = make_inputs(2, 2, 5, 7, 12, torch.float32)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2).detach().requires_grad_()
               for t in (q, k)]
    torch.library.opcheck(ROTARY_EMBEDDING.forward_op, (*strided, sin, cos, 0.5, False, False))
    for planar_out in (False, True):
        torch.library.opcheck(ROTARY_EMBEDDING.backward_op,
                              (q, k, sin, cos, 0.5, True, planar_out))
    # contiguous q and k (not a map's views): their gradients contiguous
    leaves = [t.contiguous().requires_grad_() for t in (q, k)]
    grads = torch.autograd.grad(rotary_embedding_triton(*leaves, sin, cos), leaves,
                                (torch.ones(q.shape), torch.ones(q.shape)))
    assert all(grad.is_contiguous() for grad in grads)
    dy = torch.randn(2, *q.shape, generator=torch.Generator().manual_seed(2))
    check_eager_calls_skip_custom_ops(
        lambda qk: torch.stack(rotary_embedding_triton(*qk, sin, cos, 0.5)),
        lambda qk: torch.stack(ROTARY_EMBEDDING.forward_op(*qk, sin, cos, 0.5, False, False)),
        [torch.stack([q, k])], dy, ('rotary_embedding_forward', 'rotary_embedding_backward'))
    print('custom op: ok')


def main():
    # head dims 8 to 36 (SegMAN's: 8 to 36, 32 padded to powers of two), maps over one block of
    # pixels, one pixel; queries' scale
    for shape in [(2, 3, 4, 5, 8), (1, 2, 9, 17, 36), (1, 1, 1, 1, 4), (2, 1, 3, 30, 24)]:
        check(*shape, torch.float32, 1.0, 1e-6)
    check(2, 3, 4, 5, 8, torch.float32, 0.125, 1e-6)
    check(1, 2, 8, 10, 12, torch.float32, 1.0, 1e-6)  # pixel count a multiple of 8: ALIGN 8
    check(1, 2, 9, 17, 36, torch.bfloat16, 0.2, 1e-2)
    for shape in [(2, 3, 4, 5, 8), (1, 2, 8, 10, 12)]:  # the outputs as planes
        check(*shape, torch.float32, 0.5, 1e-6, planar=True)
    check(1, 2, 9, 17, 36, torch.bfloat16, 0.2, 1e-2, planar=True)
    check_direct_launch_equals_function()
    check_one_missing_gradient()
    check_custom_op()
    print('all checks passed')


if __name__ == '__main__':
    main()
