"""Every GPU backend of the SegMAN ops against the pure-PyTorch reference, on CUDA.

    python tools/gpu_checks/check_ops.py [--seed 0] [--ops layer_norm_2d ...] [--backends triton ...]

For each op, each non-reference backend that is available on CUDA, each case (odd sizes,
axes shorter than the kernel) and float32 / bfloat16 inputs, the backend's output and the
gradients of all its inputs are compared with the ``torch`` backend run on the same inputs
upcast to float64. The error is ``||x - ref|| / ||ref||``; a check passes when it is under
the dtype's tolerance, or under twice the error of the ``torch`` backend itself in that
dtype (the reference's own rounding sets the floor); a ``triton`` backend must also give the
same numbers bit for bit in two more runs under ``torch.use_deterministic_algorithms`` (the
second's kernels launch directly, ``triton_jit.launch``; by default the scan's and the layer
norm's backward add partial sums by atomics, in a run-dependent order). Last, unless
``--ops`` names the ops to check, the SegMAN-T encoder runs forward and backward on the fast
and the reference path (float32 and bf16 autocast; on a fresh machine it compiles every
kernel first, over a minute: ``--ops`` runs alone ran into their calls' time limits,
docs/benchmarks.md). ``--backends`` checks only those backends
(``--backends triton`` leaves out FlexAttention, which compiles each case for tens of
seconds: the attention's checks alone filled a call's 170 s, twenty-sixth session).
Prints one PASS/FAIL line per check and exits 1 if any failed.
"""
import argparse
import math
import sys
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

import mmseg_segman  # noqa: F401  (registers the models and the ops)
from mmseg_segman.models.layers import RoPE2d
from mmseg_segman.ops import dispatch
from mmseg_segman.ops.pointwise_conv import Residual

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}

# Each case is (op, name, inputs(dtype) -> args); activations come in ``dtype``, parameters
# (rpb, bias, A, D, delta_bias, norm weights) stay float32, as under autocast. Every tensor
# gets gradients.


def _randn(*shape, dtype=torch.float32, scale=1.0) -> Tensor:
    return (torch.randn(*shape, device='cuda') * scale).to(dtype)


def na_case(batch, heads, height, width, dim, kernel, rpb=True):
    def make(dtype):
        q, k, v = (_randn(batch, heads, height, width, dim, dtype=dtype) for _ in range(3))
        bias = _randn(heads, 2 * kernel - 1, 2 * kernel - 1) if rpb else None
        return [q * dim ** -0.5, k, v, kernel, bias]
    name = f'B{batch} h{heads} {height}x{width} d{dim} k{kernel}' + ('' if rpb else ' no-rpb')
    return 'neighborhood_attention', name, make


def attention_case(batch, heads, length, dim, bias=True):
    def make(dtype):
        q, k, v = (_randn(batch, heads, length, dim, dtype=dtype) for _ in range(3))
        return [q * dim ** -0.5, k, v, _randn(heads, length, length) if bias else None]
    return 'biased_attention', f'B{batch} h{heads} L{length} d{dim}' + ('' if bias else ' no-bias'), make


def scan_case(batch, channels, height, width, state=1):
    def make(dtype):
        x = _randn(batch, channels, height, width, dtype=dtype)
        rank = math.ceil(channels / 16)  # delta = dt_proj @ dt_low about 0.5 in size
        dt_low = _randn(batch, 4, rank, height * width, dtype=dtype)  # direction order
        dt_proj = _randn(4, channels, rank, scale=0.5 / rank ** 0.5)
        A = -torch.exp(_randn(4 * channels, state, scale=0.5))
        B, C = (_randn(batch, 4, state, height * width, dtype=dtype) for _ in range(2))
        D = _randn(4 * channels)
        dt = torch.empty(4 * channels, device='cuda').uniform_(math.log(1e-3), math.log(0.1)).exp()
        delta_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus, as VMamba's init
        return [x, dt_low, dt_proj, A, B, C, D, delta_bias]
    return 'cross_selective_scan', f'B{batch} d{channels} {height}x{width} N{state}', make


def direction_order_case(batch, channels, height, width):
    def make(dtype):
        return [_randn(batch, 4, channels, height, width, dtype=dtype)]
    return 'direction_order', f'B{batch} 4x{channels} {height}x{width}', make


def layer_norm_case(batch, channels, height, width, addends=0):
    """``addends`` maps added after the norm (fixed: their gradient is the output's)."""
    def make(dtype):
        return [_randn(batch, channels, height, width, dtype=dtype, scale=2.0), _randn(channels),
                _randn(channels), 1e-6,
                tuple(_randn(batch, channels, height, width, dtype=dtype) for _ in range(addends))]
    name = f'B{batch} C{channels} {height}x{width}' + (f' +{addends} addends' if addends else '')
    return 'layer_norm_2d', name, make


