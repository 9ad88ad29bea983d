"""The Triton cross selective scan against the PyTorch reference, in Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so the checks run in a
subprocess executing this file (the rest of the suite never sees the variable). Sizes are
small: the interpreter runs every scan element in Python.
"""
import time

import pytest


def test_triton_cross_scan_in_interpreter():
    pytest.importorskip('triton')
    # imported here, not at the top: this file also runs as a script in the interpreter
    from .triton_interpreter import assert_checks_pass_in_interpreter
    assert_checks_pass_in_interpreter(__file__, timeout=300)


def test_not_chosen_on_cpu_without_interpreter(monkeypatch):
    import torch

    from mmseg_segman.ops.selective_scan import _cross_selective_scan
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    inputs = make_inputs(1, 2, 3, 3, torch.float32)
    assert 'TRITON_INTERPRET' in _cross_selective_scan.why_not('triton', *inputs)
    assert _cross_selective_scan.select(*inputs) == 'torch'


def test_checkpoint_count_of_default_blocks():
    """The fake implementation's count of checkpointed states without blocks (no power of
    two of a symbolic length) is the count the default backward tile gives."""
    pytest.importorskip('triton')
    from mmseg_segman.ops.triton_cross_selective_scan import block_sizes, checkpoint_count
    for length in range(1, 5000):
        assert checkpoint_count(length, []) == (length - 1) // block_sizes(length, backward=True)[1], length
    assert checkpoint_count(100, [2, 16, 4]) == 6


BF16_TOL = 2e-2


