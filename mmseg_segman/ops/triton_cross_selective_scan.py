"""Triton backend of :func:`mmseg_segman.ops.selective_scan.cross_selective_scan` (N = 1).

Layout. The four scan directions are read in place from the map layout, with index
arithmetic only (no cross-scan copies): ``x (B, D, H, W)``, ``delta (B, 4, D, H, W)``,
``B``/``C (B, 4, 1, H, W)``, any strides. Scan step ``t`` of direction ``k`` is position
``s = t`` (``k < 2``) or ``s = H*W - 1 - t`` (``k >= 2``) of the row-major (``k`` even) or
column-major (``k`` odd) order of the map, i.e. pixel ``(s // W, s % W)`` or
``(s % H, s // H)``. ``A``, ``D``, ``delta_bias`` are ``(4*D,)``, direction-major.

Forward. One program owns ``BLOCK_D`` channels of one direction of one batch element
(grid ``cdiv(D, BLOCK_D) x 4 x B``) and walks the sequence in tiles of ``BLOCK_L`` steps.
``dt = softplus(delta + delta_bias)`` and ``a = exp(dt * A)`` are computed in registers;
inside a tile ``h_t = a_t h_{t-1} + dt_t B_t u_t`` is one ``tl.associative_scan`` over
``(a, b)`` pairs and the state is carried to the next tile. Everything is float32.

Merge. Each direction writes its ``y`` into its own slot of a float32 ``(B, 4, D, H, W)``
buffer at the pixel the step belongs to, and the four slots are summed in PyTorch. This is
deterministic (atomics into ``(B, D, H, W)`` would add the four terms in a run-dependent
order) and keeps all four directions in parallel; it costs one float32 buffer of four
outputs, freed after the sum. ``du`` in the backward pass is merged the same way.

Backward. When a gradient is needed the forward pass also stores ``h`` (float32, in scan
order, so that store is coalesced in every direction). The backward program walks the
tiles from the end, each read in reversed order, so the adjoint recurrence
``dh_t = C_t dy_t + a_{t+1} dh_{t+1}`` is again a forward ``tl.associative_scan`` (no
``reverse=True`` scan, whose results have been wrong on some Triton versions);
``a_{t+1}`` is recomputed from ``delta`` at the next step and ``h_{t-1}`` read back
(not ``h_t - b_t``, which cancels when ``a_t`` is small and would spoil ``dA``).
Then ``du``, ``ddelta`` (through softplus and bias), and per program: ``dB``, ``dC``
summed over the program's channels, ``dA``, ``dD``, ``d delta_bias`` summed over its steps.
These partial sums are reduced in PyTorch (over channel blocks, resp. the batch); again
no atomics. Gradients are returned in the inputs' dtypes.

``torch.compile`` traces the kernels as the ``torch.library`` custom ops
``mmseg_segman::cross_scan_forward`` and ``cross_scan_backward`` (with fake implementations
and autograd), while eager calls skip the custom-op layer, whose dispatch costs host time at
every call (:mod:`.triton_layer_norm`): they run the same functions in a plain
``torch.autograd.Function`` with the same saved tensors, or launch the forward directly (no
states stored) where autograd does not record.
"""
from typing import Callable, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_jit import cdiv, jit_with_runtime_ints, launch, next_power_of_2, records_autograd


# Sizes and the strides that follow them stay runtime values (one compilation for every map
# size); the innermost strides, 1 for any contiguous input, are left to Triton's specialisation.
_RUNTIME_INTS = {'channels', 'height', 'width',
                 *(f's{t}_{dim}' for t in 'xdbcy' for dim in 'bkch')}


@triton.jit
def _affine_combine(a_left, b_left, a_right, b_right):
    """Compose ``h -> a_left h + b_left`` then ``h -> a_right h + b_right``."""
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _softplus(z):
    """``log(1 + exp(z))``, linear above 20 as ``F.softplus``; accurate ``log1p`` for z < 0."""
    e = tl.exp(tl.minimum(z, 20.0))
    w = 1.0 + e
    rounded = w - 1.0  # e as 1 + e holds it; log(w) * e / rounded corrects log1p's rounding
    log1p = tl.where(rounded == 0.0, e, tl.log(w) * (e / tl.where(rounded == 0.0, 1.0, rounded)))
    return tl.where(z > 20.0, z, log1p)


