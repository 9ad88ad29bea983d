"""``depthwise_conv2d``: its checks, and the Triton backend against ``F.conv2d`` (float64)
in Triton's CPU interpreter (a subprocess running this file, see triton_interpreter.py)."""
import pytest
import torch
import torch.nn.functional as F

from mmseg_segman.ops.depthwise_conv import _depthwise_conv2d, depthwise_conv2d


def test_triton_depthwise_conv_in_interpreter():
    pytest.importorskip('triton')
    from .triton_interpreter import assert_checks_pass_in_interpreter
    assert_checks_pass_in_interpreter(__file__, timeout=300)


def test_not_chosen_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    x, w, b = make_inputs(1, 3, 4, 5, 3, torch.float32)
    assert 'TRITON_INTERPRET' in _depthwise_conv2d.why_not('triton', x, w, b, False)
    torch.testing.assert_close(depthwise_conv2d(x, w, b), F.conv2d(x, w, b, padding=1, groups=3))
    torch.testing.assert_close(depthwise_conv2d(x, w, b, residual=True),
                               x + F.conv2d(x, w, b, padding=1, groups=3))


def test_bad_shapes_are_refused():
    x, w, b = make_inputs(1, 3, 4, 5, 3, torch.float32)
    with pytest.raises(ValueError, match='weight'):
        depthwise_conv2d(x, w[:2], b)
    with pytest.raises(ValueError, match='k odd'):
        depthwise_conv2d(x, torch.randn(3, 1, 2, 2))
    with pytest.raises(ValueError, match=r'bias must be \(3,\)'):
        depthwise_conv2d(x, w, b[:2])


def test_bad_norm_and_activation_are_refused():
    from mmseg_segman.ops.depthwise_conv import RunningBatchNorm
    x, w, b = make_inputs(1, 3, 4, 5, 3, torch.float32)
    with pytest.raises(ValueError, match='activation must be one of'):
        depthwise_conv2d(x, w, b, activation='gelu')
    norm = RunningBatchNorm(b[:2], b[:2].abs(), b[:2], b[:2], 1e-5)
    with pytest.raises(ValueError, match=r"statistics and parameters must be \(3,\)"):
        depthwise_conv2d(x, w, b, norm=norm)


def make_inputs(batch, channels, height, width, kernel, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, height, width, generator=g).to(dtype),
            torch.randn(channels, 1, kernel, kernel, generator=g), torch.randn(channels, generator=g))


def outputs_and_grads(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return [out] + [t.grad for t in leaves]


def reference(x, weight, bias, residual=False):
    out = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    return x + out if residual else out


def check(batch, channels, height, width, kernel, dtype, tol, bias=True, residual=False):
    from mmseg_segman.ops.triton_depthwise_conv import depthwise_conv2d_triton

    x, w, b = make_inputs(batch, channels, height, width, kernel, dtype, seed=height * width)
    inputs = [x, w, b] if bias else [x, w]
    dy = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(1))
    got = outputs_and_grads(
        lambda *t: depthwise_conv2d_triton(*t, *([] if bias else [None]), residual=residual),
        inputs, dy)
    want = outputs_and_grads(lambda *t: reference(*t, *([] if bias else [None]), residual=residual),
                             [t.double() for t in inputs], dy.double())
    assert got[0].dtype == dtype
    for name, a, e, t in zip(['y', 'dx', 'dweight', 'dbias'], got, want, [got[0], *inputs]):
        assert a.shape == e.shape and a.dtype == t.dtype, (name, a.shape, a.dtype)
        err = ((a.double() - e).abs().max() / (e.abs().max() + 1e-12)).item()
        assert err <= tol, (batch, channels, height, width, kernel, dtype, name, err)
    print(f'{str(dtype)[6:]} B{batch} C{channels} {height}x{width} k{kernel} bias={bias} '
          f'residual={residual}: ok')


