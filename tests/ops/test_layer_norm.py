"""``layer_norm_2d``: its checks, and the Triton backend against ``nn.LayerNorm`` (float64)
in Triton's CPU interpreter (a subprocess running this file, see triton_interpreter.py)."""
import pytest
import torch

from mmseg_segman.ops import layer_norm_2d
from mmseg_segman.ops.layer_norm import _layer_norm_2d


def test_triton_layer_norm_in_interpreter():
    pytest.importorskip('triton')
    from .triton_interpreter import assert_checks_pass_in_interpreter
    assert_checks_pass_in_interpreter(__file__, timeout=300)


def test_reference_matches_nn_layer_norm():
    x, weight, bias = make_inputs(2, 5, 3, 4, torch.float32)
    want = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (5,), weight, bias, 1e-6)
    torch.testing.assert_close(layer_norm_2d(x, weight, bias), want.permute(0, 3, 1, 2))


def test_not_chosen_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    inputs = make_inputs(1, 4, 3, 3, torch.float32)
    assert 'TRITON_INTERPRET' in _layer_norm_2d.why_not('triton', *inputs, 1e-6, ())
    assert _layer_norm_2d.select(*inputs, 1e-6, ()) == 'torch'


def test_bad_shapes_are_refused():
    x, weight, bias = make_inputs(1, 4, 3, 3, torch.float32)
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        layer_norm_2d(x[0], weight, bias)
    with pytest.raises(ValueError, match=r'weight and bias must be \(4,\)'):
        layer_norm_2d(x, weight[:3], bias)
    with pytest.raises(ValueError, match=r'addends must be \(1, 4, 3, 3\)'):
        layer_norm_2d(x, weight, bias, addends=[x[:, :2]])


def test_reference_adds_the_addends():
    x, weight, bias = make_inputs(2, 5, 3, 4, torch.float32)
    a, b = torch.randn_like(x), torch.randn_like(x)
    torch.testing.assert_close(layer_norm_2d(x, weight, bias, addends=(a, b)),
                               layer_norm_2d(x, weight, bias) + a + b)


def make_inputs(batch, channels, height, width, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, channels, height, width, generator=g) * 3 + offset).to(dtype)
    return x, torch.randn(channels, generator=g), torch.randn(channels, generator=g)


def outputs_and_grads(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return [out] + [t.grad for t in leaves]


def reference64(x, weight, bias):
    return torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (x.size(1),), weight, bias,
                                          1e-6).permute(0, 3, 1, 2)


def check(batch, channels, height, width, dtype, tol, offset=0.0, view=None):
    """Output and the gradients of x, weight and bias against float64 ``nn.LayerNorm``;
    ``view`` makes the input a strided view of the same values."""
    from mmseg_segman.ops.triton_layer_norm import layer_norm_2d_triton

    inputs = make_inputs(batch, channels, height, width, dtype, seed=channels * height, offset=offset)
    dy = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(1))

    def triton(x, weight, bias):
        return layer_norm_2d_triton(view(x) if view else x, weight, bias, 1e-6, dtype)

    got = outputs_and_grads(triton, inputs, dy)
    want = outputs_and_grads(reference64, [t.double() for t in inputs], dy.double())
    # the bar: tol, or twice the error of PyTorch's own LayerNorm in float32 on these inputs
    torch32 = outputs_and_grads(reference64, [t.float() for t in inputs], dy)
    assert got[0].dtype == dtype and got[0].is_contiguous()
    for name, a, b, c, t in zip(['y', 'dx', 'dweight', 'dbias'], got, want, torch32,
                                [got[0], *inputs]):
        assert a.shape == b.shape and a.dtype == t.dtype, (name, a.shape, a.dtype)
        err, err32 = (((v.double() - b).abs().max() / (b.abs().max() + 1e-12)).item() for v in (a, c))
        assert err <= max(tol, 2 * err32), (batch, channels, height, width, dtype, name, err, err32)
    print(f'{str(dtype)[6:]} B{batch} C{channels} {height}x{width} offset {offset}: ok')


