"""Triton backend of :func:`mmseg_segman.ops.selective_scan.cross_selective_scan` (N = 1).

Layout. The per-direction inputs ``delta (B, 4, D, L)`` and ``B``/``C (B, 4, 1, L)`` come in
direction order (:mod:`.cross_scan`: row-major for directions 0 and 2, column-major for 1 and
3), contiguous along ``L``; ``delta`` is computed from its low-rank form (one kernel,
:func:`_project_steps_kernel`) before each kernel that reads it, and dropped after,
so the backward pass does not keep it (it would be the largest saved tensor after the
states: ``D / R = 16`` times ``dt_low``). ``x (B, D, H, W)`` is copied once into both orders,
``(B, 2, D, L)`` (one kernel, :func:`_both_orders_kernel`). Scan step ``t`` of direction
``k`` is position ``t`` (``k < 2``) or ``L - 1 - t`` (``k >= 2``) of its sequences. Every
tile is read and written in ascending positions, 16 bytes a thread where ``L`` and the
strides are multiples of 8 (``ALIGN``, :func:`~.triton_jit.aligned`; descending positions
were one element a thread), and the reversed directions scan their tiles backwards
(``tl.associative_scan(..., reverse=True)``, checked on the GPU). (Reading the
column-major directions straight from the map, as this backend first did, gathered one
element a 32-byte sector: 2.1x the time of the row-major directions at SegMAN-L's stage 1.)
``A``, ``D``, ``delta_bias`` are ``(4*D,)``, direction-major.

Forward. One program owns ``BLOCK_D`` channels of one direction of one batch element
(grid ``cdiv(D, BLOCK_D) x 4 x B``) and walks the sequence in tiles of ``BLOCK_L`` steps.
``dt = softplus(delta + delta_bias)`` and ``a = exp(dt * A)`` are computed in registers;
inside a tile ``h_t = a_t h_{t-1} + dt_t B_t u_t`` is one ``tl.associative_scan`` over
``(a, b)`` pairs and the state is carried to the next tile (the reversed directions' tiles
from the sequence's end). Everything is float32.

Merge. Each direction writes its ``y`` into its own slot of a float32 ``(B, 4, D, L)``
buffer in direction order, and one more kernel sums the four slots at each pixel (the
column-major ones read as transposed tiles) into the output's dtype. This is deterministic
(atomics would add the four terms in a run-dependent order) and keeps all four directions in
parallel; it costs one float32 buffer of four outputs, freed after the merge. ``du`` in the
backward pass is merged the same way, and ``dy`` is read from both orders like ``x``.

Backward. When a gradient is needed the forward pass also keeps checkpoints of the state:
``h_t`` at the end of every backward tile but the last (every ``CKPT`` steps, ``CKPT`` the
backward's ``BLOCK_L``, whatever the forward's), float32 ``(B, 4, D, (L - 1) // CKPT)`` in
scan order, ``1/CKPT`` of the memory of all the states (1/256 at the default blocks; these
were SegMAN-L's largest saved activation at batch 8, about 2.7 GiB). The backward program
walks the tiles from the last in scan order to the first, each in ascending positions; the
adjoint recurrence ``dh_t = C_t dy_t + a_{t+1} dh_{t+1}`` runs against the scan's steps
(``reverse=True`` for directions 0 and 1); ``a_{t+1}`` is recomputed from ``delta`` at the
next step's position. The tile's states are recomputed from the checkpoint before it: its
inputs are read again one step back (one position off, mostly from cache) and scanned from
the checkpoint as in the forward pass, giving ``h_{t-1}`` at every position; then
``h_t = a_t h_{t-1} + b_t`` (``h_{t-1}`` is never derived from ``h_t - b_t``, which cancels
when ``a_t`` is small and would spoil ``dA``). This costs the backward a second scan and
one more softplus and exp an element. Then ``du``, ``ddelta`` (through softplus and bias),
and per program: ``dB``, ``dC`` summed over the program's channels, ``dA``, ``dD``,
``d delta_bias`` summed over its steps (kept per step and summed once, after the last tile).
These partial sums are reduced in PyTorch (over channel blocks, resp. the batch). Where
there are many channel blocks, they add ``dB`` and ``dC`` into :data:`BC_ROWS` rows by
atomics, which PyTorch then sums (:func:`~.triton_jit.partial_sum_rows`: one row a block,
stored, under ``torch.use_deterministic_algorithms``); ``ddelta`` goes back through the step
projection in one more kernel, in float32 (:func:`_project_steps_bwd_kernel`). Gradients are
returned in the inputs' dtypes and layouts.

``torch.compile`` traces the kernels as the ``torch.library`` custom ops
``mmseg_segman::cross_scan_forward`` and ``cross_scan_backward`` (:data:`CROSS_SCAN`, a
:class:`~.triton_jit.TritonAutogradOp`); eager calls run the same functions in a plain
``torch.autograd.Function``, or launch the forward directly (no states stored) where autograd
does not record.
"""
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import cast, with_contiguous_planes
from .triton_jit import (TritonAutogradOp, aligned, alignment, cdiv, dot_precision,
                         empty_partial_sums, jit_with_runtime_ints, launch, next_power_of_2,
                         partial_sum_rows, records_autograd)


# Sizes and the strides that follow them stay runtime values (one compilation for every map
# size whose sizes are multiples of 8, one more for the others: ALIGN, triton_jit.aligned);
# the sequences' own stride is 1.
_RUNTIME_INTS = {'channels', 'length', 'height', 'width', 'rank', 'per_split', 'bc_rows',
                 *(f's{t}_{dim}' for t in 'xdbcy' for dim in 'bkc'), 'sl_b', 'sl_k', 'sl_r'}


@triton.jit
def _affine_combine(a_left, b_left, a_right, b_right):
    """Compose ``h -> a_left h + b_left`` then ``h -> a_right h + b_right``."""
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _softplus_and_sigmoid(z):
    """``log(1 + exp(z))``, linear above 20 as ``F.softplus`` (accurate ``log1p`` for z < 0),
    and its derivative ``sigmoid(z)``, from one ``exp``."""
    e = tl.exp(tl.minimum(z, 20.0))
    w = 1.0 + e
    rounded = w - 1.0  # e as 1 + e holds it; log(w) * e / rounded corrects log1p's rounding
    log1p = tl.where(rounded == 0.0, e, tl.log(w) * (e / tl.where(rounded == 0.0, 1.0, rounded)))
    # e / (1 + e) is 1 in float32 from z = 17 (exp(-17) is under half an ulp of 1)
    return tl.where(z > 20.0, z, log1p), tl.where(z > 20.0, 1.0, e / w)


@triton.jit
def _softplus(z):
    """``log(1 + exp(z))`` (:func:`_softplus_and_sigmoid`)."""
    return _softplus_and_sigmoid(z)[0]