def check_dispatch_and_autocast():
    x, w, b = make_inputs(2, 3, 5, 7, 5, torch.float32)
    assert _depthwise_conv2d.select(x, w, b, False) == 'triton'
    assert _depthwise_conv2d.select(x.double(), w, b, False) == 'torch'
    wide = torch.cat([x, x], 1)[:, 3:]  # a channel slice: planes contiguous, batch stride 6*H*W
    torch.testing.assert_close(depthwise_conv2d(wide, w, b), reference(x, w, b), rtol=1e-5, atol=1e-5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = depthwise_conv2d(x, w, b)
        want = reference(x, w, b)
        # x + conv(x): float32 x plus a bf16 conv is float32, as PyTorch promotes
        out_residual = depthwise_conv2d(x, w, b, residual=True)
        want_residual = x + reference(x, w, b)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=5e-2)
    assert out_residual.dtype == want_residual.dtype == torch.float32
    torch.testing.assert_close(out_residual, want_residual, rtol=2e-2, atol=5e-2)
    print('dispatch and autocast: ok')


def check_inference_path():
    """Without autograd recording the kernel runs directly: same output, no graph node."""
    from mmseg_segman.ops.triton_depthwise_conv import depthwise_conv2d_triton

    x, w, b = (t.requires_grad_() for t in make_inputs(2, 3, 4, 6, 3, torch.float32))
    recorded = depthwise_conv2d_triton(x, w, b, residual=True)
    with torch.no_grad():
        direct = depthwise_conv2d_triton(x, w, b, residual=True)
    assert recorded.grad_fn is not None and direct.grad_fn is None
    torch.testing.assert_close(direct, recorded, rtol=0, atol=0)
    print('inference path: ok')


def check_parameter_gradients_contiguous():
    """The weight and bias gradients come contiguous: autograd would copy strided ones
    before accumulating them (a kernel and an allocation each)."""
    from mmseg_segman.ops.triton_depthwise_conv import depthwise_conv2d_triton

    x, w, b = (t.requires_grad_() for t in make_inputs(2, 3, 6, 5, 3, torch.float32))
    out = depthwise_conv2d_triton(x, w, b)
    dw, db = torch.autograd.grad(out, (w, b), torch.ones_like(out))
    assert dw.is_contiguous() and db.is_contiguous(), (dw.stride(), db.stride())
    print('contiguous parameter gradients: ok')


def check_weight_gradient_rows():
    """The weight gradient's programs add their partial sums into one row by atomics (eight
    programs a channel here); under ``torch.use_deterministic_algorithms`` each stores its
    own row, which PyTorch adds up: the same gradients to float32 rounding, bit for bit from
    run to run."""
    from mmseg_segman.ops import triton_depthwise_conv as tdw

    x, w, b = make_inputs(2, 3, 33, 70, 3, torch.float32, seed=7)
    dy = torch.randn(2, 3, 33, 70, generator=torch.Generator().manual_seed(3))

    def grads():
        return outputs_and_grads(tdw.depthwise_conv2d_triton, [x, w, b], dy)[2:]

    programs = tdw.WEIGHT_GRADIENT_PROGRAMS
    tdw.WEIGHT_GRADIENT_PROGRAMS = 20  # several row bands a channel
    try:
        shared = grads()
        torch.use_deterministic_algorithms(True)
        own, again = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(False)
        tdw.WEIGHT_GRADIENT_PROGRAMS = programs
    assert all(torch.equal(a, b) for a, b in zip(own, again))
    for a, b in zip(shared, own):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    print('weight gradient rows, shared and stored: ok')