def check_partial_sums_stored_deterministically():
    """The programs add their partial parameter gradients into one row by atomics; under
    ``torch.use_deterministic_algorithms`` each stores a row of its own, which PyTorch adds
    up: the same gradients to float32 rounding, and bit for bit from run to run."""
    from unittest import mock

    from mmseg_segman.ops import triton_layer_norm as tln

    inputs = make_inputs(2, 37, 5, 13, torch.float32, seed=5)
    dy = torch.randn(2, 37, 5, 13, generator=torch.Generator().manual_seed(2))

    def grads():
        return outputs_and_grads(lambda *t: tln.layer_norm_2d_triton(*t, 1e-6, torch.float32),
                                 inputs, dy)[1:]

    with mock.patch.object(tln, 'partial_sum_rows', side_effect=tln.partial_sum_rows) as rows:
        shared = grads()
    assert rows.call_args.args == (4, tln.PARTIAL_ROWS)  # 2 x 2 programs of 64 pixels
    assert tln.partial_sum_rows(4, tln.PARTIAL_ROWS) == (1, True)
    torch.use_deterministic_algorithms(True)
    try:
        own, again = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(own, again))
    for a, b in zip(shared, own):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    print('partial sums, shared and stored: ok')


def sliced(x):
    """The same values as channels 2.. of a wider map: batch stride larger than C*H*W."""
    wide = torch.cat([torch.zeros_like(x[:, :2]), x], 1)
    return wide[:, 2:]


def check_dispatch():
    """Under the interpreter the dispatcher picks triton for plane-contiguous maps, the
    reference for channels-last ones (with the reason) and float64; under autocast the
    output is in the autocast dtype."""
    inputs = make_inputs(2, 6, 3, 5, torch.float32)
    assert _layer_norm_2d.select(*inputs, 1e-6, ()) == 'triton'
    channels_last = inputs[0].contiguous(memory_format=torch.channels_last)
    assert 'not contiguous' in _layer_norm_2d.why_not('triton', channels_last, *inputs[1:], 1e-6, ())
    assert _layer_norm_2d.select(inputs[0].double(), *inputs[1:], 1e-6, ()) == 'torch'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer_norm_2d(*inputs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference64(*inputs), rtol=1e-2, atol=1e-2)
    print('dispatch: ok')


def check_inference_path():
    """Without autograd recording the kernel runs directly: same output, no graph node."""
    from mmseg_segman.ops.triton_layer_norm import layer_norm_2d_triton

    x, weight, bias = (t.requires_grad_() for t in make_inputs(2, 3, 2, 5, torch.float32))
    recorded = layer_norm_2d_triton(x, weight, bias, 1e-6, torch.float32)
    with torch.no_grad():
        direct = layer_norm_2d_triton(x, weight, bias, 1e-6, torch.float32)
    assert recorded.grad_fn is not None and direct.grad_fn is None
    torch.testing.assert_close(direct, recorded, rtol=0, atol=0)
    print('inference path: ok')