def batch_norm_case(batch, channels, height, width, activation='silu'):
    """Training mode: the running statistics (fixed, copied for each run) updated in place."""
    def make(dtype):
        return [_randn(batch, channels, height, width, dtype=dtype, scale=2.0), _randn(channels),
                _randn(channels), Fixed(_randn(channels)),
                Fixed(torch.rand(channels, device='cuda') + 0.5), 0.1, 1e-5, activation]
    return 'batch_norm_2d', f'B{batch} C{channels} {height}x{width} {activation}', make


def depthwise_case(batch, channels, height, width, kernel, residual=False):
    def make(dtype):
        return [_randn(batch, channels, height, width, dtype=dtype),
                _randn(channels, 1, kernel, kernel, scale=0.2), _randn(channels), residual,
                None, None]  # no norm, no activation
    name = f'B{batch} C{channels} {height}x{width} k{kernel}' + (' residual' if residual else '')
    return 'depthwise_conv2d', name, make


def pointwise_case(batch, channels, out_channels, height, width, epilogue=None):
    """``epilogue``: None, ``'gelu'`` or ``'residual'`` (a shortcut, a layer scale and a
    per-sample factor that drops the first sample)."""
    def make(dtype):
        residual = None
        if epilogue == 'residual':
            sample_scale = torch.full((batch, ), 1.25, device='cuda')
            sample_scale[0] = 0
            residual = Residual(_randn(batch, out_channels, height, width, dtype=dtype),
                                _randn(out_channels), _randn(out_channels), sample_scale)
        return [_randn(batch, channels, height, width, dtype=dtype),
                _randn(out_channels, channels, 1, 1, scale=channels ** -0.5), _randn(out_channels),
                'gelu' if epilogue == 'gelu' else None, residual, None]
    name = f'B{batch} C{channels}->{out_channels} {height}x{width}' + (f' {epilogue}' if epilogue else '')
    return 'pointwise_conv2d', name, make


def resize_case(batch, channels, height, width, size, align_corners=False):
    def make(dtype):
        return [_randn(batch, channels, height, width, dtype=dtype), size, align_corners]
    return 'resize_bilinear', f'B{batch} C{channels} {height}x{width} -> {size} ac={align_corners}', make


def cross_entropy_case(batch, classes, height, width, ignore_index=255):
    def make(dtype):
        # logits of a head resized to the labels; a fifth of the labels ignored; ties of the
        # top classes where bfloat16 rounds them together
        label = torch.randint(0, classes, (batch, height, width), device='cuda')
        label[torch.rand(label.shape, device='cuda') < 0.2] = ignore_index
        return [_randn(batch, classes, height, width, dtype=dtype, scale=3.0), label, ignore_index]
    return 'cross_entropy_2d', f'B{batch} K{classes} {height}x{width} ignore {ignore_index}', make


class Fixed(NamedTuple):
    """A tensor argument without a gradient (upcast with the others)."""
    tensor: Tensor


def rope_case(batch, heads, height, width, dim, scale=1.0, planar=False):
    def make(dtype):
        # permuted views of a qkv map, as the encoder passes queries and keys
        qkv = _randn(batch, 3, heads, dim, height, width, dtype=dtype).permute(1, 0, 2, 4, 5, 3)
        sin, cos = RoPE2d(dim).cuda()((height, width))
        return [qkv[0], qkv[1], Fixed(sin), Fixed(cos), scale, planar]
    return ('rotary_embedding', f'B{batch} h{heads} {height}x{width} d{dim} scale {scale}'
            f'{" planes" if planar else ""}', make)