@triton.jit
def _scan_tile(decay, drive, carry, BLOCK_L: tl.constexpr):
    """``h_t = decay_t h_{t-1} + drive_t`` along axis 1 of a ``(BLOCK_D, BLOCK_L)`` tile,
    starting from ``carry`` ``(BLOCK_D,)``; returns ``h`` and its last column (the next carry)."""
    decay_prod, h = tl.associative_scan((decay, drive), 1, _affine_combine)
    h += decay_prod * carry[:, None]
    last = tl.sum(tl.where(tl.arange(0, BLOCK_L)[None, :] == BLOCK_L - 1, h, 0.0), axis=1)
    return h, last


@triton.jit
def _load_channel_params(a_ptr, d_ptr, bias_ptr, index, mask):
    """``A``, ``D`` and ``delta_bias`` of a program's channels as float32 ``(BLOCK_D, 1)``."""
    A = tl.load(a_ptr + index, mask=mask, other=0.0).to(tl.float32)[:, None]
    D = tl.load(d_ptr + index, mask=mask, other=0.0).to(tl.float32)[:, None]
    bias = tl.load(bias_ptr + index, mask=mask, other=0.0).to(tl.float32)[:, None]
    return A, D, bias


@triton.jit
def _pixel(step, length, height, width, direction):
    """Row and column of scan step ``step`` (any shape) of ``direction`` in an ``H x W`` map."""
    pos = tl.where(direction >= 2, length - 1 - step, step)
    column_major = direction % 2 == 1
    inner = tl.where(column_major, height, width)
    outer_idx = pos // inner
    inner_idx = pos % inner
    return tl.where(column_major, inner_idx, outer_idx), tl.where(column_major, outer_idx, inner_idx)


@triton.jit
def _direction_program(x_ptr, delta_ptr, a_ptr, d_ptr, bias_ptr, b_ptr, c_ptr, channels, length,
                       sx_b, sx_c, sd_b, sd_k, sd_c, sb_b, sb_k, sc_b, sc_k, BLOCK_D: tl.constexpr):
    """The program's direction, batch element and channels, their parameters, the base
    pointers of its inputs and the offset of its rows in the ``(B, 4, D, L)`` buffers."""
    direction = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    ch = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    ch_ok = ch < channels
    A, D, bias = _load_channel_params(a_ptr, d_ptr, bias_ptr, direction * channels + ch, ch_ok)
    x_base = x_ptr + batch * sx_b + ch[:, None] * sx_c
    delta_base = delta_ptr + batch * sd_b + direction * sd_k + ch[:, None] * sd_c
    b_base = b_ptr + batch * sb_b + direction * sb_k
    c_base = c_ptr + batch * sc_b + direction * sc_k
    row_base = ((batch * 4 + direction) * channels + ch[:, None]) * length
    return direction, batch, ch, ch_ok, A, D, bias, x_base, delta_base, b_base, c_base, row_base


@jit_with_runtime_ints(_RUNTIME_INTS)
def _cross_scan_fwd_kernel(
        x_ptr, delta_ptr, a_ptr, d_ptr, bias_ptr, b_ptr, c_ptr, y_ptr, h_ptr,
        channels, height, width,
        sx_b, sx_c, sx_h, sx_w, sd_b, sd_k, sd_c, sd_h, sd_w,
        sb_b, sb_k, sb_h, sb_w, sc_b, sc_k, sc_h, sc_w,
        STORE_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    length = height * width
    direction, batch, ch, ch_ok, A, D, bias, x_base, delta_base, b_base, c_base, row_base = \
        _direction_program(x_ptr, delta_ptr, a_ptr, d_ptr, bias_ptr, b_ptr, c_ptr, channels, length,
                           sx_b, sx_c, sd_b, sd_k, sd_c, sb_b, sb_k, sc_b, sc_k, BLOCK_D)
    steps = tl.arange(0, BLOCK_L)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, length, BLOCK_L):
        t = start + steps
        t_ok = t < length
        ok = ch_ok[:, None] & t_ok[None, :]
        i, j = _pixel(t, length, height, width, direction)
        u = tl.load(x_base + (i * sx_h + j * sx_w)[None, :], mask=ok, other=0.0).to(tl.float32)
        z = tl.load(delta_base + (i * sd_h + j * sd_w)[None, :], mask=ok, other=0.0).to(tl.float32)
        Bt = tl.load(b_base + i * sb_h + j * sb_w, mask=t_ok, other=0.0).to(tl.float32)[None, :]
        Ct = tl.load(c_base + i * sc_h + j * sc_w, mask=t_ok, other=0.0).to(tl.float32)[None, :]
        dt = _softplus(z + bias)
        decay = tl.where(ok, tl.exp(dt * A), 1.0)
        h, carry = _scan_tile(decay, dt * Bt * u, carry, BLOCK_L)
        tl.store(y_ptr + row_base + (i * width + j)[None, :], Ct * h + D * u, mask=ok)
        if STORE_H:
            tl.store(h_ptr + row_base + t[None, :], h, mask=ok)


