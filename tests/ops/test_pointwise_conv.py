"""``pointwise_conv2d``: its checks, the reference's GELU and residual connection, the
``matmul`` backend against ``F.conv2d``, and the Triton backend against float64 in Triton's
CPU interpreter (a subprocess running this file, see triton_interpreter.py)."""
import pytest
import torch
import torch.nn.functional as F

from mmseg_segman.ops import pointwise_conv2d
from mmseg_segman.ops.depthwise_conv import RunningBatchNorm
from mmseg_segman.ops.pointwise_conv import Residual, _pointwise_conv2d

matmul = _pointwise_conv2d.backends['matmul'].fn


def make_inputs(batch=2, channels=5, out_channels=7, height=3, width=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, height, width, generator=g, dtype=dtype),
            torch.randn(out_channels, channels, 1, 1, generator=g, dtype=dtype),
            torch.randn(out_channels, generator=g, dtype=dtype))


def make_residual(batch, out_channels, height, width, scale=True, sample=True, seed=1,
                  dtype=torch.float64):
    """Tensors of a Residual: shortcut, scale, shift, sample_scale (a dropped sample, a kept one)."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, out_channels, height, width, generator=g, dtype=dtype)]
    if scale:
        tensors += [torch.randn(out_channels, generator=g, dtype=dtype),
                    torch.randn(out_channels, generator=g, dtype=dtype)]
    sample_scale = torch.tensor([0.0, 1.25] * batch, dtype=dtype)[:batch] if sample else None
    return tensors, sample_scale


def make_norm(channels, dtype=torch.float64, seed=5):
    """A batch norm by its running statistics, as a decode head's trained ``ConvModule``."""
    g = torch.Generator().manual_seed(seed)
    mean, weight, bias = (torch.randn(channels, generator=g, dtype=dtype) for _ in range(3))
    return RunningBatchNorm(mean, torch.rand(channels, generator=g, dtype=dtype) + 0.5, weight,
                            bias, 1e-5)


def outputs_and_grads(fn, inputs, seed=2):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(dy)
    return [out] + [t.grad for t in leaves]


def as_residual(tensors, sample_scale):
    shortcut, *scale_shift = tensors
    return Residual(shortcut, *(scale_shift or [None, None]), sample_scale)


@pytest.mark.parametrize('layout', ['contiguous', 'channels_last'])
@pytest.mark.parametrize('bias', [True, False])
def test_matmul_backend_matches_conv2d(layout, bias):
    x, w, b = make_inputs()
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = [x, w, b] if bias else [x, w]
    got = outputs_and_grads(lambda *t: matmul(*t, *([] if bias else [None]), None, None, None),
                            inputs)
    want = outputs_and_grads(lambda *t: F.conv2d(*t, *([] if bias else [None])), inputs)
    assert got[0].shape == (2, 7, 3, 4) and got[0].is_contiguous()
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_matmul_backend_under_autocast_computes_as_conv2d():
    x, w, b = (t.float() for t in make_inputs())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got, want = matmul(x, w, b, None, None, None), F.conv2d(x, w, b)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=5e-2)


def test_reference_gelu_and_residual_are_the_release_layers():
    """The reference applies F.gelu, then the layer scale as the release's grouped 1x1
    convolution, the per-sample factor and the shortcut; every backend on this machine
    (matmul's epilogue is the same code) agrees."""
    x, w, b = make_inputs()
    (shortcut, scale, shift), sample_scale = make_residual(2, 7, 3, 4)
    residual = Residual(shortcut, scale, shift, sample_scale)
    out = F.conv2d(x, w, b)
    layer_scaled = F.conv2d(out, scale.view(-1, 1, 1, 1), shift, groups=7)
    want = shortcut + layer_scaled * sample_scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(pointwise_conv2d(x, w, b, residual=residual), want)
    torch.testing.assert_close(matmul(x, w, b, None, residual, None), want)
    torch.testing.assert_close(pointwise_conv2d(x, w, b, 'gelu'), F.gelu(out))
    torch.testing.assert_close(pointwise_conv2d(x, w, b, residual=Residual(shortcut)), shortcut + out)
    torch.testing.assert_close(pointwise_conv2d(x, w, b, residual=Residual(shortcut, shift=shift)),
                               shortcut + out + shift.view(-1, 1, 1))