@triton.jit
def _scan_tile(decay, drive, carry, BLOCK_L: tl.constexpr, REVERSE: tl.constexpr = False):
    """``h_t = decay_t h_{t-1} + drive_t`` along axis 1 of a ``(BLOCK_D, BLOCK_L)`` tile,
    starting from ``carry`` ``(BLOCK_D,)``; returns ``h`` and its last column (the next carry).
    With ``REVERSE`` the steps run from the tile's last column to its first (which is then
    the next carry)."""
    decay_prod, h = tl.associative_scan((decay, drive), 1, _affine_combine, reverse=REVERSE)
    h += decay_prod * carry[:, None]
    end = 0 if REVERSE else BLOCK_L - 1
    last = tl.sum(tl.where(tl.arange(0, BLOCK_L)[None, :] == end, h, 0.0), axis=1)
    return h, last


@triton.jit
def _load_channel_params(a_ptr, d_ptr, bias_ptr, index, mask):
    """``A``, ``D`` and ``delta_bias`` of a program's channels as float32 ``(BLOCK_D, 1)``."""
    A = tl.load(a_ptr + index, mask=mask, other=0.0).to(tl.float32)[:, None]
    D = tl.load(d_ptr + index, mask=mask, other=0.0).to(tl.float32)[:, None]
    bias = tl.load(bias_ptr + index, mask=mask, other=0.0).to(tl.float32)[:, None]
    return A, D, bias