def make_inputs(batch, channels, height, width, dtype, state=1, seed=0):
    """SS2D-like inputs: activations in ``dtype`` (dt_low, B, C in direction order), parameters
    (dt_proj, A, D, delta_bias) float32."""
    import torch
    g = torch.Generator().manual_seed(seed)
    def act(*shape):
        return torch.randn(*shape, generator=g).to(dtype)
    length, rank = height * width, max(1, (channels + 1) // 2)
    return [act(batch, channels, height, width), act(batch, 4, rank, length),
            torch.randn(4, channels, rank, generator=g) * rank ** -0.5,
            -torch.rand(4 * channels, state, generator=g) * 2 - 0.05,
            act(batch, 4, state, length), act(batch, 4, state, length),
            torch.randn(4 * channels, generator=g), torch.randn(4 * channels, generator=g) - 2]


def sequential(x, dt_low, dt_proj, A, B, C, D, delta_bias):
    """The ground truth: step projection, cross scan, the step-by-step loop, cross merge
    (float64)."""
    import torch

    from mmseg_segman.ops.cross_scan import cross_merge, cross_scan, flip_reversed
    from mmseg_segman.ops.selective_scan import selective_scan_reference
    batch, channels, height, width = x.shape
    length = height * width
    delta = torch.einsum('kdr,bkrl->bkdl', dt_proj, dt_low)
    ys = selective_scan_reference(cross_scan(x).reshape(batch, -1, length),
                                  flip_reversed(delta).reshape(batch, -1, length), A,
                                  flip_reversed(B), flip_reversed(C), D, delta_bias)
    return cross_merge(ys.view(batch, 4, channels, length), height, width)


def outputs_and_grads(fn, inputs, dy, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, **kwargs)
    out.backward(dy.to(out.dtype))
    return [out] + [t.grad for t in leaves]


NAMES = ['y', 'dx', 'ddt_low', 'ddt_proj', 'dA', 'dB', 'dC', 'dD', 'ddelta_bias']


def compare(label, got, want, tol):
    """Max abs error relative to the reference's max abs value, per output; fail over ``tol``."""
    errs = {}
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, (label, name, a.shape, b.shape)
        errs[name] = ((a.double() - b.double()).abs().max() / (b.double().abs().max() + 1e-12)).item()
    worst = max(errs, key=errs.get)
    print(f'{label}: worst rel err {errs[worst]:.1e} ({worst})')
    assert errs[worst] <= tol, (label, errs)


def check(batch, channels, height, width, dtype, tol, blocks=(None, None), transform=None):
    """Triton vs the torch backend (same dtype) and vs the float64 sequential loop."""
    import torch

    from mmseg_segman.ops.selective_scan import _cross_selective_scan_torch
    from mmseg_segman.ops.triton_cross_selective_scan import cross_selective_scan_triton

    inputs = make_inputs(batch, channels, height, width, dtype, seed=height * width + channels)
    dy = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    got = outputs_and_grads(
        lambda *t: cross_selective_scan_triton(*(transform(t) if transform else t), *blocks),
        inputs, dy)
    seconds = time.perf_counter() - start
    for t, g in zip(inputs, got[1:]):
        assert g.dtype == t.dtype, (g.dtype, t.dtype)
    assert got[0].dtype == dtype
    label = f'{str(dtype)[6:]} B{batch} D{channels} {height}x{width} blocks={blocks}' + \
        (' strided' if transform else '')
    compare(f'{label} vs torch  [{seconds:.2f} s]', got,
            outputs_and_grads(_cross_selective_scan_torch, inputs, dy), tol)
    compare(f'{label} vs loop  ', got,
            outputs_and_grads(sequential, [t.double() for t in inputs], dy.double()), tol)


def check_shared_partial_sum_rows():
    """Channel blocks beyond ``BC_ROWS`` add ``dB`` and ``dC`` into shared rows by atomics
    (blocks 0, 2, 4 into row 0 here): the gradients match the stored rows' of one row a block,
    which ``torch.use_deterministic_algorithms`` keeps."""
    import torch

    from mmseg_segman.ops import triton_cross_selective_scan as scan

    inputs = make_inputs(2, 5, 3, 7, torch.float32, seed=3)
    dy = torch.randn(2, 5, 3, 7, generator=torch.Generator().manual_seed(4))
    blocks = ((2, 16, 4), (1, 16, 4))  # five channel blocks in the backward pass

    def run():
        return outputs_and_grads(lambda *t: scan.cross_selective_scan_triton(*t, *blocks),
                                 inputs, dy)

    rows = scan.BC_ROWS
    try:
        scan.BC_ROWS = 2
        assert scan.partial_sum_rows(5, scan.BC_ROWS) == (2, True)
        shared = run()
        torch.use_deterministic_algorithms(True)
        assert scan.partial_sum_rows(5, scan.BC_ROWS) == (5, False)
        own = run()
    finally:
        scan.BC_ROWS = rows
        torch.use_deterministic_algorithms(False)
    compare('rows shared by atomics vs a row a block', shared, own, 1e-6)
    compare('rows shared by atomics vs loop', shared,
            outputs_and_grads(sequential, [t.double() for t in inputs], dy.double()), 1e-5)


def strided_views(inputs):
    """The same values with the strides SS2D produces and more: dt_low, B, C split from one
    tensor (read in place), dt_low also with the sequence not innermost, x channels-last."""
    import torch
    x, dt_low, dt_proj, A, B, C, D, delta_bias = inputs
    rank = dt_low.shape[2]
    packed = torch.cat([dt_low, B, C], 2).transpose(-1, -2).contiguous().transpose(-1, -2)
    return [x.contiguous(memory_format=torch.channels_last), packed[:, :, :rank], dt_proj, A,
            packed[:, :, rank:rank + 1], packed[:, :, rank + 1:], D, delta_bias]


def check_stiff_decay(blocks=(None, None)):
    """Large steps (``a_t = exp(dt * A)`` near 0): every entry of dA, not only the largest,
    matches the float64 loop to float32 accuracy (no cancellation in ``a_t h_{t-1}``)."""
    import torch

    from mmseg_segman.ops.triton_cross_selective_scan import cross_selective_scan_triton
    inputs = make_inputs(2, 4, 5, 6, torch.float32)
    inputs[7] = inputs[7] + 8  # delta_bias: dt about 6 to 10
    inputs[3] = inputs[3] - 2  # A from -4 to -2: a_t < exp(-12)
    dy = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(2))
    got = outputs_and_grads(lambda *t: cross_selective_scan_triton(*t, *blocks), inputs,
                            dy)[NAMES.index('dA')]
    want = outputs_and_grads(sequential, [t.double() for t in inputs], dy.double())[NAMES.index('dA')]
    err = ((got.double() - want) / want).abs().max().item()
    print(f'stiff decay, blocks={blocks}: dA entry-wise rel err {err:.1e}')
    assert err <= 1e-4, err