CASES = [
    na_case(2, 4, 64, 64, 24, 11), na_case(2, 3, 37, 45, 20, 9), na_case(1, 2, 13, 9, 36, 7),
    na_case(2, 2, 5, 19, 28, 7), na_case(1, 4, 6, 4, 32, 11), na_case(2, 8, 16, 16, 24, 7),
    na_case(2, 4, 33, 21, 32, 9, rpb=False), na_case(5, 2, 24, 20, 24, 7),  # the dq kernel's pairs
    attention_case(2, 8, 256, 24), attention_case(2, 13, 63, 28), attention_case(1, 20, 35, 28),
    attention_case(2, 4, 77, 32, bias=False),
    scan_case(2, 64, 32, 32), scan_case(1, 36, 7, 13), scan_case(2, 96, 16, 23), scan_case(1, 17, 1, 5),
    direction_order_case(2, 8, 128, 128), direction_order_case(3, 29, 37, 45),
    layer_norm_case(2, 96, 128, 128), layer_norm_case(1, 37, 13, 9), layer_norm_case(2, 560, 16, 16),
    layer_norm_case(16, 64, 7, 5), layer_norm_case(2, 96, 33, 20, addends=2),
    batch_norm_case(8, 96, 128, 128), batch_norm_case(2, 37, 13, 9, None),
    batch_norm_case(8, 432, 32, 32), batch_norm_case(70, 5, 3, 3),
    batch_norm_case(8, 48, 256, 256, 'gelu'), batch_norm_case(8, 224, 128, 128, 'relu'),
    batch_norm_case(8, 224, 1, 1, 'relu'),
    depthwise_case(2, 96, 128, 128, 3), depthwise_case(2, 40, 37, 45, 5), depthwise_case(1, 7, 2, 9, 5),
    depthwise_case(4, 1456, 16, 16, 3), depthwise_case(2, 64, 33, 70, 3, residual=True),
    depthwise_case(2, 40, 9, 11, 5, residual=True),
    pointwise_case(2, 96, 288, 128, 128), pointwise_case(3, 37, 5, 13, 9),
    pointwise_case(2, 96, 384, 64, 64, 'gelu'), pointwise_case(2, 1296, 432, 32, 32, 'residual'),
    pointwise_case(3, 37, 70, 13, 9, 'residual'), pointwise_case(1, 20, 33, 7, 5, 'gelu'),
    # SegMAN-B's FFN at batch 8: the weight gradient's splits of several items, a short last one
    pointwise_case(8, 96, 384, 128, 128, 'gelu'), pointwise_case(8, 1456, 364, 32, 32, 'residual'),
    rope_case(2, 4, 128, 128, 24, 24 ** -0.5, planar=True), rope_case(1, 13, 13, 9, 28),
    resize_case(2, 150, 64, 64, (512, 512)), resize_case(1, 7, 13, 9, (5, 31), True),
    cross_entropy_case(2, 150, 128, 128), cross_entropy_case(3, 19, 13, 37, 0),
    cross_entropy_case(1, 171, 64, 96),
]


# ops that the models call on half-precision maps with float32 parameters, which only
# autocast allows: their half-precision checks run under autocast, as in the models
UNDER_AUTOCAST = {'layer_norm_2d', 'depthwise_conv2d', 'pointwise_conv2d', 'batch_norm_2d'}


def rel_error(x: Optional[Tensor], ref: Optional[Tensor]) -> float:
    if x is None or ref is None:
        return 0.0 if x is None and ref is None else math.inf
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return math.inf
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run(fn: Callable, args: List, cotangent: Optional[Tensor], upcast: bool = False):
    """``fn(*args)``, the cotangent, the gradients of its floating-point tensor args (and of
    the tensors of a :class:`Residual`, but its per-sample factor; not of :class:`Fixed` ones)
    for ``cotangent``, and the outputs after the first where it returns several (compared
    exactly: ``cross_entropy_2d``'s prediction); several floating-point outputs of one shape
    are stacked into one (``rotary_embedding``'s queries and keys)."""
    leaves = []

    def leaf(a, differentiable=True):
        if isinstance(a, Tensor) and a.is_floating_point():
            a = a.detach().double() if upcast else a.detach().clone()
            if differentiable:
                a.requires_grad_(True)
                leaves.append(a)
        elif isinstance(a, Residual):
            a = Residual(*(leaf(t, name != 'sample_scale') for name, t in zip(a._fields, a)))
        elif isinstance(a, Fixed):
            a = leaf(a.tensor, differentiable=False)
        return a

    out = fn(*[leaf(a) for a in args])
    if isinstance(out, tuple) and all(o.is_floating_point() and o.shape == out[0].shape
                                      for o in out):
        out = torch.stack(out)
    out, *extras = out if isinstance(out, tuple) else (out,)
    g = torch.randn_like(out, dtype=torch.float32) if cotangent is None else cotangent
    out.backward(g.to(out.dtype))
    return out.detach(), g, [leaf.grad for leaf in leaves], extras