@triton.jit
def _direction_program(xs_ptr, delta_ptr, a_ptr, d_ptr, bias_ptr, b_ptr, c_ptr, channels, length,
                       sx_b, sx_k, sx_c, sd_b, sd_k, sd_c, sb_b, sb_k, sc_b, sc_k,
                       BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    """The program's direction, batch element and channels, their parameters, the base
    pointers of its sequences (``x`` in the direction's order) and the index of its rows
    ``(BLOCK_D,)`` in the ``(B, 4, D, .)`` buffers. The strides are multiples of ``ALIGN``."""
    sx_b, sx_k, sx_c = aligned(sx_b, ALIGN), aligned(sx_k, ALIGN), aligned(sx_c, ALIGN)
    sd_b, sd_k, sd_c = aligned(sd_b, ALIGN), aligned(sd_k, ALIGN), aligned(sd_c, ALIGN)
    sb_b, sb_k = aligned(sb_b, ALIGN), aligned(sb_k, ALIGN)
    sc_b, sc_k = aligned(sc_b, ALIGN), aligned(sc_k, ALIGN)
    direction = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    ch = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    ch_ok = ch < channels
    A, D, bias = _load_channel_params(a_ptr, d_ptr, bias_ptr, direction * channels + ch, ch_ok)
    x_base = xs_ptr + batch * sx_b + (direction % 2) * sx_k + ch[:, None] * sx_c
    delta_base = delta_ptr + batch * sd_b + direction * sd_k + ch[:, None] * sd_c
    b_base = b_ptr + batch * sb_b + direction * sb_k
    c_base = c_ptr + batch * sc_b + direction * sc_k
    rows = (batch * 4 + direction) * channels + ch
    return direction, batch, ch, ch_ok, A, D, bias, x_base, delta_base, b_base, c_base, rows


@triton.jit
def _tile_inputs(x_base, delta_base, b_base, c_base, ch_ok, index, length,
                 BLOCK_L: tl.constexpr, REVERSE: tl.constexpr):
    """Scan tile ``index`` of a program: its ``BLOCK_L`` positions in ascending order
    (contiguous in memory; with ``REVERSE``, directions 2 and 3, counted from the sequence's
    end), their flags ``(BLOCK_L,)`` and ``(BLOCK_D, BLOCK_L)``, and ``x``, ``delta``, ``B``,
    ``C`` there as float32."""
    first = length - (index + 1) * BLOCK_L if REVERSE else index * BLOCK_L
    pos = first + tl.arange(0, BLOCK_L)
    pos_ok = (pos >= 0) & (pos < length)
    ok = ch_ok[:, None] & pos_ok[None, :]
    u = tl.load(x_base + pos[None, :], mask=ok, other=0.0).to(tl.float32)
    z = tl.load(delta_base + pos[None, :], mask=ok, other=0.0).to(tl.float32)
    Bt = tl.load(b_base + pos, mask=pos_ok, other=0.0).to(tl.float32)[None, :]
    Ct = tl.load(c_base + pos, mask=pos_ok, other=0.0).to(tl.float32)[None, :]
    return pos, pos_ok, ok, u, z, Bt, Ct


@triton.jit
def _forward_tile(x_base, delta_base, b_base, c_base, y_ptr, row_base, ckpt_base, A, D, bias,
                  ch_ok, carry, tile, length, STORE_CKPT: tl.constexpr,
                  CKPT: tl.constexpr, BLOCK_L: tl.constexpr, REVERSE: tl.constexpr):
    """Scan tile ``tile`` of a program (see :func:`_cross_scan_fwd_kernel`, :func:`_tile_inputs`),
    the tile's steps running along its positions, or, with ``REVERSE``, against them. Stores
    ``y`` (and the checkpoints among its steps); returns the next carry."""
    pos, pos_ok, ok, u, z, Bt, Ct = _tile_inputs(x_base, delta_base, b_base, c_base, ch_ok, tile,
                                                 length, BLOCK_L, REVERSE)
    dt = _softplus(z + bias)
    decay = tl.where(ok, tl.exp(dt * A), 1.0)
    h, carry = _scan_tile(decay, dt * Bt * u, carry, BLOCK_L, REVERSE)
    tl.store(y_ptr + row_base + pos[None, :], Ct * h + D * u, mask=ok)
    if STORE_CKPT:
        t = length - 1 - pos if REVERSE else pos  # the scan step of each position
        at_ckpt = ((t + 1) % CKPT == 0) & (t + 1 < length)
        tl.store(ckpt_base + ((t + 1) // CKPT - 1)[None, :], h,
                 mask=ch_ok[:, None] & (pos_ok & at_ckpt)[None, :])
    return carry


@jit_with_runtime_ints(_RUNTIME_INTS)
def _cross_scan_fwd_kernel(
        xs_ptr, delta_ptr, a_ptr, d_ptr, bias_ptr, b_ptr, c_ptr, y_ptr, ckpt_ptr, channels, length,
        sx_b, sx_k, sx_c, sd_b, sd_k, sd_c, sb_b, sb_k, sc_b, sc_k,
        STORE_CKPT: tl.constexpr, CKPT: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_L: tl.constexpr, ALIGN: tl.constexpr):
    """``y`` and, if ``STORE_CKPT``, the checkpoints ``ckpt[.., k] = h_{(k + 1) CKPT - 1}``,
    ``k < (length - 1) // CKPT``: the state at the end of every backward tile but the last.
    Every tile is read and written in ascending positions, so that its loads and stores move
    16 bytes a thread where ``length`` and the strides are multiples of ``ALIGN = 8`` (the
    reversed directions scan their tiles backwards, ``reverse=True``)."""
    length = aligned(length, ALIGN)
    direction, batch, ch, ch_ok, A, D, bias, x_base, delta_base, b_base, c_base, rows = \
        _direction_program(xs_ptr, delta_ptr, a_ptr, d_ptr, bias_ptr, b_ptr, c_ptr, channels, length,
                           sx_b, sx_k, sx_c, sd_b, sd_k, sd_c, sb_b, sb_k, sc_b, sc_k, BLOCK_D, ALIGN)
    row_base = rows[:, None] * length
    ckpt_base = ckpt_ptr + rows[:, None] * ((length - 1) // CKPT)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    if direction >= 2:
        for tile in range(0, tl.cdiv(length, BLOCK_L)):
            carry = _forward_tile(x_base, delta_base, b_base, c_base, y_ptr, row_base, ckpt_base,
                                  A, D, bias, ch_ok, carry, tile, length, STORE_CKPT,
                                  CKPT, BLOCK_L, True)
    else:
        for tile in range(0, tl.cdiv(length, BLOCK_L)):
            carry = _forward_tile(x_base, delta_base, b_base, c_base, y_ptr, row_base, ckpt_base,
                                  A, D, bias, ch_ok, carry, tile, length, STORE_CKPT,
                                  CKPT, BLOCK_L, False)


@triton.jit
def _backward_tile(x_base, delta_base, b_base, c_base, dy_base, ckpt_base, du_ptr, ddelta_ptr,
                   db_ptr, dc_ptr, row_base, bc_base, A, D, bias, ch_ok, carry, dA, dD, dbias,
                   index, length, BLOCK_L: tl.constexpr, REVERSE: tl.constexpr,
                   ATOMIC_BC: tl.constexpr):
    """Tile ``index`` (in scan order) of a backward program (see
    :func:`_cross_scan_bwd_kernel`, :func:`_tile_inputs`).
    The scan steps run along the positions, or against them with ``REVERSE``; the step
    before a position's is at ``pos - STEP`` and the one after at ``pos + STEP``. Stores
    ``du``, ``ddelta`` and the tile's partial sums of ``dB``, ``dC`` (added into their rows
    with ``ATOMIC_BC``); returns the adjoint's
    carry and the running sums of ``dA``, ``dD``, ``d delta_bias`` (``(BLOCK_D, BLOCK_L)``,
    summed over the steps after the last tile)."""
    STEP: tl.constexpr = -1 if REVERSE else 1
    pos, pos_ok, ok, u, z, Bt, Ct = _tile_inputs(x_base, delta_base, b_base, c_base, ch_ok, index,
                                                 length, BLOCK_L, REVERSE)
    z += bias
    dy = tl.load(dy_base + pos[None, :], mask=ok, other=0.0).to(tl.float32)
    # h_{t-1}: the steps before the tile's, scanned from the checkpoint before the tile (the
    # state at its first step - 1; zero for the first tile); the tile's first step has none
    prev = pos - STEP
    first_step = BLOCK_L - 1 if REVERSE else 0
    prev_ok = (tl.arange(0, BLOCK_L) != first_step) & (prev >= 0) & (prev < length)
    prev_tile_ok = ch_ok[:, None] & prev_ok[None, :]
    u_prev = tl.load(x_base + prev[None, :], mask=prev_tile_ok, other=0.0).to(tl.float32)
    z_prev = tl.load(delta_base + prev[None, :], mask=prev_tile_ok, other=0.0).to(tl.float32)
    B_prev = tl.load(b_base + prev, mask=prev_ok, other=0.0).to(tl.float32)[None, :]
    dt_prev = _softplus(z_prev + bias)
    ckpt = tl.load(ckpt_base + index - 1, mask=ch_ok & (index > 0), other=0.0)
    h_prev, _ = _scan_tile(tl.where(prev_tile_ok, tl.exp(dt_prev * A), 1.0),
                           dt_prev * B_prev * u_prev, ckpt, BLOCK_L, REVERSE)
    # a_{t+1}, zero past the end; the adjoint dh_t = C_t dy_t + a_{t+1} dh_{t+1} runs
    # against the scan's steps
    after = pos + STEP
    after_ok = ch_ok[:, None] & ((after >= 0) & (after < length))[None, :]
    z1 = tl.load(delta_base + after[None, :], mask=after_ok, other=0.0).to(tl.float32)
    decay_next = tl.where(after_ok, tl.exp(_softplus(z1 + bias) * A), 0.0)
    dh, carry = _scan_tile(decay_next, Ct * dy, carry, BLOCK_L, not REVERSE)
    dt, sigmoid = _softplus_and_sigmoid(z)
    decayed_prev = tl.exp(dt * A) * h_prev
    h = decayed_prev + dt * Bt * u
    dz = tl.where(ok, dh * (Bt * u + A * decayed_prev) * sigmoid, 0.0)
    tl.store(du_ptr + row_base + pos[None, :], dh * dt * Bt + D * dy, mask=ok)
    tl.store(ddelta_ptr + row_base + pos[None, :], dz, mask=ok)
    if ATOMIC_BC:
        tl.atomic_add(db_ptr + bc_base + pos, tl.sum(dh * dt * u, axis=0), mask=pos_ok,
                      sem='relaxed')
        tl.atomic_add(dc_ptr + bc_base + pos, tl.sum(dy * h, axis=0), mask=pos_ok,
                      sem='relaxed')
    else:
        tl.store(db_ptr + bc_base + pos, tl.sum(dh * dt * u, axis=0), mask=pos_ok)
        tl.store(dc_ptr + bc_base + pos, tl.sum(dy * h, axis=0), mask=pos_ok)
    # summed over the steps once, after the last tile (a reduction across the program a tile)
    dA += dh * decayed_prev * dt
    dD += dy * u
    dbias += dz
    return carry, dA, dD, dbias


@jit_with_runtime_ints(_RUNTIME_INTS)
def _cross_scan_bwd_kernel(
        xs_ptr, delta_ptr, a_ptr, d_ptr, bias_ptr, b_ptr, c_ptr, ckpt_ptr, dys_ptr,
        du_ptr, ddelta_ptr, db_ptr, dc_ptr, da_ptr, dd_ptr, dbias_ptr, channels, length,
        bc_rows, sx_b, sx_k, sx_c, sd_b, sd_k, sd_c, sb_b, sb_k, sc_b, sc_k, sy_b, sy_k, sy_c,
        BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, ALIGN: tl.constexpr,
        ATOMIC_BC: tl.constexpr):
    """The tiles from the last in scan order to the first (:func:`_backward_tile`), read and
    written in ascending positions as the forward's; ``length`` and the strides are
    multiples of ``ALIGN``. Channel block ``i`` writes its partial sums of ``dB`` and ``dC``
    into row ``i % bc_rows`` of its batch element's and direction's ``bc_rows``; with
    ``ATOMIC_BC`` the blocks that share a row add into it (zeroed before)."""
    length = aligned(length, ALIGN)
    sy_b, sy_k, sy_c = aligned(sy_b, ALIGN), aligned(sy_k, ALIGN), aligned(sy_c, ALIGN)
    direction, batch, ch, ch_ok, A, D, bias, x_base, delta_base, b_base, c_base, rows = \
        _direction_program(xs_ptr, delta_ptr, a_ptr, d_ptr, bias_ptr, b_ptr, c_ptr, channels, length,
                           sx_b, sx_k, sx_c, sd_b, sd_k, sd_c, sb_b, sb_k, sc_b, sc_k, BLOCK_D, ALIGN)
    row_base = rows[:, None] * length
    ckpt_base = ckpt_ptr + rows * ((length - 1) // BLOCK_L)
    dy_base = dys_ptr + batch * sy_b + (direction % 2) * sy_k + ch[:, None] * sy_c
    bc_base = ((batch * 4 + direction) * bc_rows + tl.program_id(0) % bc_rows) * length
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    dA = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    dD = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    num_tiles = tl.cdiv(length, BLOCK_L)
    if direction >= 2:
        for tile in range(0, num_tiles):
            carry, dA, dD, dbias = _backward_tile(
                x_base, delta_base, b_base, c_base, dy_base, ckpt_base, du_ptr, ddelta_ptr, db_ptr,
                dc_ptr, row_base, bc_base, A, D, bias, ch_ok, carry, dA, dD, dbias,
                num_tiles - 1 - tile, length, BLOCK_L, True, ATOMIC_BC)
    else:
        for tile in range(0, num_tiles):
            carry, dA, dD, dbias = _backward_tile(
                x_base, delta_base, b_base, c_base, dy_base, ckpt_base, du_ptr, ddelta_ptr, db_ptr,
                dc_ptr, row_base, bc_base, A, D, bias, ch_ok, carry, dA, dD, dbias,
                num_tiles - 1 - tile, length, BLOCK_L, False, ATOMIC_BC)
    tl.store(da_ptr + rows, tl.sum(dA, axis=1), mask=ch_ok)
    tl.store(dd_ptr + rows, tl.sum(dD, axis=1), mask=ch_ok)
    tl.store(dbias_ptr + rows, tl.sum(dbias, axis=1), mask=ch_ok)


@jit_with_runtime_ints(_RUNTIME_INTS)
def _merge_kernel(ys_ptr, out_ptr, channels, height, width,
                  BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, ALIGN: tl.constexpr):
    """``out[b, c] = ys[b, 0, c] + ys[b, 2, c] + (ys[b, 1, c] + ys[b, 3, c])^T`` for a
    ``BLOCK_H x BLOCK_W`` tile of one plane: ``ys (B, 4, D, L)`` in direction order, the
    column-major slots loaded as ``(BLOCK_W, BLOCK_H)`` tiles (contiguous along H) and
    transposed in registers; ``out (B, D, H, W)`` contiguous, in its own dtype. ``height``
    and ``width`` are multiples of ``ALIGN``."""
    height, width = aligned(height, ALIGN), aligned(width, ALIGN)
    plane = tl.program_id(2).to(tl.int64)
    batch, channel = plane // channels, plane % channels
    length = height * width
    slot = channels * length
    base = ys_ptr + (batch * 4 * channels + channel) * length
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_ok, col_ok = rows < height, cols < width
    row_major = rows[:, None] * width + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    y = tl.load(base + row_major, mask=ok, other=0.0) + \
        tl.load(base + 2 * slot + row_major, mask=ok, other=0.0)
    col_major = cols[:, None] * height + rows[None, :]
    ok_t = col_ok[:, None] & row_ok[None, :]
    y_t = tl.load(base + slot + col_major, mask=ok_t, other=0.0) + \
        tl.load(base + 3 * slot + col_major, mask=ok_t, other=0.0)
    y += tl.trans(y_t)
    tl.store(out_ptr + plane * length + row_major, y, mask=ok)


@jit_with_runtime_ints(_RUNTIME_INTS)
def _both_orders_kernel(x_ptr, out_ptr, channels, height, width, sx_b, sx_c,
                        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, ALIGN: tl.constexpr):
    """A ``BLOCK_H x BLOCK_W`` tile of one plane of ``x (B, D, H, W)`` (each plane
    contiguous) into ``out (B, 2, D, L)``: row-major into slot 0, transposed in registers and
    column-major into slot 1. One read of ``x``; PyTorch's strided copy and ``stack`` took
    about three times as long. ``height``, ``width`` and the strides are multiples of
    ``ALIGN``."""
    height, width = aligned(height, ALIGN), aligned(width, ALIGN)
    sx_b, sx_c = aligned(sx_b, ALIGN), aligned(sx_c, ALIGN)
    plane = tl.program_id(2).to(tl.int64)
    batch, channel = plane // channels, plane % channels
    length = height * width
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_ok, col_ok = rows < height, cols < width
    row_major = rows[:, None] * width + cols[None, :]
    tile = tl.load(x_ptr + batch * sx_b + channel * sx_c + row_major,
                   mask=row_ok[:, None] & col_ok[None, :])
    base = out_ptr + (batch * 2 * channels + channel) * length
    tl.store(base + row_major, tile, mask=row_ok[:, None] & col_ok[None, :])
    tl.store(base + channels * length + cols[:, None] * height + rows[None, :], tl.trans(tile),
             mask=col_ok[:, None] & row_ok[None, :])


@jit_with_runtime_ints(_RUNTIME_INTS)
def _direction_order_kernel(maps_ptr, seqs_ptr, channels, height, width, INVERSE: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, ALIGN: tl.constexpr):
    """A ``BLOCK_H x BLOCK_W`` tile of plane ``(b, k, c)`` of ``maps (B, 4, C, H, W)`` into
    ``seqs (B, 4, C, L)`` in direction order (:func:`.cross_scan.direction_order`): copied
    for the row-major directions (k even), transposed in registers for the column-major ones;
    with ``INVERSE`` from ``seqs`` back into ``maps`` (the backward pass). Both contiguous;
    ``height`` and ``width`` multiples of ``ALIGN``."""
    height, width = aligned(height, ALIGN), aligned(width, ALIGN)
    plane = tl.program_id(2).to(tl.int64)
    length = height * width
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_ok, col_ok = rows < height, cols < width
    ok = row_ok[:, None] & col_ok[None, :]
    row_major = rows[:, None] * width + cols[None, :]
    maps = maps_ptr + plane * length
    seqs = seqs_ptr + plane * length
    if (plane // channels) % 2 == 1:
        col_major = cols[:, None] * height + rows[None, :]
        ok_t = col_ok[:, None] & row_ok[None, :]
        if INVERSE:
            tl.store(maps + row_major, tl.trans(tl.load(seqs + col_major, mask=ok_t)), mask=ok)
        else:
            tl.store(seqs + col_major, tl.trans(tl.load(maps + row_major, mask=ok)), mask=ok_t)
    elif INVERSE:
        tl.store(maps + row_major, tl.load(seqs + row_major, mask=ok), mask=ok)
    else:
        tl.store(seqs + row_major, tl.load(maps + row_major, mask=ok), mask=ok)


@jit_with_runtime_ints(_RUNTIME_INTS)
def _project_steps_kernel(lo_ptr, w_ptr, out_ptr, channels, rank, length, sl_b, sl_k, sl_r,
                          BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    """``delta[b, k, c, l] = sum_r w[k, c, r] lo[b, k, r, l]`` for a ``BLOCK_C x BLOCK_L``
    tile, program ``(l tile, c tile, b * 4 + k)``: ``w (4, D, R)`` contiguous in ``lo``'s
    dtype (as :func:`~.selective_scan.project_steps` casts it); ``lo``'s rows contiguous;
    ``delta (B, 4, D, L)`` contiguous in ``lo``'s dtype. The rank is padded to ``BLOCK_R``
    (at least 16) with zeros: one product on the tensor cores, in TF32 for 16-bit inputs
    (exact products). cuBLAS chose 32x32 tiles for these products (a rank not a multiple
    of 8): about four times the time of the store. ``length`` and ``lo``'s strides are
    multiples of ``ALIGN``."""
    length = aligned(length, ALIGN)
    sl_b, sl_k, sl_r = aligned(sl_b, ALIGN), aligned(sl_k, ALIGN), aligned(sl_r, ALIGN)
    sequence = tl.program_id(2).to(tl.int64)
    batch, direction = sequence // 4, sequence % 4
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    r = tl.arange(0, BLOCK_R)
    c_ok, l_ok, r_ok = c < channels, l < length, r < rank
    lo = tl.load(lo_ptr + batch * sl_b + direction * sl_k + r[:, None] * sl_r + l[None, :],
                 mask=r_ok[:, None] & l_ok[None, :], other=0.0)
    w = tl.load(w_ptr + (direction * channels + c[:, None]) * rank + r[None, :],
                mask=c_ok[:, None] & r_ok[None, :], other=0.0)
    # as float32: TF32 holds 16-bit floats exactly (Triton's interpreter multiplies bfloat16
    # wrongly and rounds float32 to bfloat16 towards zero, hence w comes in lo's dtype)
    delta = tl.dot(w.to(tl.float32), lo.to(tl.float32), input_precision=DOT_PRECISION)
    tl.store(out_ptr + (sequence * channels + c[:, None]) * length + l[None, :], delta,
             mask=c_ok[:, None] & l_ok[None, :])


@jit_with_runtime_ints(_RUNTIME_INTS)
def _project_steps_bwd_kernel(dd_ptr, lo_ptr, w_ptr, dlo_ptr, part_ptr, channels, rank, length,
                              per_split, sl_b, sl_k, sl_r, BLOCK_C: tl.constexpr,
                              BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    """The gradients of :func:`_project_steps_kernel`'s inputs from ``ddelta (B, 4, D, L)``
    float32 contiguous. Program ``(l tile, split, b * 4 + k)`` owns ``BLOCK_L`` steps of one
    sequence and the ``per_split`` channels of its split (a multiple of ``BLOCK_C``), walked
    ``BLOCK_C`` at a time: its part of ``d lo[b, k, :, l] = sum_c w[k, c, :] ddelta[b, k, c, l]``
    into ``dlo[split, b, k]`` (``(splits, B, 4, R, L)`` contiguous: float32 partial sums over
    the splits, or ``lo``'s gradient in its dtype where there is one split) and its tile's part
    of ``d w[k, c, r] = sum_{b, l} ddelta[b, k, c, l] lo[b, k, r, l]`` into ``part[b, k, l tile,
    c, r]`` (float32, summed over the batch and the tiles by the caller). ``w (4, D, R)``
    contiguous; ``lo`` as the forward's. One read of ``ddelta``; products at
    ``DOT_PRECISION``: TF32 where ``lo`` is 16-bit (autocast rounded ``ddelta`` to bfloat16 for
    PyTorch's products), else as PyTorch's float32 matmuls."""
    length = aligned(length, ALIGN)
    sl_b, sl_k, sl_r = aligned(sl_b, ALIGN), aligned(sl_k, ALIGN), aligned(sl_r, ALIGN)
    tile, split = tl.program_id(0), tl.program_id(1)
    sequence = tl.program_id(2).to(tl.int64)
    batch, direction = sequence // 4, sequence % 4
    l = tile * BLOCK_L + tl.arange(0, BLOCK_L)
    r = tl.arange(0, BLOCK_R)
    l_ok, r_ok = l < length, r < rank
    lo = tl.load(lo_ptr + batch * sl_b + direction * sl_k + r[:, None] * sl_r + l[None, :],
                 mask=r_ok[:, None] & l_ok[None, :], other=0.0).to(tl.float32)
    d_lo = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
    part = part_ptr + (sequence * tl.num_programs(0) + tile) * channels * rank
    first = split * per_split
    last = tl.minimum(first + per_split, channels)
    for c0 in range(first, last, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < last
        dd = tl.load(dd_ptr + (sequence * channels + c[:, None]) * length + l[None, :],
                     mask=c_ok[:, None] & l_ok[None, :], other=0.0)
        w = tl.load(w_ptr + (direction * channels + c[:, None]) * rank + r[None, :],
                    mask=c_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        d_lo += tl.dot(tl.trans(w), dd, input_precision=DOT_PRECISION)
        d_w = tl.dot(dd, tl.trans(lo), input_precision=DOT_PRECISION)
        tl.store(part + c[:, None] * rank + r[None, :], d_w, mask=c_ok[:, None] & r_ok[None, :])
    rows = (split * tl.num_programs(2) + sequence) * rank + r
    tl.store(dlo_ptr + rows[:, None] * length + l[None, :], d_lo.to(dlo_ptr.dtype.element_ty),
             mask=r_ok[:, None] & l_ok[None, :])


Blocks = Tuple[int, int, int]  # (BLOCK_D, BLOCK_L, num_warps)
MAX_BLOCK_L = 256


def block_sizes(length: int, backward: bool = False) -> Blocks:
    """Default ``(BLOCK_D, BLOCK_L, num_warps)`` of the forward kernel, or of the backward.

    Chosen by sweeps of block sizes (bfloat16, SegMAN-L's stage sizes at 512x512,
    docs/benchmarks.md; ``tools/gpu_checks/check_cross_selective_scan.py --sweep`` times the
    same): 256 steps a program with 4 warps, four channels for the forward (since its tiles
    are read in 16-byte pieces; 15-23% faster than two at SegMAN-L's stages 1-3, batch 16, an
    H100), one for the backward (since its per-step sums are kept per step: forward +
    backward 3-13% faster than two at all four sweep sizes, batch 8 and 16, an H200).
    """
    return 1 if backward else 4, min(max(16, next_power_of_2(length)), MAX_BLOCK_L), 4


class ProjectionBackwardLaunch(NamedTuple):
    """Launch shape of :func:`_project_steps_bwd_kernel`: ``block_c`` channels a step,
    ``block_l`` steps a program, and channel splits enough for ``min_programs`` programs."""
    block_c: int
    block_l: int
    num_warps: int
    min_programs: int


def projection_backward_launch(block_r: int) -> ProjectionBackwardLaunch:
    """The default launch for ranks padded to ``block_r``: 128 steps a program with 8 warps,
    64 channels a step up to ranks of 32, else 32 (and fewer steps from ranks of 128, whose
    float32 tiles would not fit an H100's shared memory), channels split for at least 512
    programs. The fastest, or within 4% of it, of the shapes
    ``tools/gpu_checks/check_cross_selective_scan.py --sweep-projection`` tried at SegMAN-L's
    four stages on an H200 (0.40x, 0.38x, 0.50x and 0.53x the time of PyTorch's products
    under autocast; unsplit, stages 3 and 4 ran 128 and 32 programs, docs/benchmarks.md)."""
    return ProjectionBackwardLaunch(64 if block_r <= 32 else 32, min(128, 8192 // block_r), 8, 512)


# (BLOCK_H, BLOCK_W) of the merge kernel, _both_orders_kernel and _direction_order_kernel
MERGE_TILE = (32, 32)
# (BLOCK_C, BLOCK_L) of _project_steps_kernel: the fastest of six at SegMAN-L's stages 1-3
# (batch 16, an H100; 0.41x, 0.47x and 0.84x the time of cuBLAS's product, docs/benchmarks.md)
PROJECTION_TILE = (32, 256)


# rows of dB's and dC's partial sums a batch element and direction in the backward pass
# (triton_jit.partial_sum_rows: shared by the channel blocks past it, by atomics). A row a
# block wrote and read back 113 MB at SegMAN-L's stage 3, batch 8: the backward took 0.43 ms
# there, 0.32 with 4 rows (1.36 -> 1.00 ms at stage 1); 4 was within 1% of the fastest of
# 1-64 rows at stages 1-3 (tools/gpu_checks/check_cross_selective_scan.py --sweep-bc-rows,
# H200, docs/benchmarks.md)
BC_ROWS = 4


def _sequences(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """Each ``(B, 4, ., L)`` input with unit stride along ``L`` (copied where it has not)."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _strides(xs: Tensor, delta: Tensor, B: Tensor, C: Tensor) -> Tuple[int, ...]:
    """The kernels' stride arguments: batch, direction (or order) and channel strides."""
    return (*xs.stride()[:3], *delta.stride()[:3], *B.stride()[:2], *C.stride()[:2])


def _merge(ys: Tensor, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """``(B, 4, D, L)`` float32 in direction order -> ``(B, D, H, W)`` in ``dtype``: the sum
    of the four directions at each pixel (:func:`_merge_kernel`)."""
    batch, _, channels, _ = ys.shape
    out = torch.empty(batch, channels, height, width, dtype=dtype, device=ys.device)
    block_h, block_w = MERGE_TILE
    launch(_merge_kernel, (cdiv(width, block_w), cdiv(height, block_h), batch * channels),
           ys, out, channels, height, width, BLOCK_H=block_h, BLOCK_W=block_w,
           ALIGN=alignment(height, width), num_warps=4)
    return out


def _both_orders(x: Tensor) -> Tensor:
    """:func:`.cross_scan.both_orders` in one kernel (:func:`_both_orders_kernel`)."""
    x = with_contiguous_planes(x)
    batch, channels, height, width = x.shape
    out = torch.empty(batch, 2, channels, height * width, dtype=x.dtype, device=x.device)
    block_h, block_w = MERGE_TILE
    launch(_both_orders_kernel, (cdiv(width, block_w), cdiv(height, block_h), batch * channels),
           x, out, channels, height, width, x.stride(0), x.stride(1), BLOCK_H=block_h,
           BLOCK_W=block_w, ALIGN=alignment(height, width, x.stride(0), x.stride(1)), num_warps=4)
    return out


def _reordered(src: Tensor, height: int, width: int, inverse: bool) -> Tensor:
    """:func:`_direction_order_kernel` from ``src`` (``(B, 4, C, H, W)`` maps, or ``(B, 4, C,
    L)`` sequences with ``inverse``) into a new, contiguous tensor of the other layout."""
    src = src.contiguous()
    batch, directions, channels = src.shape[:3]
    layout = (height, width) if inverse else (height * width, )
    out = torch.empty(batch, directions, channels, *layout, dtype=src.dtype, device=src.device)
    maps, seqs = (out, src) if inverse else (src, out)
    block_h, block_w = MERGE_TILE
    launch(_direction_order_kernel,
           (cdiv(width, block_w), cdiv(height, block_h), batch * directions * channels),
           maps, seqs, channels, height, width, INVERSE=inverse, BLOCK_H=block_h,
           BLOCK_W=block_w, ALIGN=alignment(height, width), num_warps=4)
    return out


def _reordered_fake(src, height, width, inverse):
    layout = (height, width) if inverse else (height * width, )
    return src.new_empty(*src.shape[:3], *layout)


def _direction_order_setup_context(ctx, inputs, output):
    ctx.size = inputs[1:3]


def _direction_order_gradients(forward: Callable, backward: Callable) -> Callable:
    """The autograd backward: the maps back from the sequences, by ``backward``."""

    def gradients(ctx, grad):
        return backward(grad, *ctx.size, True), None, None, None

    return gradients


# the forward and the backward are one kernel, one way and the other
DIRECTION_ORDER = TritonAutogradOp('direction_order', _reordered, _reordered_fake, _reordered,
                                   _reordered_fake, _direction_order_setup_context,
                                   _direction_order_gradients)


def direction_order_triton(maps: Tensor) -> Tensor:
    """:func:`.cross_scan.direction_order` of contiguous ``maps (B, 4, C, H, W)`` in one
    kernel (PyTorch's strided copies and ``stack`` took three, and their Python a tenth of
    SegMAN-L's host time at batch 1, docs/benchmarks.md); the backward pass is the same
    kernel the other way. Through :data:`DIRECTION_ORDER`."""
    return DIRECTION_ORDER(maps, *maps.shape[3:], False, records=records_autograd(maps))


def rank_block(rank: int) -> int:
    """``BLOCK_R`` of the step projection's kernels: the rank padded to a power of two of at
    least 16 (the least that ``tl.dot`` takes)."""
    return max(16, next_power_of_2(rank))


def _project_steps(dt_low: Tensor, dt_proj: Tensor) -> Tensor:
    """:func:`.selective_scan.project_steps` in one kernel (:func:`_project_steps_kernel`)."""
    dt_low, = _sequences(dt_low)
    batch, _, rank, length = dt_low.shape
    channels = dt_proj.shape[1]
    dt_proj = cast(dt_proj, dt_low.dtype).contiguous()
    delta = torch.empty(batch, 4, channels, length, dtype=dt_low.dtype, device=dt_low.device)
    block_c, block_l = PROJECTION_TILE
    launch(_project_steps_kernel, (cdiv(length, block_l), cdiv(channels, block_c), batch * 4),
           dt_low, dt_proj, delta, channels, rank, length, *dt_low.stride()[:3],
           BLOCK_C=block_c, BLOCK_L=block_l, BLOCK_R=rank_block(rank),
           DOT_PRECISION=dot_precision(dt_low.dtype),
           ALIGN=alignment(length, *dt_low.stride()[:3]), num_warps=4)
    return delta


def _project_steps_backward(ddelta: Tensor, dt_low: Tensor, dt_proj: Tensor,
                            launch_shape: Optional[ProjectionBackwardLaunch] = None
                            ) -> Tuple[Tensor, Tensor]:
    """:func:`.selective_scan.project_steps_backward` of float32 contiguous ``ddelta`` in one
    kernel (:func:`_project_steps_bwd_kernel`) and a sum or two: ``ddelta`` is read once, in
    float32 (PyTorch's two products on it each cast it to bfloat16 under autocast first, and
    the weight gradient's, of a rank not a multiple of 8, ran on cuBLAS's 32x32 tiles:
    docs/benchmarks.md). ``launch_shape``: default :func:`projection_backward_launch`."""
    dt_low, = _sequences(dt_low)
    batch, _, rank, length = dt_low.shape
    channels = dt_proj.shape[1]
    block_r = rank_block(rank)
    block_c, block_l, warps, min_programs = launch_shape or projection_backward_launch(block_r)
    tiles = cdiv(length, block_l)
    splits = max(1, min(cdiv(min_programs, tiles * batch * 4), cdiv(channels, block_c)))
    per_split = cdiv(cdiv(channels, splits), block_c) * block_c
    splits = cdiv(channels, per_split)
    d_dt_low = (torch.empty(batch, 4, rank, length, dtype=dt_low.dtype, device=dt_low.device)
                if splits == 1 else _float32(splits, batch, 4, rank, length, like=ddelta))
    part = _float32(batch, 4, tiles, channels, rank, like=ddelta)
    launch(_project_steps_bwd_kernel, (tiles, splits, batch * 4), ddelta, dt_low,
           dt_proj.contiguous(), d_dt_low, part, channels, rank, length, per_split,
           *dt_low.stride()[:3], BLOCK_C=block_c, BLOCK_L=block_l, BLOCK_R=block_r,
           DOT_PRECISION=dot_precision(dt_low.dtype),
           ALIGN=alignment(length, *dt_low.stride()[:3]), num_warps=warps)
    if splits > 1:
        d_dt_low = cast(d_dt_low.sum(0), dt_low.dtype)
    return d_dt_low, cast(part.sum((0, 2)), dt_proj.dtype)


def _flat(*params: Tensor) -> Tuple[Tensor, ...]:
    """``A (4*D, 1)``, ``D``, ``delta_bias`` as contiguous ``(4*D,)`` vectors."""
    return tuple(t.reshape(-1).contiguous() for t in params)


def _blocks(x: Tensor, blocks: List[int], backward: bool) -> Blocks:
    """``blocks`` as given, or the default of the pass for ``x``'s map size when empty (chosen
    inside the ops, so that compiled graphs do not depend on the map size through their
    arguments)."""
    if blocks:
        return tuple(blocks)
    return block_sizes(x.shape[2] * x.shape[3], backward)


def _float32(*shape: int, like: Tensor) -> Tensor:
    return torch.empty(*shape, device=like.device, dtype=torch.float32)


def checkpoint_count(length: int, bwd_blocks: List[int]) -> int:
    """How many states the forward pass keeps for the backward pass: one at the end of every
    backward tile but the last, ``(length - 1) // BLOCK_L``. The default ``BLOCK_L``
    (:func:`block_sizes`) is :data:`MAX_BLOCK_L`, or at least ``length`` (no checkpoints),
    so ``(length - 1) // MAX_BLOCK_L`` is the count either way, and needs no power of two of a
    symbolic length (the fake implementation under dynamic shapes)."""
    return (length - 1) // (bwd_blocks[1] if bwd_blocks else MAX_BLOCK_L)


def _cross_scan_forward_impl(x: Tensor, dt_low: Tensor, dt_proj: Tensor, A: Tensor, B: Tensor,
                             C: Tensor, D: Tensor, delta_bias: Tensor, store_states: bool,
                             blocks: List[int]) -> Tuple[Tensor, Tensor]:
    """``y (B, D, H, W)`` in ``x``'s dtype and, if ``store_states``, the checkpointed
    states for the backward pass (else an empty tensor): float32
    ``(B, 4, D, checkpoint_count(H*W, ..))``, in scan order the state after every
    backward tile but the last. ``blocks``: the forward's then the backward's
    ``(BLOCK_D, BLOCK_L, num_warps)``, or empty (defaults)."""
    batch, channels, height, width = x.shape
    length = height * width
    # delta is freed after the kernel: the backward pass recomputes it
    xs, (delta, B, C) = _both_orders(x), _sequences(_project_steps(dt_low, dt_proj), B, C)
    ys = _float32(batch, 4, channels, length, like=x)
    block_d, block_l, warps = _blocks(x, blocks[:3], backward=False)
    ckpt = _blocks(x, blocks[3:], backward=True)[1]  # the backward's tile
    states = _float32(batch, 4, channels,
                      checkpoint_count(length, blocks[3:]) if store_states else 0, like=x)
    ints = (length, *_strides(xs, delta, B, C))
    launch(_cross_scan_fwd_kernel, (cdiv(channels, block_d), 4, batch),
           xs, delta, *_flat(A, D, delta_bias), B, C, ys, states, channels, *ints,
           STORE_CKPT=store_states, CKPT=ckpt, BLOCK_D=block_d, BLOCK_L=block_l,
           ALIGN=alignment(*ints), num_warps=warps)
    return _merge(ys, height, width, x.dtype), states


def _cross_scan_forward_fake(x, dt_low, dt_proj, A, B, C, D, delta_bias, store_states, blocks):
    batch, channels, height, width = x.shape
    count = checkpoint_count(height * width, blocks[3:]) if store_states else 0
    return x.new_empty(batch, channels, height, width), _float32(batch, 4, channels, count, like=x)


# the gradients of x, dt_low, dt_proj (in their shapes and dtypes); of B and C, stacked
# ``(2, B, 4, 1, L)`` (in :func:`_bc_dtype`); of A, D and delta_bias, stacked ``(3, 4*D)`` in
# float32
PackedGradients = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _bc_dtype(B: Tensor, C: Tensor) -> torch.dtype:
    """The dtype of the stacked gradients of B and C: theirs (one, in SS2D), else float32."""
    return B.dtype if B.dtype == C.dtype else torch.float32


def _cross_scan_backward_impl(dy: Tensor, x: Tensor, dt_low: Tensor, dt_proj: Tensor, A: Tensor,
                              B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor, states: Tensor,
                              blocks: List[int]) -> PackedGradients:
    """The gradients of ``x, dt_low, dt_proj, A, B, C, D, delta_bias`` (as
    :data:`PackedGradients`: the partial sums of B's and C's, and of A's, D's and
    delta_bias's, are reduced together, one reduction each, and :func:`_unpacked` makes them
    the inputs' shapes and dtypes) from the forward's checkpointed ``states`` for the
    backward ``blocks``. ``delta`` is recomputed from ``dt_low`` and ``dt_proj``, and its
    gradient taken back through that product (:func:`~.selective_scan.project_steps_backward`)."""
    block_d, block_l, warps = _blocks(x, blocks, backward=True)
    batch, channels, height, width = x.shape
    length = height * width
    assert states.shape == (batch, 4, channels, checkpoint_count(length, blocks)), states.shape
    xs, dys = _both_orders(x), _both_orders(dy)
    delta, B_seq, C_seq = _sequences(_project_steps(dt_low, dt_proj), B, C)
    grid = (cdiv(channels, block_d), 4, batch)
    du, ddelta = _float32(2, batch, 4, channels, length, like=x).unbind()
    bc_rows, atomic_bc = partial_sum_rows(grid[0], BC_ROWS)  # partial sums over channel blocks
    d_bc = empty_partial_sums(2 * batch * 4 * bc_rows, length, atomic_bc, x.device).view(
        2, batch, 4, bc_rows, length)
    d_params = _float32(3, batch, 4 * channels, like=x)  # partial sums over the batch
    ints = (length, *_strides(xs, delta, B_seq, C_seq), *dys.stride()[:3])
    launch(_cross_scan_bwd_kernel, grid, xs, delta, *_flat(A, D, delta_bias), B_seq, C_seq,
           states, dys, du, ddelta, *d_bc.unbind(), *d_params.unbind(), channels, length,
           bc_rows, *ints[1:], BLOCK_D=block_d, BLOCK_L=block_l, ALIGN=alignment(*ints),
           ATOMIC_BC=atomic_bc, num_warps=warps)
    d_dt_low, d_dt_proj = _project_steps_backward(ddelta, dt_low, dt_proj)
    return (_merge(du, height, width, x.dtype), d_dt_low, d_dt_proj,
            cast(d_bc.sum(3, keepdim=True), _bc_dtype(B, C)), d_params.sum(1))


def _cross_scan_backward_fake(dy, x, dt_low, dt_proj, A, B, C, D, delta_bias, states, blocks):
    return (*(torch.empty_like(t, memory_format=torch.contiguous_format)
              for t in (x, dt_low, dt_proj)),
            B.new_empty(2, *B.shape, dtype=_bc_dtype(B, C)), _float32(3, D.shape[0], like=x))


def _unpacked(grads: PackedGradients, inputs: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
    """The eight gradients of :data:`PackedGradients`, in the inputs' shapes and dtypes (views
    of the stacked ones: outside the custom op, whose outputs may not alias each other)."""
    dx, d_dt_low, d_dt_proj, d_bc, d_params = grads
    _, _, _, A, B, C, D, delta_bias = inputs
    dB, dC = d_bc.unbind()
    dA, dD, dbias = d_params.unbind()
    return (dx, d_dt_low, d_dt_proj, cast(dA.view(A.shape), A.dtype), cast(dB, B.dtype),
            cast(dC, C.dtype), cast(dD, D.dtype), cast(dbias, delta_bias.dtype))


def _setup_context(ctx, inputs, output):
    """What the backward needs, for the custom op and the eager Function alike."""
    *tensors, store_states, blocks = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*tensors, output[1])
    ctx.store_states, ctx.blocks = store_states, blocks


def _gradients(forward: Callable, backward: Callable) -> Callable:
    """The autograd backward that recomputes states with ``forward`` where the forward pass
    stored none and computes the gradients with ``backward``."""

    def gradients(ctx, dy, grad_states):
        # saved_tensors is unpacked once: checkpointing (with_cp) forbids a second unpack
        *inputs, states = ctx.saved_tensors
        if not ctx.store_states:  # a forward that did not expect a backward: states recomputed
            states = forward(*inputs, True, ctx.blocks)[1]
        grads = _unpacked(backward(dy, *inputs, states, ctx.blocks[3:]), inputs)
        return (*(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad)),
                None, None)

    return gradients


CROSS_SCAN = TritonAutogradOp('cross_scan', _cross_scan_forward_impl, _cross_scan_forward_fake,
                              _cross_scan_backward_impl, _cross_scan_backward_fake,
                              _setup_context, _gradients)


def cross_selective_scan_triton(x: Tensor, dt_low: Tensor, dt_proj: Tensor, A: Tensor,
                                B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor,
                                fwd_blocks: Optional[Blocks] = None,
                                bwd_blocks: Optional[Blocks] = None) -> Tensor:
    """The SS2D scan (state size 1) as fused Triton kernels; see the module doc.

    Args:
        x: ``(B, D, H, W)``; dt_low: ``(B, 4, R, H*W)`` and dt_proj: ``(4, D, R)``, the steps
            ``delta (B, 4, D, H*W)`` in low-rank form (:func:`.selective_scan.project_steps`);
            A: ``(4*D, 1)``; B, C: ``(B, 4, 1, H*W)`` (direction order, see the module doc);
            D, delta_bias: ``(4*D,)``.
        fwd_blocks, bwd_blocks: ``(BLOCK_D, BLOCK_L, num_warps)`` of the forward and the
            backward kernel (block sizes powers of two); default :func:`block_sizes` of the
            map's size.

    Returns:
        ``(B, D, H, W)`` in ``x``'s dtype, through :data:`CROSS_SCAN`.
    """
    inputs = (x, dt_low, dt_proj, A, B, C, D, delta_bias)
    store_states = records_autograd(*inputs)
    blocks = []
    if fwd_blocks is not None or bwd_blocks is not None:
        blocks = [*(fwd_blocks or _blocks(x, [], backward=False)),
                  *(bwd_blocks or _blocks(x, [], backward=True))]
    return CROSS_SCAN(*inputs, store_states, blocks, records=store_states)[0]