def states_in_scan_order(x, dt_low, dt_proj, A, B, C, D, delta_bias):
    """Every state ``h (B, 4, D, L)`` of the four scans in scan order (float64 loop)."""
    import torch

    from mmseg_segman.ops.cross_scan import cross_scan, flip_reversed
    x, dt_low, dt_proj, A, B, delta_bias = (t.detach().double()
                                            for t in (x, dt_low, dt_proj, A, B, delta_bias))
    delta = torch.einsum('kdr,bkrl->bkdl', dt_proj, dt_low)
    dt = torch.nn.functional.softplus(flip_reversed(delta) + delta_bias.view(4, -1, 1))
    decay, drive = torch.exp(dt * A.view(4, -1, 1)), dt * flip_reversed(B) * cross_scan(x)
    h, states = torch.zeros_like(decay[..., 0]), []
    for t in range(decay.shape[-1]):
        h = decay[..., t] * h + drive[..., t]
        states.append(h)
    return torch.stack(states, -1)


def check_saved_states():
    """What autograd keeps besides the inputs is the checkpointed states (not ``delta``
    ``(B, 4, D, L)``, recomputed from ``dt_low`` and ``dt_proj``): float32
    ``(B, 4, D, (L - 1) // BLOCK_L)`` of the backward's ``BLOCK_L``, whatever the forward's,
    the state at the end of each backward tile but the last. Without a forward that stored
    them (``store_states=False``) the backward recomputes them and gives the same gradients,
    bitwise."""
    import torch
    from autograd_memory import saved_bytes

    from mmseg_segman.ops.triton_cross_selective_scan import cross_selective_scan_triton
    op = torch.ops.mmseg_segman.cross_scan_forward
    # forward tiles longer, shorter than the backward's; L a multiple of the backward tile
    for shape, blocks in (((2, 3, 9, 9), [2, 64, 4, 2, 16, 4]), ((1, 3, 4, 8), [2, 16, 4, 2, 8, 4]),
                          ((1, 2, 16, 32), [])):
        inputs = make_inputs(*shape, torch.float32)
        block_l = blocks[4] if blocks else 256
        want = states_in_scan_order(*inputs)[..., block_l - 1:-1:block_l]
        got = op(*inputs, True, blocks)[1]
        assert got.dtype == torch.float32 and got.shape[-1] == (shape[2] * shape[3] - 1) // block_l
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for (batch, channels, height, width), fwd, bwd in (((2, 3, 9, 9), (2, 64, 4), (2, 16, 4)),
                                                      ((1, 2, 17, 17), None, None)):
        inputs = [t.requires_grad_() for t in make_inputs(batch, channels, height, width,
                                                          torch.bfloat16)]
        block_l = (bwd or (2, 256, 4))[1]
        states = batch * 4 * channels * ((height * width - 1) // block_l) * 4
        assert states > 0
        got = saved_bytes(cross_selective_scan_triton, *inputs, fwd, bwd)
        assert got == sum(t.numel() * t.element_size() for t in inputs) + states, (got, states)
    inputs, blocks = make_inputs(2, 3, 9, 9, torch.float32), [2, 64, 4, 2, 16, 4]
    dy = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(5))
    stored, recomputed = (outputs_and_grads(lambda *t: op(*t, store, blocks)[0], inputs, dy)
                          for store in (True, False))
    for a, b in zip(stored, recomputed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    print('saved states: ok')


def check_merge():
    """The merge kernel against :func:`cross_merge` over several tiles, the last partial,
    into float32 and bfloat16."""
    import torch

    from mmseg_segman.ops.cross_scan import cross_merge, flip_reversed
    from mmseg_segman.ops.triton_cross_selective_scan import _merge
    for height, width in ((37, 70), (70, 5)):
        ys = torch.randn(2, 4, 3, height * width, generator=torch.Generator().manual_seed(height))
        want = cross_merge(flip_reversed(ys), height, width)
        torch.testing.assert_close(_merge(ys, height, width, torch.float32), want)
        torch.testing.assert_close(_merge(ys, height, width, torch.bfloat16), want.bfloat16())
    print('merge: ok')


def check_layouts_and_projection():
    """The kernels that lay ``x`` out in both orders and project the steps, forward and
    backward, against :func:`both_orders`, :func:`project_steps` and
    :func:`project_steps_backward`: over several tiles, the last partial, from a channel slice
    (planes contiguous, batch strided), ranks below and above 16."""
    import torch

    from mmseg_segman.ops.cross_scan import both_orders
    from mmseg_segman.ops.selective_scan import project_steps, project_steps_backward
    from mmseg_segman.ops.triton_cross_selective_scan import (ProjectionBackwardLaunch,
                                                              _both_orders, _project_steps,
                                                              _project_steps_backward)
    g = torch.Generator().manual_seed(5)
    for height, width in ((37, 70), (70, 5)):
        wide = torch.randn(2, 5, height, width, generator=g)
        x = wide[:, 1:4]
        torch.testing.assert_close(_both_orders(x), both_orders(x), rtol=0, atol=0)
        torch.testing.assert_close(_both_orders(x.bfloat16()), both_orders(x.bfloat16()),
                                   rtol=0, atol=0)
    for rank, channels, length in ((3, 40, 150), (27, 33, 129), (27, 70, 600)):
        dt_low = torch.randn(2, 4, rank + 2, length, generator=g)[:, :, :rank]  # split view
        dt_proj = torch.randn(4, channels, rank, generator=g)
        torch.testing.assert_close(_project_steps(dt_low, dt_proj), project_steps(dt_low, dt_proj))
        got = _project_steps(dt_low.bfloat16(), dt_proj)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), project_steps(dt_low.bfloat16(), dt_proj).float(),
                                   rtol=1e-2, atol=1e-2)
        # the backward: over several tiles of steps and of channels, the last ones partial;
        # channels split over programs (the default at these sizes) or not
        ddelta = torch.randn(2, 4, channels, length, generator=g)
        unsplit = ProjectionBackwardLaunch(16, 64, 4, min_programs=0)
        for low, launch_shape in ((dt_low, None), (dt_low.bfloat16(), None), (dt_low, unsplit)):
            got = _project_steps_backward(ddelta, low, dt_proj, launch_shape)
            want = project_steps_backward(ddelta, low, dt_proj)
            assert [t.dtype for t in got] == [low.dtype, dt_proj.dtype]
            tolerance = 1e-4 if low.dtype == torch.float32 else 1e-2  # d dt_low rounded to bfloat16
            for a, b in zip(got, want):
                torch.testing.assert_close(a.float(), b.float(), rtol=tolerance, atol=tolerance)
    print('layouts and step projection: ok')