def check_norm_and_activation():
    """An eval-mode batch norm and SiLU after the convolution: in the kernel's pass without
    autograd, as PyTorch's ops with it; both against float64."""
    from mmseg_segman.ops.depthwise_conv import RunningBatchNorm, _depthwise_conv2d

    g = torch.Generator().manual_seed(7)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x, w, b = make_inputs(2, 3, 9, 37, 3, dtype)
        stats = [torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5,
                 torch.randn(3, generator=g), torch.randn(3, generator=g)]
        norm = RunningBatchNorm(*stats, 1e-3)
        want = F.silu(F.batch_norm(reference(x.double(), w.double(), b.double()),
                                   *(t.double() for t in stats), False, 0.0, 1e-3))
        with torch.no_grad():
            got = depthwise_conv2d(x, w, b, norm=norm, activation='silu')
        assert _depthwise_conv2d.select(x, w, b, False, norm, 'silu') == 'triton'
        assert got.dtype == dtype
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err <= tol, (dtype, err)
        leaves = [t.clone().requires_grad_() for t in (x, w)]
        recorded = depthwise_conv2d(*leaves, b, norm=norm, activation='silu')
        assert recorded.grad_fn is not None
        torch.testing.assert_close(recorded, got, rtol=tol, atol=tol)
        recorded.sum().backward()
        assert leaves[1].grad is not None
    print('norm and activation: ok')


def check_custom_op():
    """The kernels as custom ops (opcheck: schema, fake shapes, autograd; with a bias and
    the residual, without both; the backward op for each gradient asked for or not; a norm
    in the forward pass); eager calls skip them and match them bitwise; torch.compile traces
    them (:func:`triton_interpreter.check_eager_calls_skip_custom_ops`)."""
    from triton_interpreter import check_eager_calls_skip_custom_ops

    from mmseg_segman.ops.triton_depthwise_conv import DEPTHWISE_CONV2D, depthwise_conv2d_triton

    x, w, b = make_inputs(2, 3, 6, 9, 3, torch.float32)
    for bias, residual in ((b, True), (None, False)):
        leaves = [t if t is None else t.detach().requires_grad_() for t in (x, w, bias)]
        torch.library.opcheck(DEPTHWISE_CONV2D.forward_op,
                              (*leaves, residual, torch.float32, None, None, None, None, 0.0, False))
    norm = (b, b.abs() + 1, b, b, 1e-5)
    torch.library.opcheck(DEPTHWISE_CONV2D.forward_op, (x, w, b, False, torch.float32, *norm, True))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    for input_grad, parameter_grads in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(DEPTHWISE_CONV2D.backward_op,
                              (dy, x, w, True, input_grad, parameter_grads))
    check_eager_calls_skip_custom_ops(
        lambda *t: depthwise_conv2d_triton(*t, residual=True),
        lambda *t: DEPTHWISE_CONV2D.forward_op(*t, True, torch.float32, None, None, None, None,
                                               0.0, False),
        [x, w, b], dy, ('depthwise_conv2d_forward', 'depthwise_conv2d_backward'))
    print('custom op: ok')


def main():
    from mmseg_segman.ops import triton_depthwise_conv as tdw

    # maps over and under one tile, smaller than the kernel, k 3 and 5
    for shape in [(1, 2, 5, 7, 3), (2, 3, 17, 70, 3), (1, 2, 18, 9, 5), (2, 1, 2, 3, 5), (1, 1, 1, 1, 3)]:
        check(*shape, torch.float32, 1e-5)
    # the weight gradient's programs: few of them (long row bands, several loop iterations),
    # batches that leave tile lanes empty, a kernel size without its own tile (k = 7)
    programs = tdw.WEIGHT_GRADIENT_PROGRAMS
    tdw.WEIGHT_GRADIENT_PROGRAMS = 5
    for shape in [(3, 3, 33, 70, 3), (2, 2, 20, 19, 5), (5, 2, 23, 30, 3)]:
        check(*shape, torch.float32, 1e-5)
    tdw.WEIGHT_GRADIENT_PROGRAMS = programs
    check_weight_gradient_rows()
    check(3, 2, 11, 9, 7, torch.float32, 1e-5)
    check(1, 2, 6, 5, 3, torch.float32, 1e-5, bias=False)
    check(2, 3, 9, 11, 5, torch.bfloat16, 2e-2)
    check(2, 3, 9, 70, 3, torch.float32, 1e-5, residual=True)
    check(1, 2, 5, 4, 5, torch.bfloat16, 2e-2, residual=True)
    check_dispatch_and_autocast()
    check_inference_path()
    check_parameter_gradients_contiguous()
    check_norm_and_activation()
    check_custom_op()
    print('all checks passed')


if __name__ == '__main__':
    main()