def check_addends():
    """``norm(x) + a1 + a2`` in the kernel's pass: output and every gradient against float64,
    one addend a channel slice (strided batch), the other contiguous; a third refused."""
    from mmseg_segman.ops.triton_layer_norm import layer_norm_2d_triton

    g = torch.Generator().manual_seed(3)
    # channels in chunks (37, 520) and in registers (300)
    for channels, dtype, tol in ((37, torch.float32, 1e-5), (37, torch.bfloat16, 2e-2),
                                 (300, torch.float32, 1e-5), (300, torch.bfloat16, 2e-2),
                                 (520, torch.float32, 1e-5)):
        x, weight, bias = make_inputs(2, channels, 5, 13, dtype)
        a1 = sliced(torch.randn(x.shape, generator=g).to(dtype))
        a2 = torch.randn(x.shape, generator=g).to(dtype)
        dy = torch.randn(x.shape, generator=g)
        for addends in ((a1,), (a1, a2)):
            got = outputs_and_grads(lambda *t: layer_norm_2d_triton(*t[:3], 1e-6, dtype, t[3:]),
                                    [x, weight, bias, *addends], dy)
            want = outputs_and_grads(lambda *t: reference64(*t[:3]) + sum(t[3:]),
                                     [t.double() for t in (x, weight, bias, *addends)], dy.double())
            for name, a, b in zip(['y', 'dx', 'dweight', 'dbias', 'da1', 'da2'], got, want):
                err = ((a.double() - b).abs().max() / (b.abs().max() + 1e-12)).item()
                assert err <= tol, (dtype, len(addends), name, err)
            with torch.no_grad():
                direct = layer_norm_2d_triton(x, weight, bias, 1e-6, dtype, addends)
            torch.testing.assert_close(direct, got[0], rtol=0, atol=0)
    assert 'at most two' in _layer_norm_2d.why_not('triton', x, weight, bias, 1e-6, (a2,) * 3)
    print('addends: ok')


def check_custom_op():
    """The kernels as custom ops (opcheck: schema, fake shapes, autograd; with and without
    statistics, with one addend and none); eager calls skip them and match them bitwise;
    torch.compile traces them (:func:`triton_interpreter.check_eager_calls_skip_custom_ops`)."""
    from triton_interpreter import check_eager_calls_skip_custom_ops

    from mmseg_segman.ops.triton_jit import records_autograd
    from mmseg_segman.ops.triton_layer_norm import LAYER_NORM_2D, layer_norm_2d_triton

    x, weight, bias = make_inputs(2, 37, 5, 13, torch.float32)
    addend = sliced(torch.randn(x.shape, generator=torch.Generator().manual_seed(5)))
    for addends, stats in (((addend, None), True), ((None, None), False)):
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        torch.library.opcheck(LAYER_NORM_2D.forward_op,
                              (*leaves, *addends, 1e-6, torch.float32, stats))
    y, stats = LAYER_NORM_2D.forward_op(x, weight, bias, None, None, 1e-6, torch.float32, True)
    torch.library.opcheck(LAYER_NORM_2D.backward_op, (torch.randn_like(y), x, weight, stats))

    def custom_op(*inputs):
        return LAYER_NORM_2D.forward_op(*inputs, None, 1e-6, torch.float32,
                                        records_autograd(*inputs))[0]

    check_eager_calls_skip_custom_ops(
        lambda *t: layer_norm_2d_triton(*t[:3], 1e-6, torch.float32, t[3:]), custom_op,
        [x, weight, bias, addend], torch.randn(x.shape, generator=torch.Generator().manual_seed(6)),
        ('layer_norm_2d_forward', 'layer_norm_2d_backward'))
    print('custom op: ok')


def main():
    # chunks of 32 channels over 64-pixel blocks (up to 256 channels and over 512; channels and
    # pixels over and under one block), and all channels in registers over 16-pixel blocks
    # (257 to 512)
    for shape in [(1, 3, 2, 5), (2, 37, 5, 13), (1, 70, 9, 8), (3, 3, 1, 1), (1, 520, 9, 8),
                  (2, 600, 1, 3), (1, 257, 7, 5), (2, 300, 3, 7), (1, 512, 1, 17)]:
        check(*shape, torch.float32, 1e-5)
    for channels in (40, 300, 530):  # a large mean: no cancellation
        check(2, channels, 4, 6, torch.float32, 1e-5, offset=1e3)
    for channels in (33, 300):
        check(2, channels, 3, 7, torch.float32, 1e-5, view=sliced)
    for channels in (37, 300):
        check(2, channels, 5, 13, torch.bfloat16, 2e-2)
    check(1, 8, 4, 4, torch.float16, 2e-3)
    check_partial_sums_stored_deterministically()
    check_dispatch()
    check_inference_path()
    check_addends()
    check_custom_op()
    print('all checks passed')


if __name__ == '__main__':
    main()