def check_direction_order():
    """The op's Triton backend (one kernel, and the same kernel back in the backward pass)
    against its reference: exactly, over several tiles with a partial last one and in both
    map shapes, and through autograd; picked automatically here (Triton's interpreter)."""
    import torch

    from mmseg_segman.ops.cross_scan import _direction_order, direction_order
    g = torch.Generator().manual_seed(6)
    for height, width in ((37, 70), (70, 5)):
        maps = torch.randn(2, 4, 3, height, width, generator=g, requires_grad=True)
        assert _direction_order.select(maps) == 'triton'
        want = _direction_order.backends['torch'].fn(maps)
        got = direction_order(maps)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        cotangent = torch.randn(want.shape, generator=g)
        want_grad, = torch.autograd.grad(want, maps, cotangent)
        got_grad, = torch.autograd.grad(got, maps, cotangent)
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(direction_order(maps.bfloat16()), want.bfloat16(),
                                       rtol=0, atol=0)
    check_direction_order_custom_op()
    print('direction order: ok')


def check_direction_order_custom_op():
    """The kernel as custom ops (opcheck: schema, fake shapes, autograd); eager calls skip
    them and match them bitwise; torch.compile traces them."""
    import torch
    from triton_interpreter import check_eager_calls_skip_custom_ops

    from mmseg_segman.ops.triton_cross_selective_scan import DIRECTION_ORDER, direction_order_triton
    g = torch.Generator().manual_seed(7)
    maps = torch.randn(1, 4, 2, 5, 3, generator=g)
    torch.library.opcheck(DIRECTION_ORDER.forward_op, (maps.requires_grad_(), 5, 3, False))
    torch.library.opcheck(DIRECTION_ORDER.backward_op, (torch.randn(1, 4, 2, 15), 5, 3, True))
    check_eager_calls_skip_custom_ops(
        direction_order_triton, lambda t: DIRECTION_ORDER.forward_op(t, 5, 3, False), [maps],
        torch.randn(1, 4, 2, 15, generator=g), ('direction_order_forward', 'direction_order_backward'))