@pytest.mark.parametrize('activation', [None, 'relu', 'gelu'])
def test_reference_applies_the_norm_then_the_activation(activation):
    """The norm (F.batch_norm by the running statistics) after the product, the activation
    after the norm; the matmul backend's epilogue is the same code."""
    x, w, b = make_inputs()
    norm = make_norm(7)
    out = F.batch_norm(F.conv2d(x, w, b), norm.mean, norm.var, norm.weight, norm.bias, False,
                       0.0, 1e-5)
    want = {None: out, 'relu': F.relu(out), 'gelu': F.gelu(out)}[activation]
    torch.testing.assert_close(pointwise_conv2d(x, w, b, activation, norm=norm), want)
    torch.testing.assert_close(matmul(x, w, b, activation, None, norm), want)


def test_reference_on_cpu_and_why_the_fast_backends_decline(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    x, w, b = (t.float() for t in make_inputs())
    assert 'CUDA only' in _pointwise_conv2d.why_not('matmul', x, w, b, None, None, None)
    assert 'TRITON_INTERPRET' in _pointwise_conv2d.why_not('triton', x, w, b, None, None, None)
    assert _pointwise_conv2d.select(x, w, b, None, None, None) == 'torch'
    torch.testing.assert_close(pointwise_conv2d(x, w, b), F.conv2d(x, w, b))


def test_bad_arguments_are_refused():
    x, w, b = make_inputs()
    with pytest.raises(ValueError, match=r'weight \(O, C, 1, 1\)'):
        pointwise_conv2d(x, w[:, :4])
    with pytest.raises(ValueError, match=r'weight \(O, C, 1, 1\)'):
        pointwise_conv2d(x, torch.randn(7, 5, 3, 3, dtype=x.dtype))
    with pytest.raises(ValueError, match=r'bias must be \(7,\)'):
        pointwise_conv2d(x, w, b[:3])
    with pytest.raises(ValueError, match="activation must be one of \\(None, 'gelu', 'relu'\\)"):
        pointwise_conv2d(x, w, b, 'silu')
    with pytest.raises(ValueError, match=r"norm's statistics and parameters must be \(7,\)"):
        pointwise_conv2d(x, w, b, norm=make_norm(5))
    (shortcut, scale, shift), sample_scale = make_residual(2, 7, 3, 4)
    with pytest.raises(ValueError, match=r'shortcut must be \(2, 7, 3, 4\)'):
        pointwise_conv2d(x, w, b, residual=Residual(shortcut[:, :5]))
    with pytest.raises(ValueError, match='scale must have 7 values'):
        pointwise_conv2d(x, w, b, residual=Residual(shortcut, scale[:6], shift))
    with pytest.raises(ValueError, match='sample_scale must have 2 values'):
        pointwise_conv2d(x, w, b, residual=Residual(shortcut, sample_scale=sample_scale[:1]))
    with pytest.raises(TypeError, match='must be a Residual'):
        pointwise_conv2d(x, w, b, residual=(shortcut, ))


def test_triton_float32_products_follow_cudnn_tf32_switch(monkeypatch):
    """The Triton 1x1 convolution rounds float32 maps as its reference ``F.conv2d`` (cuDNN)
    does: in TF32 where ``cudnn.allow_tf32`` (the default), whatever the matmul precision
    (float32-accurate products cost SegMAN-L 4x its bf16 time, docs/benchmarks.md)."""
    pytest.importorskip('triton')
    from mmseg_segman.ops import triton_pointwise_conv as tpw
    seen = []
    monkeypatch.setattr(tpw, 'launch', lambda *args, **kwargs: seen.append(kwargs['DOT_PRECISION']))
    x, w = torch.randn(1, 8, 4, 4), torch.randn(16, 8, 1, 1)
    assert torch.get_float32_matmul_precision() == 'highest'
    for allowed in (True, False):
        monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', allowed)
        tpw._product(x, w, torch.float32)
        tpw._product(x.bfloat16(), w, torch.bfloat16)
    assert seen == ['tf32', 'tf32', 'tf32x3', 'tf32']


def test_triton_inference_reads_a_kept_weight_in_the_compute_dtype(monkeypatch):
    """At inference the kernel reads the weight in the maps' dtype, one copy kept from call to
    call (half the bytes of the float32 parameter under autocast, docs/benchmarks.md); where
    autograd records, the float32 parameter itself (the kernel rounds it in its tiles)."""
    pytest.importorskip('triton')
    from mmseg_segman.ops import triton_pointwise_conv as tpw
    weights = []
    monkeypatch.setattr(tpw, 'launch', lambda kernel, grid, x, w, *args, **kwargs: weights.append(w))
    triton = _pointwise_conv2d.backends['triton'].fn
    x = torch.randn(1, 8, 4, 4, dtype=torch.bfloat16)
    weight = torch.nn.Parameter(torch.randn(16, 8, 1, 1))
    with torch.no_grad():
        for activation in (None, 'gelu', 'relu'):
            triton(x, weight, None, activation, None, None)
    assert all(w.dtype == torch.bfloat16 for w in weights)
    assert all(w.data_ptr() == weights[0].data_ptr() for w in weights)
    assert torch.equal(weights[0].view(16, 8), weight.detach().view(16, 8).bfloat16())
    weights.clear()
    triton(x, weight, None, None, None, None)
    assert weights[0] is weight


def test_resident_launch_config():
    """16-bit maps of at most 128 channels take all of them in one step, resident; a resident
    launch given fewer channels a step than the map has is refused."""
    pytest.importorskip('triton')
    from mmseg_segman.ops import triton_pointwise_conv as tpw
    assert tpw.launch_config(96, 288, 128 * 128) == tpw.Config(128, 64, 128, 4, 3, resident=1)
    assert tpw.launch_config(32, 64, 128 * 128) == tpw.Config(64, 64, 32, 4, 3, resident=1)
    assert tpw.launch_config(5, 7, 12).block_k == 16  # tl.dot's least
    assert not tpw.launch_config(96, 288, 128 * 128, element_size=4).resident
    assert not tpw.launch_config(192, 576, 64 * 64).resident
    x, w = torch.randn(1, 40, 3, 3), torch.randn(8, 40)
    with pytest.raises(ValueError, match='all 40 input channels in one step; block_k is 32'):
        tpw._product(x, w, x.dtype, config=tpw.Config(64, 64, 32, 4, 3, resident=1))


def test_triton_pointwise_conv_in_interpreter():
    pytest.importorskip('triton')
    from .triton_interpreter import assert_checks_pass_in_interpreter
    assert_checks_pass_in_interpreter(__file__, timeout=600)


# ---- run in Triton's interpreter (python tests/ops/test_pointwise_conv.py, TRITON_INTERPRET=1)

def check(batch, channels, out_channels, height, width, dtype, tol, activation=None,
          residual=None, bias=True):
    """The Triton backend's output and every gradient against the float64 reference;
    ``residual``: None, 'plain' (shortcut only) or 'scaled' (layer scale and per-sample factor)."""
    x, w, b = make_inputs(batch, channels, out_channels, height, width, seed=height * width)
    tensors, sample_scale = ([], None) if residual is None else make_residual(
        batch, out_channels, height, width, scale=residual == 'scaled', sample=residual == 'scaled')
    inputs = [x, w] + ([b] if bias else []) + tensors

    def run(backend, dtype):
        def call(x, w, *rest):
            bias_, rest = (rest[0], rest[1:]) if bias else (None, rest)
            scale = None if sample_scale is None else sample_scale.to(dtype)
            return _pointwise_conv2d.backends[backend].fn(
                x, w, bias_, activation, as_residual(rest, scale) if rest else None, None)
        return outputs_and_grads(call, [t.to(dtype) for t in inputs])

    got, want = run('triton', dtype), run('torch', torch.float64)
    assert got[0].dtype == dtype and got[0].shape == want[0].shape
    names = ['out', 'x', 'w'] + ['bias'] * bias + ['shortcut', 'scale', 'shift'][:len(tensors)]
    for name, a, e in zip(names, got, want):
        error = (a.double() - e).abs().max().item() / (e.abs().max().item() + 1e-12)
        assert error < tol, f'{name}: relative error {error:.2e} over {tol} ' \
                            f'({batch, channels, out_channels, height, width, dtype, activation, residual})'


def check_float32_weight_with_half_map():
    """As under autocast: a float16 map and the float32 parameters, which the kernels read as
    they are (the weight rounded to float16 in the product): every result matches the float64
    reference."""
    x, w, b = make_inputs(2, 40, 70, 5, 9, seed=3)
    (shortcut, scale, shift), sample_scale = make_residual(2, 70, 5, 9)
    backend = _pointwise_conv2d.backends['triton'].fn

    def run(x, w, b, shortcut, scale, shift, fn):
        return fn(x, w, b, None, Residual(shortcut, scale, shift, sample_scale.to(x.dtype)), None)
    inputs = [x, w, b, shortcut, scale, shift]
    got = outputs_and_grads(lambda x, *rest: run(x.half(), *rest, fn=backend),
                            [inputs[0]] + [t.float() for t in inputs[1:]])
    want = outputs_and_grads(lambda *t: run(*t, fn=_pointwise_conv2d.backends['torch'].fn), inputs)
    for name, a, e in zip(['out', 'x', 'w', 'bias', 'shortcut', 'scale', 'shift'], got, want):
        error = (a.double() - e).abs().max().item() / (e.abs().max().item() + 1e-12)
        assert error < 2e-2, f'{name}: relative error {error:.2e} (float16 map, float32 weight)'


def check_direct_launch_equals_function():
    """Without autograd recording the kernel runs without its autograd.Function: same output."""
    from triton_interpreter import check_launches_directly

    from mmseg_segman.ops import triton_pointwise_conv as tpw

    x, w, b = (t.half() for t in make_inputs(2, 40, 70, 5, 9))
    (shortcut, scale, shift), sample_scale = make_residual(2, 70, 5, 9, dtype=torch.float16)
    residual = Residual(shortcut, scale, shift, sample_scale)
    backend = _pointwise_conv2d.backends['triton'].fn
    check_launches_directly(tpw.POINTWISE_CONV2D.function,
                            lambda *t: backend(*t, None, residual, None),
                            [x, w, b], differentiable=1)


def check_custom_op():
    """The kernels as custom ops (opcheck: schema, fake shapes, autograd; plain, with GELU
    and with a scaled residual; the backward op for several sets of gradients asked for);
    eager calls skip them and match them bitwise; torch.compile traces them
    (:func:`triton_interpreter.check_eager_calls_skip_custom_ops`)."""
    from triton_interpreter import check_eager_calls_skip_custom_ops

    from mmseg_segman.ops.triton_pointwise_conv import POINTWISE_CONV2D

    f32 = torch.float32
    x, w, b = make_inputs(2, 5, 7, 3, 4, dtype=f32)
    (shortcut, scale, shift), sample_scale = make_residual(2, 7, 3, 4, dtype=f32)
    op = POINTWISE_CONV2D.forward_op
    leaves = [t.detach().requires_grad_() for t in (x, w, b, shortcut, scale, shift)]
    x_, w_, b_, shortcut_, scale_, shift_ = leaves
    torch.library.opcheck(op, (x_, w_, b_, True, None, None, None, None, f32, []))
    torch.library.opcheck(op, (x_, w_, None, False, shortcut_, scale_, shift_, sample_scale, f32,
                               [16, 16, 16, 4, 1]))
    torch.library.opcheck(op, (x_, w_, b_, True, None, scale_, shift_, sample_scale, f32, []))
    g = torch.randn(2, 7, 3, 4, generator=torch.Generator().manual_seed(9))
    for gelu, needed in ((False, [True] * 5), (True, [True] * 5), (False, [False, True, False, False, False]),
                         (True, [False, False, False, True, False]), (False, [True] + [False] * 4)):
        torch.library.opcheck(POINTWISE_CONV2D.backward_op,
                              (g, x, w, b, scale, shift, sample_scale, gelu, [], needed))

    def eager(x, w, b, shortcut, scale, shift):
        residual = Residual(shortcut, scale, shift, sample_scale)
        return _pointwise_conv2d.backends['triton'].fn(x, w, b, None, residual, None)

    def custom_op(x, w, b, shortcut, scale, shift):
        return op(x, w, b, False, shortcut, scale, shift, sample_scale, f32, [])

    check_eager_calls_skip_custom_ops(eager, custom_op, [x, w, b, shortcut, scale, shift], g,
                                      ('pointwise_conv2d_forward', 'pointwise_conv2d_backward'))
    print('custom op: ok')


def check_compiled_inference_casts_the_weight():
    """Compiled inference passes the custom op the float32 weight cast to the map's dtype
    (the kernel then reads 16-bit tiles), compiled training the parameter itself (its
    gradient stays float32); each matches the eager call bitwise (the kernel rounds a float32
    weight as the cast does)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from triton_interpreter import output_and_grads

    x, w, b = make_inputs(2, 40, 70, 5, 9, seed=3)
    x, w, b = x.half(), w.float(), b.float()
    backend = _pointwise_conv2d.backends['triton'].fn
    weight_dtypes = []

    def compiler(gm, example_inputs):
        weight_dtypes.extend(node.args[1].meta['val'].dtype for node in gm.graph.nodes
                             if 'pointwise_conv2d_forward' in str(node.target))
        return make_boxed_func(gm.forward)

    def fn(x, w, b):
        return backend(x, w, b, 'gelu', None, None)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=compiler), fullgraph=True)
    with torch.no_grad():
        got, want = compiled(x, w, b), fn(x, w, b)
    assert weight_dtypes == [torch.float16], weight_dtypes
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    weight_dtypes.clear()
    g = torch.randn(2, 70, 5, 9, generator=torch.Generator().manual_seed(4)).half()
    got, want = output_and_grads(compiled, [x, w, b], g), output_and_grads(fn, [x, w, b], g)
    assert weight_dtypes == [torch.float32], weight_dtypes
    assert got[2].dtype == torch.float32
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    print('compiled weight cast: ok')


def check_norm_and_activation():
    """A decode head's ConvModule at inference: the eval-mode norm and the ReLU (or GELU) in
    the product's pass where autograd does not record; where it records, the product's op
    and then PyTorch's, with every gradient; both against float64."""
    from mmseg_segman.ops.triton_pointwise_conv import pointwise_conv2d_inference_triton

    backend = _pointwise_conv2d.backends['triton'].fn
    torch_backend = _pointwise_conv2d.backends['torch'].fn
    # both output tiles, a resident (16-bit, 40 channels) and a looped launch (130 channels)
    for shape, dtype, tol in (((2, 40, 70, 9, 17), torch.float16, 2e-2),
                              ((1, 130, 20, 16, 20), torch.float32, 1e-5)):
        x, w, b = make_inputs(*shape, seed=11)
        norm = make_norm(shape[2])
        for activation in ('relu', 'gelu', None):
            want = torch_backend(x, w, b, activation, None, norm)
            with torch.no_grad():
                got = backend(x.to(dtype), w.float(), b.float(), activation, None,
                              RunningBatchNorm(*(t.float() for t in norm[:4]), norm.eps))
            assert got.dtype == dtype, got.dtype
            error = relative_error(got, want)
            assert error < tol, f'{shape} {activation}: relative error {error:.2e}'
        got = backend(x.to(dtype), w.float(), b.float(), 'relu', None, None)  # ReLU alone
        assert relative_error(got, torch_backend(x, w, b, 'relu', None, None)) < tol
    x, w, b = make_inputs(2, 5, 7, 3, 4, seed=12)
    norm = make_norm(7)
    inputs = [x, w, b, norm.weight, norm.bias]

    def run(fn, dtype):
        def call(x, w, b, gamma, beta):
            statistics = (norm.mean.to(dtype), norm.var.to(dtype))
            return fn(x, w, b, 'relu', None, RunningBatchNorm(*statistics, gamma, beta, 1e-5))
        return outputs_and_grads(call, [t.to(dtype) for t in inputs])
    for name, a, e in zip(['out', 'x', 'w', 'bias', 'norm weight', 'norm bias'],
                          run(backend, torch.float32), run(torch_backend, torch.float64)):
        assert relative_error(a, e) < 1e-5, name
    try:
        pointwise_conv2d_inference_triton(x.float(), w.float().requires_grad_(), b.float(), norm,
                                          'relu')
    except RuntimeError as error:
        assert 'no backward' in str(error), error
    else:
        raise AssertionError('the inference kernel ran where autograd records')
    print('norm and activation: ok')


def check_inference_custom_op():
    """The inference kernel as a custom op (opcheck: schema, fake shapes); torch.compile of the
    backend traces it, bit for bit the eager call's result."""
    from triton_interpreter import compile_recording_graphs

    from mmseg_segman.ops.triton_pointwise_conv import _inference_op

    x, w, b = (t.float() for t in make_inputs(2, 5, 7, 3, 4))
    norm = RunningBatchNorm(*(t.float() for t in make_norm(7)[:4]), 1e-5)
    torch.library.opcheck(_inference_op, (x, w, b, *norm, False, True, torch.float32))
    torch.library.opcheck(_inference_op, (x, w, None, None, None, None, None, 0.0, False, True,
                                          torch.float32))
    backend = _pointwise_conv2d.backends['triton'].fn
    with torch.no_grad():
        eager = backend(x, w, b, 'relu', None, norm)
        compiled, targets = compile_recording_graphs(lambda x: backend(x, w, b, 'relu', None, norm))
        got = compiled(x)
    assert 'mmseg_segman.pointwise_conv2d_inference_forward.default' in targets['forward'], \
        targets
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    print('inference custom op: ok')


def relative_error(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def main():
    # channels over and under BLOCK_K, outputs over and under BLOCK_O (64 and 128), pixels
    # over one BLOCK_P tile and not a multiple of 16
    for shape in [(2, 5, 7, 3, 4), (1, 40, 70, 9, 17), (2, 33, 130, 2, 3)]:
        check(*shape, torch.float32, 1e-5)
        check(*shape, torch.float32, 1e-5, activation='gelu')
        check(*shape, torch.float32, 1e-5, residual='scaled')
    check(2, 5, 7, 3, 4, torch.float32, 1e-5, residual='plain', bias=False)
    # a pixel count that is a multiple of 8 (ALIGN 8), over one 256-pixel tile
    check(1, 20, 36, 16, 20, torch.float32, 1e-5, activation='gelu', residual='scaled')
    check(2, 5, 7, 3, 4, torch.float32, 1e-5, activation='gelu', residual='scaled')
    # the input gradient's product over two output tiles and two pixel tiles
    check(2, 140, 20, 16, 20, torch.float32, 1e-5, residual='scaled')
    check(1, 140, 20, 16, 20, torch.float32, 1e-5, activation='gelu')
    check(1, 40, 70, 9, 17, torch.float16, 2e-2, activation='gelu')
    check(1, 40, 70, 9, 17, torch.float16, 2e-2, residual='scaled')
    # 16-bit maps of at most 128 channels: resident programs (launch_config), each walking
    # pixel tiles of both batch elements (6 tiles on 4 programs; 4 on 2 programs of each of
    # two output tiles), every epilogue; the input gradient over 130 channels is not resident
    check(2, 40, 70, 9, 17, torch.float16, 2e-2, activation='gelu', residual='scaled')
    check(2, 33, 130, 5, 13, torch.float16, 2e-2, residual='scaled')
    check(2, 33, 130, 5, 13, torch.float16, 2e-2, activation='gelu')
    check_float32_weight_with_half_map()
    check_direct_launch_equals_function()
    check_custom_op()
    check_compiled_inference_casts_the_weight()
    check_norm_and_activation()
    check_inference_custom_op()
    print('all checks passed')


if __name__ == '__main__':
    main()
