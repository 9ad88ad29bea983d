"""``batch_norm_2d``: its checks, the reference against ``nn.BatchNorm2d`` in training mode, and
the Triton backend against float64 in Triton's CPU interpreter (a subprocess running this file,
see triton_interpreter.py)."""
import pytest
import torch
from torch import nn

from mmseg_segman.ops import batch_norm_2d
from mmseg_segman.ops.batch_norm import _batch_norm_2d, trains_with_batch_statistics


def test_triton_batch_norm_in_interpreter():
    pytest.importorskip('triton')
    from .triton_interpreter import assert_checks_pass_in_interpreter
    assert_checks_pass_in_interpreter(__file__, timeout=300)


@pytest.mark.parametrize('activation,module', [
    ('silu', nn.SiLU()), ('gelu', nn.GELU()), ('relu', nn.ReLU(inplace=True)), (None, nn.Identity())])
def test_reference_is_the_module_in_training_mode(activation, module):
    """Output, gradients and running statistics as ``act(nn.BatchNorm2d(x))`` in training mode."""
    x = make_inputs(3, 5, 4, 6, torch.float32)[0]
    norm = nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    twin = nn.BatchNorm2d(5, momentum=0.3)
    twin.load_state_dict(norm.state_dict())
    leaf_a, leaf_b = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = module(norm(leaf_a))
    got = batch_norm_2d(leaf_b, twin.weight, twin.bias, twin.running_mean, twin.running_var, 0.3,
                        twin.eps, activation=activation)
    dy = torch.randn_like(want)
    want.backward(dy), got.backward(dy)
    torch.testing.assert_close(got, want)
    for a, b in ((leaf_b.grad, leaf_a.grad), (twin.weight.grad, norm.weight.grad),
                 (twin.bias.grad, norm.bias.grad), (twin.running_mean, norm.running_mean),
                 (twin.running_var, norm.running_var)):
        torch.testing.assert_close(a, b)


def test_which_modules_it_runs():
    norm = nn.BatchNorm2d(4)
    assert trains_with_batch_statistics(norm)
    assert not trains_with_batch_statistics(norm.eval())
    assert not trains_with_batch_statistics(nn.SyncBatchNorm(4))
    assert not trains_with_batch_statistics(nn.BatchNorm2d(4, momentum=None))
    assert not trains_with_batch_statistics(nn.BatchNorm2d(4, affine=False))
    assert not trains_with_batch_statistics(nn.BatchNorm2d(4, track_running_stats=False))

    class Overridden(nn.BatchNorm2d):
        def forward(self, x):
            return x

    assert not trains_with_batch_statistics(Overridden(4))
    assert not trains_with_batch_statistics(nn.LayerNorm(4))


def test_not_chosen_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    args = (*make_inputs(1, 4, 3, 3, torch.float32), 0.1, 1e-5, None)
    assert 'TRITON_INTERPRET' in _batch_norm_2d.why_not('triton', *args)
    assert _batch_norm_2d.select(*args) == 'torch'


def test_bad_inputs_are_refused():
    x, weight, bias, mean, var = make_inputs(2, 4, 3, 3, torch.float32)
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        batch_norm_2d(x[0], weight, bias, mean, var)
    with pytest.raises(ValueError, match=r'running_var must be \(4,\)'):
        batch_norm_2d(x, weight, bias, mean, var[:3])
    with pytest.raises(ValueError, match='more than one value a channel'):
        batch_norm_2d(x[:1, :, :1, :1], weight, bias, mean, var)
    with pytest.raises(ValueError, match="activation must be one of .*'relu'.*got 'tanh'"):
        batch_norm_2d(x, weight, bias, mean, var, activation='tanh')
    with pytest.raises(ValueError, match='activation must be one of'):
        batch_norm_2d(x, weight, bias, mean, var, activation=['relu'])


def make_inputs(batch, channels, height, width, dtype, seed=0, offset=0.0):
    """x, weight, bias, running mean and variance."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, channels, height, width, generator=g) * 2 + offset).to(dtype)
    return (x, torch.randn(channels, generator=g), torch.randn(channels, generator=g),
            torch.randn(channels, generator=g), torch.rand(channels, generator=g) + 0.5)


def reference(x, weight, bias, mean, var, activation):
    return _batch_norm_2d.backends['torch'].fn(x, weight, bias, mean, var, 0.1, 1e-5, activation)


def run(fn, x, weight, bias, mean, var, dy, activation):
    """``fn``'s output, the gradients of x, weight and bias, and the running statistics after."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    mean, var = mean.clone(), var.clone()
    out = fn(*leaves, mean, var, activation)
    out.backward(dy.to(out.dtype))
    return [out] + [t.grad for t in leaves] + [mean, var]