def check_op_backends(seed: int, only: Optional[List[str]] = None,
                      backends: Optional[List[str]] = None) -> List[bool]:
    results = []
    ops = dispatch.registered_ops()
    for op_name, case_name, make in CASES:
        if only and op_name not in only:
            continue
        op = ops[op_name]
        reference = op.backends['torch'].fn
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(seed)
            args = make(dtype)
            autocast = torch.autocast('cuda', dtype, enabled=op_name in UNDER_AUTOCAST and dtype != torch.float32)
            with autocast:
                plain = [a.tensor if isinstance(a, Fixed) else a for a in args]
                names = [n for n in op.backends if n != 'torch' and (not backends or n in backends)
                         and op.why_not(n, *plain) is None]
            if not names:
                continue
            ref_out, g, ref_grads, ref_extras = run(reference, args, None, upcast=True)
            with autocast:
                floor_out, _, floor_grads, _ = run(reference, args, g)
            for name in names:
                try:
                    with autocast:
                        out, _, grads, extras = run(op.backends[name].fn, args, g)
                        once, again = repeated_deterministically(op.backends[name].fn, args, g) \
                            if name == 'triton' else (None, None)
                except Exception as e:  # a crash is a failure of this backend, not of the script
                    print(f'FAIL {op_name:24s} {name:7s} {str(dtype)[6:]:8s} {case_name}: '
                          f'{type(e).__name__}: {str(e)[:200]}')
                    results.append(False)
                    continue
                pairs = [('out', out, floor_out, ref_out)] + [
                    (f'grad{i}', a, b, c) for i, (a, b, c) in enumerate(zip(grads, floor_grads, ref_grads))]
                worst = []
                ok = True
                for label, x, floor, ref in pairs:
                    err, floor_err = rel_error(x, ref), rel_error(floor, ref)
                    passed = err <= max(TOLERANCE[dtype], 2 * floor_err)
                    ok &= passed
                    worst.append(f'{label} {err:.1e}' + ('' if passed else f'(torch {floor_err:.1e})'))
                if extras:
                    exact = all(map(same, extras, ref_extras))
                    ok &= exact
                    worst.append('other outputs ' + ('equal' if exact else 'DIFFER'))
                if again is not None:  # its kernels launched directly (triton_jit.launch)
                    repeated = same(again[0], once[0]) and all(map(same, again[2], once[2]))
                    ok &= repeated
                    worst.append('repeat ' + ('equal' if repeated else 'DIFFERS'))
                results.append(ok)
                print(f'{"PASS" if ok else "FAIL"} {op_name:24s} {name:7s} {str(dtype)[6:]:8s} '
                      f'{case_name}: ' + ', '.join(worst))
    return results


def repeated_deterministically(fn: Callable, args: List, cotangent: Tensor) -> Tuple:
    """:func:`run` twice under ``torch.use_deterministic_algorithms`` (kernels whose atomics
    add in a run-dependent order take their ordered paths): the second run's kernels launch
    directly (:func:`~mmseg_segman.ops.triton_jit.launch`), and must give the first's bits."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return run(fn, args, cotangent), run(fn, args, cotangent)
    finally:
        torch.use_deterministic_algorithms(False)


def same(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def check_model(seed: int) -> List[bool]:
    """SegMAN-T encoder, fast path vs reference path, outputs and parameter gradients."""
    from mmseg_segman.models import SegMANEncoder

    torch.manual_seed(seed)
    model = SegMANEncoder('t').cuda().eval()  # eval: BN in running mode, same in both runs
    with torch.no_grad():  # rpb starts at zero: perturb every parameter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(2, 3, 224, 352, device='cuda')
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        runs = []
        for backends in (None, 'torch'):
            model.zero_grad()
            with dispatch.use_backends(backends):
                with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
                    outs = model(x)
                sum(o.float().square().mean() for o in outs).backward()
            runs.append(([o.detach().float() for o in outs],
                         [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (fast_outs, fast_grads), (ref_outs, ref_grads) = runs
        out_err = max(rel_error(a, b) for a, b in zip(fast_outs, ref_outs))
        grad_err = rel_error(torch.cat([g.flatten() for g in fast_grads]),
                             torch.cat([g.flatten() for g in ref_grads]))
        tol = 5 * TOLERANCE[dtype]
        ok = out_err <= tol and grad_err <= tol and len(fast_grads) == len(ref_grads)
        results.append(ok)
        print(f'{"PASS" if ok else "FAIL"} {"SegMAN-T encoder":24s} {"fast":7s} {str(dtype)[6:]:8s} '
              f'2x3x224x352 vs reference path: out {out_err:.1e}, grads {grad_err:.1e} (tol {tol:.0e})')
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--ops', nargs='+', choices=sorted(dispatch.registered_ops()),
                        help='check only these ops, not the encoder (FlexAttention compiles for a '
                        'minute first)')
    parser.add_argument('--backends', nargs='+',
                        choices=sorted({n for op in dispatch.registered_ops().values()
                                        for n in op.backends} - {'torch'}),
                        help='check only these backends (the reference is torch)')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print('FAIL no CUDA device')
        return 1
    print(f'torch {torch.__version__}, {torch.cuda.get_device_name()}')
    for name, op in dispatch.registered_ops().items():
        print(f'op {name}: backends {list(op.backends)}')
    results = check_op_backends(args.seed, args.ops, args.backends) + \
        ([] if args.ops else check_model(args.seed))
    failed = results.count(False)
    print(f'{len(results) - failed} PASS, {failed} FAIL')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