def check_checkpointed():
    """Inside non-reentrant activation checkpointing (what ``with_cp`` uses) the backward
    unpacks its saved tensors once and gives the same gradients."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from mmseg_segman.ops.triton_cross_selective_scan import cross_selective_scan_triton
    inputs = make_inputs(1, 3, 4, 5, torch.float32)
    dy = torch.randn(1, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    plain = outputs_and_grads(cross_selective_scan_triton, inputs, dy)
    checkpointed = outputs_and_grads(
        lambda *t: checkpoint(cross_selective_scan_triton, *t, use_reentrant=False), inputs, dy)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    print('checkpointed: ok')


def check_dispatch_and_no_grad():
    """Under the interpreter on CPU the dispatcher picks triton (float32/16 inputs, N = 1),
    not for float64 or N = 2; without gradients the output is the same."""
    import torch

    from mmseg_segman.ops import cross_selective_scan
    from mmseg_segman.ops.selective_scan import _cross_selective_scan
    inputs = make_inputs(2, 3, 4, 5, torch.bfloat16)
    assert _cross_selective_scan.select(*inputs) == 'triton'
    assert _cross_selective_scan.select(*[t.double() for t in inputs]) == 'torch'
    assert _cross_selective_scan.select(*make_inputs(1, 2, 3, 3, torch.float32, state=2)) == 'torch'
    with_grad = cross_selective_scan(*[t.requires_grad_() for t in inputs])
    with torch.no_grad():
        torch.testing.assert_close(cross_selective_scan(*inputs), with_grad, rtol=0, atol=0)
    print('dispatch and no-grad: ok')


def check_custom_op():
    """The op registered with torch.library: schema, fake (meta) shapes, autograd, and the
    fake implementation under dynamic shapes (what torch.compile traces)."""
    import torch

    from mmseg_segman.ops.triton_cross_selective_scan import CROSS_SCAN
    cross_scan_forward, cross_scan_backward = CROSS_SCAN.forward_op, CROSS_SCAN.backward_op
    inputs = [t.requires_grad_() for t in make_inputs(1, 2, 3, 4, torch.float32)]
    for store_states in (True, False):
        torch.library.opcheck(cross_scan_forward, (*inputs, store_states, []))
    # states checkpointed, L a multiple of the backward's tile: with the blocks given, default
    for shape, blocks in (((1, 2, 4, 8), [2, 64, 4, 2, 16, 4]), ((1, 1, 16, 32), [])):
        inputs = [t.requires_grad_() for t in make_inputs(*shape, torch.float32)]
        torch.library.opcheck(cross_scan_forward, (*inputs, True, blocks))
    # the backward op on its own: its fake implementation's packed gradients against the real
    # ones, B and C of one dtype and of two
    for b_dtype in (torch.float32, torch.bfloat16):
        inputs = [t.detach() for t in make_inputs(1, 2, 4, 8, torch.float32)]
        inputs[4] = inputs[4].to(b_dtype)
        y, states = cross_scan_forward(*inputs, True, [])
        torch.library.opcheck(cross_scan_backward, (torch.randn_like(y), *inputs, states, []))
    print('custom op: ok')


def check_eager_path():
    """Eager calls skip the custom ops (host time) and match them bitwise; torch.compile
    traces the custom ops (see :func:`triton_interpreter.check_eager_calls_skip_custom_ops`)."""
    import torch
    from triton_interpreter import check_eager_calls_skip_custom_ops

    from mmseg_segman.ops.triton_cross_selective_scan import cross_selective_scan_triton
    from mmseg_segman.ops.triton_jit import records_autograd

    def custom_op(*inputs):  # storing the states where the backend would
        return torch.ops.mmseg_segman.cross_scan_forward(*inputs, records_autograd(*inputs), [])[0]

    inputs = make_inputs(1, 3, 4, 5, torch.float32, seed=4)
    dy = torch.randn(1, 3, 4, 5, generator=torch.Generator().manual_seed(4))
    check_eager_calls_skip_custom_ops(cross_selective_scan_triton, custom_op, inputs, dy,
                                      ('cross_scan_forward', 'cross_scan_backward'))
    print('eager path and torch.compile: ok', flush=True)


def main():
    import torch

    start = time.perf_counter()
    for shape in [(1, 3, 3, 5), (2, 4, 4, 4), (1, 5, 1, 7), (2, 8, 6, 3), (1, 3, 7, 1), (1, 2, 1, 1),
                  (2, 1, 3, 4)]:
        check(*shape, torch.float32, 1e-5)
    # (forward, backward) blocks: several channel blocks and sequence tiles, the last partial
    check(2, 3, 5, 7, torch.float32, 1e-5, blocks=((2, 16, 4), (2, 16, 4)))
    check(1, 3, 4, 5, torch.float32, 1e-5, blocks=((2, 16, 4), (2, 16, 4)), transform=strided_views)
    # bfloat16: the interpreter rounds the projected steps (float32 sums) to bfloat16 towards
    # zero, a GPU to the nearest: up to twice the error of the torch backend here (whose
    # products round to the nearest); check_ops.py compares them on the GPU
    check(2, 4, 4, 4, torch.bfloat16, BF16_TOL)
    check(1, 5, 6, 3, torch.bfloat16, BF16_TOL, blocks=((4, 16, 2), (2, 32, 4)))
    check(1, 3, 3, 5, torch.float16, 2e-3)
    # checkpointed states: forward tiles longer and shorter than the backward's, the length a
    # multiple of the backward tile (its last state not kept) or not, shorter than one tile
    check(2, 3, 5, 9, torch.float32, 1e-5, blocks=((2, 64, 4), (2, 16, 4)))
    check(1, 5, 9, 9, torch.float32, 1e-5, blocks=((2, 16, 4), (2, 32, 4)))
    check(1, 3, 4, 8, torch.float32, 1e-5, blocks=((4, 32, 4), (2, 16, 4)))
    check(1, 3, 5, 7, torch.float32, 1e-5, blocks=((2, 16, 4), (1, 64, 4)))
    # a length that is a multiple of 8 (16-byte loads: ALIGN 8), tiles of it and a partial one
    check(1, 3, 5, 8, torch.float32, 1e-5, blocks=((2, 16, 4), (2, 16, 4)))
    check(1, 3, 6, 7, torch.bfloat16, BF16_TOL, blocks=((2, 16, 4), (4, 16, 4)),
          transform=strided_views)
    check_stiff_decay()
    check_stiff_decay(blocks=((2, 16, 4), (2, 8, 4)))
    check_shared_partial_sum_rows()
    check_saved_states()
    check_merge()
    check_layouts_and_projection()
    check_direction_order()
    check_checkpointed()
    check_dispatch_and_no_grad()
    check_custom_op()
    check_eager_path()
    print(f'all checks passed in {time.perf_counter() - start:.1f} s')


if __name__ == '__main__':
    main()