def check(batch, channels, height, width, dtype, tol, activation='silu', offset=0.0):
    """Output, gradients and running statistics against the float64 reference; the bar is tol
    or twice the float32 reference's error."""
    from mmseg_segman.ops.triton_batch_norm import batch_norm_2d_triton

    inputs = make_inputs(batch, channels, height, width, dtype, seed=channels * width, offset=offset)
    dy = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(1))

    def triton(x, weight, bias, mean, var, act):
        return batch_norm_2d_triton(x, weight, bias, mean, var, 0.1, 1e-5, act)

    got = run(triton, *inputs, dy, activation)
    want = run(reference, *[t.double() for t in inputs], dy.double(), activation)
    ref32 = run(reference, *[t.float() for t in inputs], dy, activation)
    assert got[0].dtype == dtype and got[0].is_contiguous()
    for name, a, b, c in zip(['y', 'dx', 'dweight', 'dbias', 'running_mean', 'running_var'],
                             got, want, ref32):
        err, err32 = (((v.double() - b).abs().max() / (b.abs().max() + 1e-12)).item() for v in (a, c))
        assert err <= max(tol, 2 * err32), (batch, channels, height, width, dtype, name, err, err32)
    print(f'{str(dtype)[6:]} B{batch} C{channels} {height}x{width} {activation} offset {offset}: ok')


def check_dispatch_and_strides():
    """The dispatcher picks triton for plane-contiguous maps (a channel slice of a wider map
    too), the reference for channels-last ones and float64."""
    x, weight, bias, mean, var = make_inputs(2, 6, 3, 5, torch.float32)
    args = (weight, bias, mean, var, 0.1, 1e-5, 'silu')
    assert _batch_norm_2d.select(x, *args) == 'triton'
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert 'not contiguous' in _batch_norm_2d.why_not('triton', channels_last, *args)
    assert _batch_norm_2d.select(x.double(), *args) == 'torch'
    wide = torch.cat([torch.zeros_like(x[:, :2]), x], 1)[:, 2:]
    got = batch_norm_2d(wide, weight, bias, mean.clone(), var.clone(), activation='silu')
    torch.testing.assert_close(got, reference(x, weight, bias, mean.clone(), var.clone(), 'silu'))
    print('dispatch and strides: ok')


def check_custom_op():
    """The kernels as custom ops (opcheck: schema, fake shapes, autograd); eager calls skip
    them and match them bitwise; torch.compile traces them."""
    from triton_interpreter import check_eager_calls_skip_custom_ops

    from mmseg_segman.ops.triton_batch_norm import BATCH_NORM_2D, batch_norm_2d_triton

    x, weight, bias, mean, var = make_inputs(2, 7, 5, 3, torch.float32)
    for activation in (None, 'silu', 'gelu', 'relu'):
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        torch.library.opcheck(BATCH_NORM_2D.forward_op, (*leaves, 1e-5, activation))
    y, stats = BATCH_NORM_2D.forward_op(x, weight, bias, 1e-5, 'gelu')
    torch.library.opcheck(BATCH_NORM_2D.backward_op, (torch.randn_like(y), x, weight, bias, stats, 'gelu'))

    def custom_op(*inputs):
        return BATCH_NORM_2D.forward_op(*inputs, 1e-5, 'silu')[0]

    def op(x, weight, bias):
        return batch_norm_2d_triton(x, weight, bias, mean.clone(), var.clone(), 0.1, 1e-5, 'silu')

    check_eager_calls_skip_custom_ops(
        op, custom_op, [x, weight, bias], torch.randn(x.shape, generator=torch.Generator().manual_seed(6)),
        ('batch_norm_2d_forward', 'batch_norm_2d_backward'))
    print('custom op: ok')


def main():
    # one chunk and several a plane (4096 pixels), blocks cut short, one pixel a plane, more
    # partial sums a channel than one step adds up (64)
    for shape in [(2, 5, 4, 6), (3, 3, 1, 1), (1, 4, 70, 61), (2, 2, 3, 7), (67, 2, 1, 3)]:
        check(*shape, torch.float32, 1e-5)
        check(*shape, torch.float32, 1e-5, activation=None)
    for activation in ('gelu', 'relu'):
        check(2, 5, 4, 6, torch.float32, 1e-5, activation)
        check(1, 4, 70, 61, torch.float32, 1e-5, activation)
        check(2, 6, 9, 8, torch.bfloat16, 2e-2, activation)
    check(2, 3, 5, 9, torch.float32, 1e-5, offset=1e3)  # a large mean: no cancellation
    check(2, 6, 9, 8, torch.bfloat16, 2e-2)
    check(2, 6, 9, 8, torch.float16, 2e-3)
    check_dispatch_and_strides()
    check_custom_op()
    print('all checks passed')


if __name__ == '__main__':
    main()