@jit_with_runtime_ints(_RUNTIME_INTS)
def _cross_scan_bwd_kernel(
        x_ptr, delta_ptr, a_ptr, d_ptr, bias_ptr, b_ptr, c_ptr, h_ptr, dy_ptr,
        du_ptr, ddelta_ptr, db_ptr, dc_ptr, da_ptr, dd_ptr, dbias_ptr,
        channels, height, width,
        sx_b, sx_c, sx_h, sx_w, sd_b, sd_k, sd_c, sd_h, sd_w,
        sb_b, sb_k, sb_h, sb_w, sc_b, sc_k, sc_h, sc_w, sy_b, sy_c, sy_h, sy_w,
        BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    length = height * width
    direction, batch, ch, ch_ok, A, D, bias, x_base, delta_base, b_base, c_base, row_base = \
        _direction_program(x_ptr, delta_ptr, a_ptr, d_ptr, bias_ptr, b_ptr, c_ptr, channels, length,
                           sx_b, sx_c, sd_b, sd_k, sd_c, sb_b, sb_k, sc_b, sc_k, BLOCK_D)
    dy_base = dy_ptr + batch * sy_b + ch[:, None] * sy_c
    bc_base = ((batch * 4 + direction) * tl.num_programs(0) + tl.program_id(0)) * length  # dB, dC partials
    steps = tl.arange(0, BLOCK_L)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    dA = tl.zeros([BLOCK_D], dtype=tl.float32)
    dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    num_tiles = tl.cdiv(length, BLOCK_L)
    for tile in range(0, num_tiles):
        t = (num_tiles - tile) * BLOCK_L - 1 - steps  # the tile, last step first
        t_ok = t < length
        ok = ch_ok[:, None] & t_ok[None, :]
        i, j = _pixel(t, length, height, width, direction)
        u = tl.load(x_base + (i * sx_h + j * sx_w)[None, :], mask=ok, other=0.0).to(tl.float32)
        z = tl.load(delta_base + (i * sd_h + j * sd_w)[None, :], mask=ok, other=0.0).to(tl.float32)
        z += bias
        Bt = tl.load(b_base + i * sb_h + j * sb_w, mask=t_ok, other=0.0).to(tl.float32)[None, :]
        Ct = tl.load(c_base + i * sc_h + j * sc_w, mask=t_ok, other=0.0).to(tl.float32)[None, :]
        dy = tl.load(dy_base + (i * sy_h + j * sy_w)[None, :], mask=ok, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + row_base + t[None, :], mask=ok, other=0.0)
        h_prev = tl.load(h_ptr + row_base + t[None, :] - 1, mask=ok & (t >= 1)[None, :], other=0.0)
        # a_{t+1}, zero past the end
        next_ok = ch_ok[:, None] & (t + 1 < length)[None, :]
        i1, j1 = _pixel(t + 1, length, height, width, direction)
        z1 = tl.load(delta_base + (i1 * sd_h + j1 * sd_w)[None, :], mask=next_ok, other=0.0)
        decay_next = tl.where(next_ok, tl.exp(_softplus(z1.to(tl.float32) + bias) * A), 0.0)

        dh, carry = _scan_tile(decay_next, Ct * dy, carry, BLOCK_L)

        dt = _softplus(z)
        decayed_prev = tl.exp(dt * A) * h_prev
        dz = tl.where(ok, dh * (Bt * u + A * decayed_prev) * tl.sigmoid(z), 0.0)
        pixel = (i * width + j)[None, :]
        tl.store(du_ptr + row_base + pixel, dh * dt * Bt + D * dy, mask=ok)
        tl.store(ddelta_ptr + row_base + pixel, dz, mask=ok)
        tl.store(db_ptr + bc_base + i * width + j, tl.sum(dh * dt * u, axis=0), mask=t_ok)
        tl.store(dc_ptr + bc_base + i * width + j, tl.sum(dy * h, axis=0), mask=t_ok)
        dA += tl.sum(dh * decayed_prev * dt, axis=1)
        dD += tl.sum(dy * u, axis=1)
        dbias += tl.sum(dz, axis=1)
    out = (batch * 4 + direction) * channels + ch
    tl.store(da_ptr + out, dA, mask=ch_ok)
    tl.store(dd_ptr + out, dD, mask=ch_ok)
    tl.store(dbias_ptr + out, dbias, mask=ch_ok)


Blocks = Tuple[int, int, int]  # (BLOCK_D, BLOCK_L, num_warps)


def block_sizes(channels: int, length: int, backward: bool = False) -> Blocks:
    """Default ``(BLOCK_D, BLOCK_L, num_warps)`` of the forward or the backward kernel.

    Chosen by ``tools/gpu_checks/check_cross_selective_scan.py --sweep`` on an H100 (bfloat16,
    SegMAN's stage sizes at 512x512, see docs/benchmarks.md): long tiles pay off since each
    program walks its sequence one tile after another; the forward runs best with few
    channels a program on long maps, the backward with 8 warps.
    """
    tile = max(16, next_power_of_2(length))
    if backward:
        return 4, min(tile, 512 if length >= 4096 else 256), 8
    if length >= 8192:
        return 2, min(tile, 512), 4
    return (8 if length <= 256 else 4), min(tile, 256), 4


def _strides(x: Tensor, delta: Tensor, B: Tensor, C: Tensor) -> Tuple[int, ...]:
    """The kernels' stride arguments: all of x and delta, B and C without the state dim."""
    return (*x.stride(), *delta.stride(), *(s for t in (B, C) for i, s in enumerate(t.stride()) if i != 2))


def _flat(*params: Tensor) -> Tuple[Tensor, ...]:
    """``A (4*D, 1)``, ``D``, ``delta_bias`` as contiguous ``(4*D,)`` vectors."""
    return tuple(t.reshape(-1).contiguous() for t in params)


def _blocks(x: Tensor, blocks: List[int], backward: bool) -> Blocks:
    """``blocks`` as given, or the default of ``x``'s map size when empty (chosen inside the
    ops, so that compiled graphs do not depend on the map size through their arguments)."""
    if blocks:
        return tuple(blocks)
    return block_sizes(x.shape[1], x.shape[2] * x.shape[3], backward)


def _float32(*shape: int, like: Tensor) -> Tensor:
    return torch.empty(*shape, device=like.device, dtype=torch.float32)


def _cross_scan_forward_impl(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Tensor, delta_bias: Tensor, store_states: bool,
                             blocks: List[int]) -> Tuple[Tensor, Tensor]:
    """``y (B, D, H, W)`` float32 and, if ``store_states``, the states ``h (B, 4, D, H*W)``
    float32 in scan order for the backward pass (else an empty tensor). ``blocks``: the
    forward's then the backward's ``(BLOCK_D, BLOCK_L, num_warps)``, or empty (defaults)."""
    batch, channels, height, width = x.shape
    ys = _float32(batch, 4, channels, height, width, like=x)
    h = _float32(batch, 4, channels, height * width if store_states else 0, like=x)
    block_d, block_l, warps = _blocks(x, blocks[:3], backward=False)
    launch(_cross_scan_fwd_kernel, (cdiv(channels, block_d), 4, batch),
           x, delta, *_flat(A, D, delta_bias), B, C, ys, h if store_states else ys, channels,
           height, width, *_strides(x, delta, B, C), STORE_H=store_states, BLOCK_D=block_d,
           BLOCK_L=block_l, num_warps=warps)
    return ys.sum(1), h


@torch.library.custom_op('mmseg_segman::cross_scan_forward', mutates_args=())
def cross_scan_forward(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                       delta_bias: Tensor, store_states: bool,
                       blocks: List[int]) -> Tuple[Tensor, Tensor]:
    """:func:`_cross_scan_forward_impl` as an op that ``torch.compile`` traces."""
    return _cross_scan_forward_impl(x, delta, A, B, C, D, delta_bias, store_states, blocks)


@cross_scan_forward.register_fake
def _(x, delta, A, B, C, D, delta_bias, store_states, blocks):
    batch, channels, height, width = x.shape
    return (_float32(batch, channels, height, width, like=x),
            _float32(batch, 4, channels, height * width if store_states else 0, like=x))


Gradients = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]  # of x .. delta_bias


def _cross_scan_backward_impl(dy: Tensor, x: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                              C: Tensor, D: Tensor, delta_bias: Tensor, h: Tensor,
                              blocks: List[int]) -> Gradients:
    """The gradients of ``x, delta, A, B, C, D, delta_bias``, in their shapes and dtypes."""
    inputs = x, delta, A, B, C, D, delta_bias
    block_d, block_l, warps = _blocks(x, blocks, backward=True)
    batch, channels, height, width = x.shape
    grid = (cdiv(channels, block_d), 4, batch)
    du = _float32(batch, 4, channels, height, width, like=x)
    ddelta = torch.empty_like(du)
    dB, dC = (_float32(batch, 4, grid[0], height, width, like=x) for _ in range(2))
    dA, dD, dbias = (_float32(batch, 4 * channels, like=x) for _ in range(3))
    launch(_cross_scan_bwd_kernel, grid, x, delta, *_flat(A, D, delta_bias), B, C, h, dy,
           du, ddelta, dB, dC, dA, dD, dbias,
           channels, height, width, *_strides(x, delta, B, C), *dy.stride(),
           BLOCK_D=block_d, BLOCK_L=block_l, num_warps=warps)
    grads = (du.sum(1), ddelta, dA.sum(0), dB.sum(2, keepdim=True), dC.sum(2, keepdim=True),
             dD.sum(0), dbias.sum(0))
    return tuple(g.view(t.shape).to(t.dtype) for g, t in zip(grads, inputs))


@torch.library.custom_op('mmseg_segman::cross_scan_backward', mutates_args=())
def cross_scan_backward(dy: Tensor, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        D: Tensor, delta_bias: Tensor, h: Tensor, blocks: List[int]) -> Gradients:
    """:func:`_cross_scan_backward_impl` as an op that ``torch.compile`` traces."""
    return _cross_scan_backward_impl(dy, x, delta, A, B, C, D, delta_bias, h, blocks)


@cross_scan_backward.register_fake
def _(dy, x, delta, A, B, C, D, delta_bias, h, blocks):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (x, delta, A, B, C, D, delta_bias))


def _setup_context(ctx, inputs, output):
    """What the backward needs, for the custom op and :class:`_CrossSelectiveScan` alike."""
    *tensors, store_states, blocks = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*tensors, output[1])
    ctx.store_states, ctx.blocks = store_states, blocks


def _backward_through(forward: Callable, backward: Callable) -> Callable:
    """The autograd backward that recomputes states with ``forward`` and computes the
    gradients with ``backward``: the custom ops (under ``torch.compile``) or
    :func:`_cross_scan_forward_impl` and :func:`_cross_scan_backward_impl` (eager)."""

    def gradients(ctx, dy, grad_h):
        # saved_tensors is unpacked once: checkpointing (with_cp) forbids a second unpack
        *inputs, h = ctx.saved_tensors
        if not ctx.store_states:  # a forward that did not expect a backward: states recomputed
            h = forward(*inputs, True, ctx.blocks)[1]
        grads = backward(dy, *inputs, h, ctx.blocks[3:])
        return (*(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad)),
                None, None)

    return gradients


cross_scan_forward.register_autograd(_backward_through(cross_scan_forward, cross_scan_backward),
                                     setup_context=_setup_context)


class _CrossSelectiveScan(torch.autograd.Function):
    """The custom op's autograd without its dispatch, for eager calls."""
    forward = staticmethod(_cross_scan_forward_impl)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward_through(_cross_scan_forward_impl, _cross_scan_backward_impl))


def cross_selective_scan_triton(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                D: Tensor, delta_bias: Tensor, fwd_blocks: Optional[Blocks] = None,
                                bwd_blocks: Optional[Blocks] = None) -> Tensor:
    """The SS2D scan (state size 1) as fused Triton kernels; see the module doc.

    Args:
        x: ``(B, D, H, W)``; delta: ``(B, 4, D, H, W)``; A: ``(4*D, 1)``;
            B, C: ``(B, 4, 1, H, W)``; D, delta_bias: ``(4*D,)``.
        fwd_blocks, bwd_blocks: ``(BLOCK_D, BLOCK_L, num_warps)`` of the forward and the
            backward kernel (block sizes powers of two); default :func:`block_sizes` of the
            map's size.

    Returns:
        ``(B, D, H, W)`` float32. Under ``torch.compile`` the custom op
        :func:`cross_scan_forward` runs; eagerly the kernels are launched through
        :class:`_CrossSelectiveScan`, or directly without autograd recording (inference).
    """
    inputs = (x, delta, A, B, C, D, delta_bias)
    store_states = records_autograd(*inputs)
    blocks = []
    if fwd_blocks is not None or bwd_blocks is not None:
        blocks = [*(fwd_blocks or _blocks(x, [], backward=False)),
                  *(bwd_blocks or _blocks(x, [], backward=True))]
    if torch.compiler.is_compiling():
        return cross_scan_forward(*inputs, store_states, blocks)[0]
    if store_states:
        return _CrossSelectiveScan.apply(*inputs, store_states, blocks)[0]
    return _cross_scan_forward_impl(*inputs, store_states, blocks)[0]
