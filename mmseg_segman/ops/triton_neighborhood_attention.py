"""Triton backend of :func:`mmseg_segman.ops.neighborhood_attention_2d`: fused 2-D
neighborhood attention with relative position bias, forward and backward.

Geometry (NATTEN 0.17, dilation 1). On an axis of length ``n`` with ``span = min(k, n)`` and
``r = k // 2`` the window of query ``i`` starts at ``clamp(i - r, 0, n - span)`` (the rule of
the module doc of :mod:`.neighborhood_attention` in one expression) and key ``m`` of it is
biased by ``rpb[h, m - i + k - 1, ...]``.

Forward. One program owns a ``TILE_H x TILE_W`` tile of queries of one (batch, head). The
keys its queries attend form one box of at most ``(TILE_H + k - 1) x (TILE_W + k - 1)``
pixels, so a program visits only the union of its tile's windows (FlexAttention's row-major
blocks visit whole rows of blocks). The forward walks the box a whole row a step (``COLS``
columns, :func:`box_columns`; ``ROWS`` rows a step where a launch asks for more): whether a
key column is in a query's window is computed once per program, a flag a pair (10-19% less
time in SegMAN-L's blocks than the column tests made at every row; other spellings of the
same loop moved the time by up to 50% either way, docs/benchmarks.md). The backward's ``dq``
kernel walks the rows in steps of ``BLOCK_N`` columns, with the window columns kept as one
int32 a pair, from which the window test follows. (The first version walked the box
flattened, in chunks of ``BLOCK_N`` keys: each key's row and column then took an integer
division, and the window tests and bias offsets were computed for every pair; on an H100 the
forward was bound by the integer units, about 90 instructions a pair, docs/benchmarks.md.)
Per step: ``s = q k^T`` on the tensor cores, the bias added, keys outside a query's window
masked, then online softmax in float32 (base 2) and ``acc += p v``. The log-sum-exp of every
query is stored for the backward pass.

Bias. The forward and ``dq``, whose steps run along a box's keys, read ``rpb`` laid out as
rows along them (:func:`bias_table`, one ``index_select``; at inference kept while ``rpb`` is
unchanged): a step's bias is a row of contiguous values a (query, box row) pair, loaded 16
bytes at a time without masks, where a gather from ``rpb`` took a masked 4-byte load a pair.
``dk`` / ``dv``, whose steps run along queries, still gather (the offset a query's part
plus a key's part).

Backward (recomputation, as in FlashAttention), two kernels. ``dq``: the forward's programs
again, ``delta = rowsum(dO * O)`` (stored for the next kernel), ``dS = P (dO V^T - delta)``,
``dq = dS K``. ``dk, dv``: one program per tile of keys walks, the same way, the box of
queries whose windows contain them (the inverse neighborhood: at most ``TILE + 3r`` rows and
columns at the borders), ``dv = P^T dO``, ``dk = dS^T Q``. No atomics anywhere.

Bias gradient. ``d rpb[h, a + i', b + j']`` sums ``dS`` over the batch and over all queries
whose window offset is ``(a, b)`` and whose window sits at ``(i', j')`` relative to them.
The ``dq`` program takes the batch elements of its group two at a time, adds their ``dS`` of
each (query, window position) in registers and writes the sum into its own rows of a float32
buffer ``G (heads, groups, H, W, k*k)``, adding to them after the first pair (each element
is written by one program only, so plain loads and stores suffice; the stores cost the
kernel about as much as the rest of its work, so a pair halves them); three matrix products
then fold ``G`` into the ``(heads, 2k-1, 2k-1)`` table (:func:`_fold_bias_grad`):
deterministic, and no colliding atomics.

Sizes and strides are runtime values (not specialised by Triton) but for the column strides,
which depend on the layout and the head dim only: one compilation per (dtype, head dim, kernel
size, rpb or not, layout, alignment) serves every batch and map size.

Aligned loads. Each kernel is told which stride of each tensor is 1 (its head vectors or its
rows of pixels, :data:`HEAD_VECTORS`, :data:`PLANES`) and a power of two dividing the others
(:func:`load_alignment`); where rows of pixels are read along a box, the box's ends are
widened to multiples of it where that takes no more steps (:func:`_widened`). Triton then moves
8 or 16 bytes a load and pipelines the loads of the products' operands (``cp.async``): with
runtime strides it had moved 2 bytes a load, not pipelined, and SegMAN-L's forward at stage 3
took 159 us where it takes 94 (docs/benchmarks.md).

``torch.compile`` traces the kernels as the ``torch.library`` custom ops
``mmseg_segman::na2d_forward`` and ``na2d_backward`` (:data:`NA2D`, a
:class:`~.triton_jit.TritonAutogradOp`); eager calls run the same functions in a plain
``torch.autograd.Function``, or launch the forward directly where autograd does not record.
"""
import functools
import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import kept, tensor_cache
from .triton_jit import (ALIGNMENT, TritonAutogradOp, aligned, cdiv, dot_precision,
                         empty_channels_first, jit_with_runtime_ints, launch, next_power_of_2,
                         records_autograd)

LOG2E = tl.constexpr(1.4426950408889634)
NEG = tl.constexpr(-1.0e30)  # the masked score: finite, so rows without a valid key yet stay NaN-free
# the layouts of a (B, heads, H, W, d) tensor the kernels know: its head vectors contiguous, or
# its (H, W) planes (the qkv map's); any other strides are read as they are
HEAD_VECTORS = tl.constexpr(0)
PLANES = tl.constexpr(1)
OTHER_LAYOUT = tl.constexpr(2)


# Sizes and strides: runtime values, one compilation for every input size. The column strides
# (``s*_x``) stay specialised: they do not change with the size, and where they are 1 (the
# model's layout) the loads along a box row are known to be contiguous (the forward at
# SegMAN-L's stage 1 took 21% less time, docs/benchmarks.md)
_RUNTIME_INTS = {
    'batch_size', 'batches_per_group', 'heads', 'height', 'width',
    *(f's{t}_{dim}' for t in ('q', 'k', 'v', 'o', 'do') for dim in 'bhyd')}


class Blocks(NamedTuple):
    """Launch shape of one kernel: a ``tile_h x tile_w`` tile of queries (dk/dv: of keys),
    ``columns`` columns of the box of keys (dk/dv: of queries) a step (the forward: keys a
    step, whole rows of :func:`box_columns` columns), ``num_warps`` and ``num_stages``."""
    tile_h: int
    tile_w: int
    columns: int
    num_warps: int
    num_stages: int


@triton.jit
def _window_start(i, length, span, RADIUS: tl.constexpr):
    """First key of the window of query ``i`` on an axis of ``length`` (``span = min(k, length)``)."""
    return tl.minimum(tl.maximum(i - RADIUS, 0), length - span)


@triton.jit
def _inverse_start(j, span, RADIUS: tl.constexpr):
    """First query whose window holds key ``j``."""
    return tl.where(j - span + 1 <= 0, 0, j - span + 1 + RADIUS)


@triton.jit
def _inverse_end(j, length, span, RADIUS: tl.constexpr):
    """One past the last query whose window holds key ``j``."""
    return tl.where(j >= length - span, length, j + RADIUS + 1)


@triton.jit
def _tile(height, width, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Rows, columns and in-map flags of the ``TILE_H * TILE_W`` pixels of this program's
    tile (``program_id(0)`` counts tiles row-major), and the tile's first row and column."""
    tiles_w = tl.cdiv(width, TILE_W)
    y0 = (tl.program_id(0) // tiles_w) * TILE_H
    x0 = (tl.program_id(0) % tiles_w) * TILE_W
    t = tl.arange(0, TILE_H * TILE_W)
    y = y0 + t // TILE_W
    x = x0 + t % TILE_W
    return y, x, (y < height) & (x < width), y0, x0


@triton.jit
def _batch_and_head(heads):
    """Batch element (int64, for offsets) and head of ``program_id(1) = batch * heads + head``."""
    return (tl.program_id(1) // heads).to(tl.int64), tl.program_id(1) % heads


@triton.jit
def _known_strides(sb, sh, sy, sx, sd, LAYOUT: tl.constexpr, ALIGN: tl.constexpr):
    """The strides of a ``(B, heads, H, W, d)`` tensor as the compiler may know them: its unit
    stride (``LAYOUT`` :data:`HEAD_VECTORS`: along ``d``, :data:`PLANES`: along ``x``) as 1,
    the others as multiples of ``ALIGN``, which the host checked (:func:`load_alignment`). A
    runtime stride is otherwise of unknown alignment, and Triton loads one element a thread:
    2-byte loads, which it does not pipeline (SegMAN-L's forward at stage 3 spent a third of
    its stalls storing them into shared memory one by one, docs/benchmarks.md)."""
    if LAYOUT == HEAD_VECTORS:
        return aligned(sb, ALIGN), aligned(sh, ALIGN), aligned(sy, ALIGN), aligned(sx, ALIGN), 1
    elif LAYOUT == PLANES:
        return aligned(sb, ALIGN), aligned(sh, ALIGN), aligned(sy, ALIGN), 1, aligned(sd, ALIGN)
    else:
        return sb, sh, sy, sx, sd


@triton.jit
def _spans(height, width, KERNEL: tl.constexpr):
    """Window height and width: the kernel size, or the axis where it is shorter."""
    return tl.minimum(height, KERNEL), tl.minimum(width, KERNEL)


@triton.jit
def _window_columns(kx, wx, ok):
    """Column of key column ``kx`` in the window that starts at ``wx`` (``-1`` where not
    ``ok``); the key is in the window's columns where it is in ``[0, span_w)``. Operands come
    as ``[M, 1]`` and ``[1, N]``, either way round: a ``[M, N]`` tile of int32 that stays
    the same along the box's rows (an int32 a pair, where pointers would take two registers
    and flags one more)."""
    return tl.where(ok, kx - wx, -1)


@triton.jit
def _in_window(offset, span):
    """Whether a key at ``offset`` from a window's start (on one axis) lies in it."""
    return (offset >= 0) & (offset < span)


@triton.jit
def _bias_offset(qy, qx, ky, wx, KERNEL: tl.constexpr):
    """Offset in ``rpb[h]`` of the bias of key ``(ky, wx + c)`` seen from query ``(qy, qx)``,
    less the key's window column ``c``."""
    return (ky - qy + KERNEL - 1) * (2 * KERNEL - 1) + wx - qx + KERNEL - 1


@triton.jit
def _scores(s, column, span_w, row_ok, bias_offset, rpb_base, HAS_RPB: tl.constexpr):
    """``(s + rpb) * log2(e)`` for a tile of products ``s = q k^T`` of (query, key) pairs,
    ``NEG`` outside the windows. A pair is in its query's window where the key's window
    column ``column`` (:func:`_window_columns`) is in ``[0, span_w)`` and ``row_ok`` (the key
    row is in the window); its bias is at ``bias_offset + column`` (:func:`_bias_offset`).
    Returns the scores and the flags of the pairs in a window."""
    valid = row_ok & (column >= 0) & (column < span_w)
    if HAS_RPB:
        s += tl.load(rpb_base + bias_offset + column, mask=valid, other=0.0).to(tl.float32)
    return tl.where(valid, s * LOG2E, NEG), valid


@triton.jit
def _bias_table_base(table_ptr, head, KERNEL: tl.constexpr, BIAS_SHIFT: tl.constexpr,
                     COLS: tl.constexpr):
    """Head ``head``'s part of :func:`bias_table`."""
    return table_ptr + head * (2 * KERNEL - 1) * (KERNEL + BIAS_SHIFT) * COLS


@triton.jit
def _bias_table_shift(left, qx, KERNEL: tl.constexpr, BIAS_SHIFT: tl.constexpr):
    """Each query's shift in :func:`bias_table` for a box whose left column is ``left``,
    clamped into the table (a query past the map's edge may lie outside it)."""
    return tl.minimum(tl.maximum(left - qx + KERNEL - 1 + BIAS_SHIFT, 0), KERNEL + BIAS_SHIFT - 1)


@triton.jit
def _table_bias(table_base, ky, qy, shift, box_col, KERNEL: tl.constexpr,
                BIAS_SHIFT: tl.constexpr, COLS: tl.constexpr):
    """The float32 biases of queries of row ``qy`` and table shift ``shift``
    (:func:`_bias_table_shift`) against the keys of box row ``ky`` at box column ``box_col``,
    broadcast to ``[M, N]``: rows of :func:`bias_table`, loaded without masks (a clamped row
    serves only pairs outside every window, which the caller masks)."""
    dy = tl.minimum(tl.maximum(ky - qy + KERNEL - 1, 0), 2 * KERNEL - 2)
    return tl.load(table_base + (dy * (KERNEL + BIAS_SHIFT) + shift) * COLS + box_col).to(tl.float32)


@triton.jit
def _load_rows(base, y, x, ok, sy, sx, sd, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Head vectors of pixels ``(y, x)`` as ``[P, BLOCK_D]``."""
    d = tl.arange(0, BLOCK_D)
    ptrs = base + (y * sy + x * sx)[:, None] + d[None, :] * sd
    return tl.load(ptrs, mask=ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _load_cols(base, y, x, ok, sy, sx, sd, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Head vectors of pixels ``(y, x)`` as ``[BLOCK_D, P]``."""
    d = tl.arange(0, BLOCK_D)
    ptrs = base + (y * sy + x * sx)[None, :] + d[:, None] * sd
    return tl.load(ptrs, mask=ok[None, :] & (d < HEAD_DIM)[:, None], other=0.0)


@triton.jit
def _store_rows(base, value, y, x, ok, sy, sx, sd, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    tl.store(base + (y * sy + x * sx)[:, None] + d[None, :] * sd, value,
             mask=ok[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _query_box(y0, x0, height, width, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
               KERNEL: tl.constexpr):
    """Top-left corner, height and width of the box of keys that a query tile attends."""
    span_h, span_w = _spans(height, width, KERNEL)
    top = _window_start(y0, height, span_h, KERNEL // 2)
    left = _window_start(x0, width, span_w, KERNEL // 2)
    bottom = _window_start(tl.minimum(y0 + TILE_H, height) - 1, height, span_h, KERNEL // 2) + span_h
    right = _window_start(tl.minimum(x0 + TILE_W, width) - 1, width, span_w, KERNEL // 2) + span_w
    return top, left, bottom - top, right - left


@triton.jit
def _widened(left, right, BOX_ALIGN: tl.constexpr):
    """Columns ``left .. right - 1`` widened to multiples of ``BOX_ALIGN`` (``right`` stays
    within the map, whose width the host checked to be a multiple: :func:`load_alignment`),
    so that a row of them held as planes loads aligned."""
    if BOX_ALIGN > 1:
        return aligned(left, BOX_ALIGN), aligned(right + BOX_ALIGN - 1, BOX_ALIGN)
    else:
        return left, right


@triton.jit
def _query_tile(height, width, TILE_H: tl.constexpr, TILE_W: tl.constexpr, KERNEL: tl.constexpr,
                BOX_ALIGN: tl.constexpr):
    """This program's query tile (:func:`_tile`): its rows, columns, in-map flags and window
    starts, its box of keys (:func:`_query_box`, widened by :func:`_widened`) and the spans."""
    qy, qx, q_ok, y0, x0 = _tile(height, width, TILE_H, TILE_W)
    top, left, box_h, box_w = _query_box(y0, x0, height, width, TILE_H, TILE_W, KERNEL)
    left, right = _widened(left, left + box_w, BOX_ALIGN)
    span_h, span_w = _spans(height, width, KERNEL)
    wy = _window_start(qy, height, span_h, KERNEL // 2)
    wx = _window_start(qx, width, span_w, KERNEL // 2)
    return qy, qx, q_ok, wy, wx, top, left, box_h, right - left, span_h, span_w


@triton.jit
def _key_columns(left, c0, box_w, wx, q_ok, BLOCK_N: tl.constexpr):
    """Columns ``c0 .. c0 + BLOCK_N`` of a query tile's box of keys: their map columns, flags,
    and each key's column in each query's window (:func:`_window_columns`, ``[M, BLOCK_N]``)."""
    kx = left + c0 + tl.arange(0, BLOCK_N)
    return kx, kx < left + box_w, _window_columns(kx[None, :], wx[:, None], q_ok[:, None])


@triton.jit
def _key_row(q, k_base, ky, kx, k_ok, column, wy, span_h, span_w, bias, sk_y, sk_x, sk_d,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The keys of box row ``ky`` at columns ``kx`` as ``k^T [BLOCK_D, BLOCK_N]``, and the
    scores ``(q k^T + bias) * log2(e)`` of the tile's queries against them, ``NEG`` outside
    the windows (key window column ``column``, :func:`_window_columns`), with their flags."""
    kt = _load_cols(k_base, ky, kx, k_ok, sk_y, sk_x, sk_d, HEAD_DIM, BLOCK_D)
    valid = ((ky >= wy) & (ky < wy + span_h))[:, None] & (column >= 0) & (column < span_w)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) + bias
    return kt, tl.where(valid, s * LOG2E, NEG), valid


@jit_with_runtime_ints(_RUNTIME_INTS)
def _na_fwd_kernel(q_ptr, k_ptr, v_ptr, rpb_ptr, o_ptr, lse_ptr, heads, height, width,
                   sq_b, sq_h, sq_y, sq_x, sq_d, sk_b, sk_h, sk_y, sk_x, sk_d,
                   sv_b, sv_h, sv_y, sv_x, sv_d, so_b, so_h, so_y, so_x, so_d,
                   HEAD_DIM: tl.constexpr, KERNEL: tl.constexpr, HAS_RPB: tl.constexpr,
                   TILE_H: tl.constexpr, TILE_W: tl.constexpr, ROWS: tl.constexpr,
                   COLS: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   LAYOUT_Q: tl.constexpr, LAYOUT_K: tl.constexpr, LAYOUT_V: tl.constexpr,
                   LAYOUT_O: tl.constexpr, ALIGN: tl.constexpr, WIDTH_ALIGN: tl.constexpr,
                   BOX_ALIGN: tl.constexpr, BIAS_SHIFT: tl.constexpr):
    """The output and log-sum-exp of a query tile: ``ROWS`` whole rows of the tile's box a
    step (``COLS >= TILE_W + KERNEL - 1`` columns each, :func:`box_columns`; the box
    widened by :func:`_widened` still fits, as :func:`load_alignment` checked). ``LAYOUT_*``,
    ``ALIGN``: :func:`_known_strides`; ``WIDTH_ALIGN``: the width is a multiple of it.
    ``rpb_ptr``: the bias as rows of the box (:func:`bias_table`, ``BIAS_SHIFT``)."""
    sq_b, sq_h, sq_y, sq_x, sq_d = _known_strides(sq_b, sq_h, sq_y, sq_x, sq_d, LAYOUT_Q, ALIGN)
    sk_b, sk_h, sk_y, sk_x, sk_d = _known_strides(sk_b, sk_h, sk_y, sk_x, sk_d, LAYOUT_K, ALIGN)
    sv_b, sv_h, sv_y, sv_x, sv_d = _known_strides(sv_b, sv_h, sv_y, sv_x, sv_d, LAYOUT_V, ALIGN)
    so_b, so_h, so_y, so_x, so_d = _known_strides(so_b, so_h, so_y, so_x, so_d, LAYOUT_O, ALIGN)
    width = aligned(width, WIDTH_ALIGN)
    batch, head = _batch_and_head(heads)
    qy, qx, q_ok, wy, wx, top, left, box_h, box_w, span_h, span_w = _query_tile(
        height, width, TILE_H, TILE_W, KERNEL, BOX_ALIGN)
    q = _load_rows(q_ptr + batch * sq_b + head * sq_h, qy, qx, q_ok, sq_y, sq_x, sq_d,
                   HEAD_DIM, BLOCK_D)
    k_base = k_ptr + batch * sk_b + head * sk_h
    v_base = v_ptr + batch * sv_b + head * sv_h
    bias_base = _bias_table_base(rpb_ptr, head, KERNEL, BIAS_SHIFT, COLS)
    # key n of a step: row n // COLS of the step's rows, column n % COLS of the box
    n = tl.arange(0, ROWS * COLS)
    box_row = n // COLS
    box_col = n % COLS
    kx = left + box_col
    # whether a key's column lies in a query's window: the same at every step, computed once
    in_columns = _in_window(kx[None, :] - wx[:, None], span_w) & (box_col < box_w)[None, :] \
        & q_ok[:, None]
    bias_shift = _bias_table_shift(left, qx, KERNEL, BIAS_SHIFT)[:, None]
    m_i = tl.full([TILE_H * TILE_W], NEG, tl.float32)
    l_i = tl.zeros([TILE_H * TILE_W], tl.float32)
    acc = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    for r0 in range(0, box_h, ROWS):
        ky = top + r0 + box_row
        k_ok = (r0 + box_row < box_h) & (box_col < box_w)
        kt = _load_cols(k_base, ky, kx, k_ok, sk_y, sk_x, sk_d, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        valid = in_columns & _in_window(ky[None, :] - wy[:, None], span_h)
        if HAS_RPB:
            s += _table_bias(bias_base, ky[None, :], qy[:, None], bias_shift, box_col[None, :],
                             KERNEL, BIAS_SHIFT, COLS)
        s = tl.where(valid, s * LOG2E, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, ky, kx, k_ok, sv_y, sv_x, sv_d, HEAD_DIM, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    _store_rows(o_ptr + batch * so_b + head * so_h, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
                qy, qx, q_ok, so_y, so_x, so_d, HEAD_DIM, BLOCK_D)
    row = tl.program_id(1).to(tl.int64) * height * width + qy * width + qx
    tl.store(lse_ptr + row, m_i + tl.log2(l_i), mask=q_ok)


@triton.jit
def _dq_element(q_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, batch, q_ok, head, heads, qy, qx,
                height, width, sq_b, sq_h, sq_y, sq_x, sq_d, so_b, so_h, so_y, so_x, so_d,
                sdo_b, sdo_h, sdo_y, sdo_x, sdo_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                LAYOUT_Q: tl.constexpr, LAYOUT_DO: tl.constexpr, ALIGN: tl.constexpr):
    """What the ``dq`` kernel keeps of batch element ``batch`` (int64) for its query tile:
    ``q``, ``dO``, ``delta = rowsum(dO * O)`` (stored for the ``dk``/``dv`` kernel) and the
    log-sum-exp; 0 where not ``q_ok``. ``O``'s strides come known (:func:`_known_strides`)."""
    sq_b, sq_h, sq_y, sq_x, sq_d = _known_strides(sq_b, sq_h, sq_y, sq_x, sq_d, LAYOUT_Q, ALIGN)
    sdo_b, sdo_h, sdo_y, sdo_x, sdo_d = _known_strides(sdo_b, sdo_h, sdo_y, sdo_x, sdo_d,
                                                       LAYOUT_DO, ALIGN)
    q = _load_rows(q_ptr + batch * sq_b + head * sq_h, qy, qx, q_ok, sq_y, sq_x, sq_d, HEAD_DIM,
                   BLOCK_D)
    do = _load_rows(do_ptr + batch * sdo_b + head * sdo_h, qy, qx, q_ok, sdo_y, sdo_x, sdo_d,
                    HEAD_DIM, BLOCK_D)
    o = _load_rows(o_ptr + batch * so_b + head * so_h, qy, qx, q_ok, so_y, so_x, so_d, HEAD_DIM,
                   BLOCK_D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row = (batch * heads + head) * height * width + qy * width + qx
    tl.store(delta_ptr + row, delta, mask=q_ok)
    return q, do, delta, tl.load(lse_ptr + row, mask=q_ok, other=0.0)


@triton.jit
def _dq_step(q, do, delta, lse, k_base, v_base, ky, kx, k_ok, column, wy, span_h, span_w, bias,
             sk_y, sk_x, sk_d, sv_y, sv_x, sv_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """One batch element's ``dS = P (dO V^T - delta)`` against the keys of box row ``ky`` at
    columns ``kx`` (biased by ``bias``), its ``dS K`` and the flags of the pairs in a window."""
    kt, s, valid = _key_row(q, k_base, ky, kx, k_ok, column, wy, span_h, span_w, bias, sk_y,
                            sk_x, sk_d, HEAD_DIM, BLOCK_D, DOT_PRECISION)
    p = tl.exp2(s - lse[:, None])
    vt = _load_cols(v_base, ky, kx, k_ok, sv_y, sv_x, sv_d, HEAD_DIM, BLOCK_D)
    ds = p * (tl.dot(do, vt, input_precision=DOT_PRECISION) - delta[:, None])
    return ds, tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION), valid


@jit_with_runtime_ints(_RUNTIME_INTS)
def _na_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, rpb_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, g_ptr,
                      batch_size, batches_per_group, heads, height, width,
                      sq_b, sq_h, sq_y, sq_x, sq_d, sk_b, sk_h, sk_y, sk_x, sk_d,
                      sv_b, sv_h, sv_y, sv_x, sv_d, so_b, so_h, so_y, so_x, so_d,
                      sdo_b, sdo_h, sdo_y, sdo_x, sdo_d,
                      HEAD_DIM: tl.constexpr, KERNEL: tl.constexpr, HAS_RPB: tl.constexpr,
                      STORE_G: tl.constexpr, PAIRS: tl.constexpr,
                      TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      LAYOUT_Q: tl.constexpr, LAYOUT_K: tl.constexpr, LAYOUT_V: tl.constexpr,
                      LAYOUT_O: tl.constexpr, LAYOUT_DO: tl.constexpr, ALIGN: tl.constexpr,
                      WIDTH_ALIGN: tl.constexpr, BOX_ALIGN: tl.constexpr,
                      BIAS_SHIFT: tl.constexpr, BIAS_COLS: tl.constexpr):
    """``delta`` and ``dq`` of a query tile for the batch elements of group ``program_id(2)``,
    two at a time if ``PAIRS`` (the second masked past the group's end); ``O`` and ``dq``
    share the strides ``so_*``. With ``STORE_G``, ``dS`` per (query, window position) into
    ``G``, summed over the group's batch elements: the first step of the group writes it, the
    others add to it. Alignment as the forward's (:func:`_na_fwd_kernel`); ``q``'s and ``dO``'s
    strides are made known where they are read (:func:`_dq_element`). ``rpb_ptr``: the bias
    as :func:`bias_table` holds it, ``BIAS_COLS`` columns a row (a multiple of ``BLOCK_N``)."""
    sk_b, sk_h, sk_y, sk_x, sk_d = _known_strides(sk_b, sk_h, sk_y, sk_x, sk_d, LAYOUT_K, ALIGN)
    sv_b, sv_h, sv_y, sv_x, sv_d = _known_strides(sv_b, sv_h, sv_y, sv_x, sv_d, LAYOUT_V, ALIGN)
    so_b, so_h, so_y, so_x, so_d = _known_strides(so_b, so_h, so_y, so_x, so_d, LAYOUT_O, ALIGN)
    width = aligned(width, WIDTH_ALIGN)
    head = tl.program_id(1)
    group = tl.program_id(2)
    qy, qx, q_ok, wy, wx, top, left, box_h, box_w, span_h, span_w = _query_tile(
        height, width, TILE_H, TILE_W, KERNEL, BOX_ALIGN)
    bias_base = _bias_table_base(rpb_ptr, head, KERNEL, BIAS_SHIFT, BIAS_COLS)
    bias_shift = _bias_table_shift(left, qx, KERNEL, BIAS_SHIFT)[:, None]
    g_rows = ((head * tl.num_programs(2) + group).to(tl.int64) * height * width + qy * width + qx) \
        * KERNEL * KERNEL
    first = group * batches_per_group
    last = tl.minimum(first + batches_per_group, batch_size)
    for batch in range(first, last, 2 if PAIRS else 1):
        b0 = tl.cast(batch, tl.int64)
        q0, do0, delta0, lse0 = _dq_element(
            q_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, b0, q_ok, head, heads, qy, qx, height, width,
            sq_b, sq_h, sq_y, sq_x, sq_d, so_b, so_h, so_y, so_x, so_d, sdo_b, sdo_h, sdo_y, sdo_x,
            sdo_d, HEAD_DIM, BLOCK_D, LAYOUT_Q, LAYOUT_DO, ALIGN)
        k0 = k_ptr + b0 * sk_b + head * sk_h
        v0 = v_ptr + b0 * sv_b + head * sv_h
        dq0 = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
        if PAIRS:
            # the pair's second element: the group's last where there is none (its loads masked)
            has_b1 = batch + 1 < last
            b1 = tl.cast(tl.minimum(batch + 1, last - 1), tl.int64)
            q1, do1, delta1, lse1 = _dq_element(
                q_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, b1, q_ok & has_b1, head, heads, qy, qx,
                height, width, sq_b, sq_h, sq_y, sq_x, sq_d, so_b, so_h, so_y, so_x, so_d, sdo_b,
                sdo_h, sdo_y, sdo_x, sdo_d, HEAD_DIM, BLOCK_D, LAYOUT_Q, LAYOUT_DO, ALIGN)
            k1 = k_ptr + b1 * sk_b + head * sk_h
            v1 = v_ptr + b1 * sv_b + head * sv_h
            dq1 = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
        for c0 in range(0, box_w, BLOCK_N):
            kx, k_ok, column = _key_columns(left, c0, box_w, wx, q_ok, BLOCK_N)
            for ky in range(top, top + box_h):
                bias = 0.0
                if HAS_RPB:
                    bias = _table_bias(bias_base, ky, qy[:, None], bias_shift,
                                       (c0 + tl.arange(0, BLOCK_N))[None, :], KERNEL, BIAS_SHIFT,
                                       BIAS_COLS)
                ds, dq_step, valid = _dq_step(
                    q0, do0, delta0, lse0, k0, v0, ky, kx, k_ok, column, wy, span_h, span_w,
                    bias, sk_y, sk_x, sk_d, sv_y, sv_x, sv_d, HEAD_DIM, BLOCK_D, DOT_PRECISION)
                dq0 += dq_step
                if PAIRS:  # (dS of a missing element is 0: its dO and delta are)
                    ds1, dq_step1, _ = _dq_step(
                        q1, do1, delta1, lse1, k1, v1, ky, kx, k_ok & has_b1, column, wy, span_h,
                        span_w, bias, sk_y, sk_x, sk_d, sv_y, sv_x, sv_d, HEAD_DIM, BLOCK_D,
                        DOT_PRECISION)
                    dq1 += dq_step1
                    ds += ds1
                if STORE_G:
                    g = g_ptr + (g_rows + (ky - wy) * KERNEL)[:, None] + column
                    if batch > first:
                        ds += tl.load(g, mask=valid, other=0.0)
                    tl.store(g, ds, mask=valid)
        _store_rows(dq_ptr + b0 * so_b + head * so_h, dq0.to(dq_ptr.dtype.element_ty), qy, qx,
                    q_ok, so_y, so_x, so_d, HEAD_DIM, BLOCK_D)
        if PAIRS:
            _store_rows(dq_ptr + b1 * so_b + head * so_h, dq1.to(dq_ptr.dtype.element_ty), qy, qx,
                        q_ok & has_b1, so_y, so_x, so_d, HEAD_DIM, BLOCK_D)


@jit_with_runtime_ints(_RUNTIME_INTS)
def _na_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, rpb_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                        heads, height, width,
                        sq_b, sq_h, sq_y, sq_x, sq_d, sk_b, sk_h, sk_y, sk_x, sk_d,
                        sv_b, sv_h, sv_y, sv_x, sv_d, so_b, so_h, so_y, so_x, so_d,
                        sdo_b, sdo_h, sdo_y, sdo_x, sdo_d,
                        HEAD_DIM: tl.constexpr, KERNEL: tl.constexpr, HAS_RPB: tl.constexpr,
                        TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        LAYOUT_Q: tl.constexpr, LAYOUT_K: tl.constexpr, LAYOUT_V: tl.constexpr,
                        LAYOUT_O: tl.constexpr, LAYOUT_DO: tl.constexpr, ALIGN: tl.constexpr,
                        WIDTH_ALIGN: tl.constexpr, BOX_ALIGN: tl.constexpr):
    """``dk``, ``dv`` of a tile of keys, both with the strides ``so_*``. Alignment as the
    forward's (:func:`_na_fwd_kernel`), the box of queries widened."""
    sq_b, sq_h, sq_y, sq_x, sq_d = _known_strides(sq_b, sq_h, sq_y, sq_x, sq_d, LAYOUT_Q, ALIGN)
    sk_b, sk_h, sk_y, sk_x, sk_d = _known_strides(sk_b, sk_h, sk_y, sk_x, sk_d, LAYOUT_K, ALIGN)
    sv_b, sv_h, sv_y, sv_x, sv_d = _known_strides(sv_b, sv_h, sv_y, sv_x, sv_d, LAYOUT_V, ALIGN)
    so_b, so_h, so_y, so_x, so_d = _known_strides(so_b, so_h, so_y, so_x, so_d, LAYOUT_O, ALIGN)
    sdo_b, sdo_h, sdo_y, sdo_x, sdo_d = _known_strides(sdo_b, sdo_h, sdo_y, sdo_x, sdo_d,
                                                       LAYOUT_DO, ALIGN)
    width = aligned(width, WIDTH_ALIGN)
    batch, head = _batch_and_head(heads)
    ky, kx, k_ok, y0, x0 = _tile(height, width, TILE_H, TILE_W)
    span_h, span_w = _spans(height, width, KERNEL)
    top = _inverse_start(y0, span_h, KERNEL // 2)
    bottom = _inverse_end(tl.minimum(y0 + TILE_H, height) - 1, height, span_h, KERNEL // 2)
    left, right = _widened(
        _inverse_start(x0, span_w, KERNEL // 2),
        _inverse_end(tl.minimum(x0 + TILE_W, width) - 1, width, span_w, KERNEL // 2), BOX_ALIGN)
    k = _load_rows(k_ptr + batch * sk_b + head * sk_h, ky, kx, k_ok, sk_y, sk_x, sk_d,
                   HEAD_DIM, BLOCK_D)
    v = _load_rows(v_ptr + batch * sv_b + head * sv_h, ky, kx, k_ok, sv_y, sv_x, sv_d,
                   HEAD_DIM, BLOCK_D)
    q_base = q_ptr + batch * sq_b + head * sq_h
    do_base = do_ptr + batch * sdo_b + head * sdo_h
    rows = tl.program_id(1).to(tl.int64) * height * width
    rpb_base = rpb_ptr + head * (2 * KERNEL - 1) * (2 * KERNEL - 1)
    dk = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    dv = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    for c0 in range(left, right, BLOCK_M):
        qx = c0 + tl.arange(0, BLOCK_M)
        q_ok = qx < right
        wx = _window_start(qx, width, span_w, KERNEL // 2)
        column = _window_columns(kx[:, None], wx[None, :], k_ok[:, None] & q_ok[None, :])
        for qy in range(top, bottom):
            wy = _window_start(qy, height, span_h, KERNEL // 2)
            qt = _load_cols(q_base, qy, qx, q_ok, sq_y, sq_x, sq_d, HEAD_DIM, BLOCK_D)
            do_t = _load_cols(do_base, qy, qx, q_ok, sdo_y, sdo_x, sdo_d, HEAD_DIM, BLOCK_D)
            lse = tl.load(lse_ptr + rows + qy * width + qx, mask=q_ok, other=0.0)
            delta = tl.load(delta_ptr + rows + qy * width + qx, mask=q_ok, other=0.0)
            st, _ = _scores(tl.dot(k, qt, input_precision=DOT_PRECISION), column, span_w,
                            ((ky >= wy) & (ky < wy + span_h))[:, None],
                            _bias_offset(qy, qx[None, :], ky[:, None], wx[None, :], KERNEL),
                            rpb_base, HAS_RPB)
            pt = tl.exp2(st - lse[None, :])
            dv += tl.dot(pt.to(do_t.dtype), tl.trans(do_t), input_precision=DOT_PRECISION)
            dst = pt * (tl.dot(v, do_t, input_precision=DOT_PRECISION) - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
    _store_rows(dk_ptr + batch * so_b + head * so_h, dk.to(dk_ptr.dtype.element_ty), ky, kx, k_ok,
                so_y, so_x, so_d, HEAD_DIM, BLOCK_D)
    _store_rows(dv_ptr + batch * so_b + head * so_h, dv.to(dv_ptr.dtype.element_ty), ky, kx, k_ok,
                so_y, so_x, so_d, HEAD_DIM, BLOCK_D)


G_BUDGET = 1 << 24  # float32 elements of the bias-gradient buffer G


def _batches_per_group(batch: int, per_group: int) -> int:
    """Batch elements a ``dq`` program takes in turn where it writes the bias gradient's
    ``G``: as few as keep ``G`` (``per_group`` elements a group) within :data:`G_BUDGET`, in
    pairs (two summed in registers before ``G`` is written: SegMAN-L's stage-1 ``dq`` 1189 ->
    855 us on an H200, docs/benchmarks.md)."""
    fewest = math.ceil(batch / max(1, min(batch, G_BUDGET // per_group)))
    return min(batch, fewest + fewest % 2)


def box_columns(tile_w: int, kernel_size: int) -> int:
    """Columns a step that hold a row of the box of a tile ``tile_w`` wide away from the
    map's borders (``tile_w + k - 1``, as a power of two of at least 16, the least that
    ``tl.dot`` takes)."""
    return max(16, next_power_of_2(tile_w + kernel_size - 1))


FORWARD_STAGES = 3  # the forward's pipeline depth: 2 -> 3 took SegMAN-L's 6-12% less (H200)


def block_sizes(head_dim: int, kernel_size: int) -> Tuple[Blocks, Blocks, Blocks]:
    """Launch shapes of the forward, ``dq`` and ``dk``/``dv`` kernels (4 warps; a whole row
    of the box a step; :data:`FORWARD_STAGES` stages in the forward, 2 in the backward): 8 x 8
    tiles where a row of the box fits 16 columns (windows up to 9), else 4 x 16.

    Chosen by ``tools/gpu_checks/check_neighborhood_attention.py --sweep`` on an H100 (bf16,
    SegMAN-L's stages 1-3 at 512x512, batch 16); the forward's in the twenty-second session
    (one row a step, 4 x 16 rather than 8 x 16 for windows of 11) and its stages in the
    thirty-fourth, once its loads were aligned (docs/benchmarks.md).
    """
    tiles = ((8, 8),) * 3 if box_columns(8, kernel_size) == 16 else ((4, 16),) * 3
    return tuple(Blocks(h, w, box_columns(w, kernel_size), 4, FORWARD_STAGES if kind == 0 else 2)
                 for kind, (h, w) in enumerate(tiles))


def forward_step(blocks: Blocks, kernel_size: int) -> dict:
    """The forward's ``ROWS`` and ``COLS``: ``blocks.columns`` keys a step as whole rows of the
    box (:func:`box_columns`); a ValueError where they are not."""
    row = box_columns(blocks.tile_w, kernel_size)
    if blocks.columns % row:
        raise ValueError(f'the forward takes whole rows of its box a step: {blocks.columns} keys '
                         f'a step for tiles {blocks.tile_w} wide and windows of {kernel_size} '
                         f'must be a multiple of {row}')
    return dict(ROWS=blocks.columns // row, COLS=row)


def layout(t: Tensor) -> int:
    """:data:`HEAD_VECTORS` where ``t (B, heads, H, W, d)`` has contiguous head vectors,
    :data:`PLANES` where its rows of pixels are, else :data:`OTHER_LAYOUT`."""
    if t.stride(-1) == 1:
        return HEAD_VECTORS.value
    return PLANES.value if t.stride(-2) == 1 else OTHER_LAYOUT.value


def _unit_axis(layout_code: int) -> int:
    return -1 if layout_code == HEAD_VECTORS.value else -2


@functools.lru_cache(maxsize=1024)
def _widening_is_free(width: int, tile_w: int, kernel_size: int, columns: int, align: int,
                      inverse: bool) -> bool:
    """Whether every tile's box on a map ``width`` wide (of keys, :func:`_query_box`; of
    queries with ``inverse``, as the ``dk``/``dv`` kernel walks them), widened to multiples
    of ``align`` (:func:`_widened`), takes as many steps of ``columns`` as before, and one
    at most where it took one (the forward takes a box in one step). The boxes by the
    kernels' own rules, in plain Python (this runs under fake tensors too, where
    :func:`~.neighborhood_attention.window_starts` has no values)."""
    span, radius = min(kernel_size, width), kernel_size // 2

    def box(x0: int) -> Tuple[int, int]:
        last = min(x0 + tile_w, width) - 1
        if inverse:  # _inverse_start, _inverse_end
            return (0 if x0 - span + 1 <= 0 else x0 - span + 1 + radius,
                    width if last >= width - span else last + radius + 1)
        start = [min(max(i - radius, 0), width - span) for i in (x0, last)]  # _window_start
        return start[0], start[1] + span

    for x0 in range(0, width, tile_w):
        left, right = box(x0)
        widened = -(-right // align) * align - left // align * align
        if -(-widened // columns) > max(1, -(-(right - left) // columns)):
            return False
    return True


@functools.lru_cache(maxsize=256)
def _launch_alignment(tile_w: int, kernel_size: int, columns: int, inverse: bool) -> int:
    """The one alignment a launch shape loads rows of planes with: the largest of 8, 4, 2
    with which boxes widened on a wide map take no more steps (one value a launch shape, so
    that a kernel compiles at most twice over all map sizes: with it and with 1)."""
    return next((align for align in (ALIGNMENT, 4, 2) if _widening_is_free(
        64 * tile_w, tile_w, kernel_size, columns, align, inverse)), 1)


def load_alignment(tensors: Dict[str, Tensor], rows: Sequence[str], kernel_size: int,
                   tile_w: int, columns: int,
                   inverse: bool = False) -> Tuple[Dict[str, int], Dict[str, int]]:
    """The alignment constexprs of a launch on the ``(B, heads, H, W, d)`` tensors named in
    ``tensors`` (``LAYOUT_<name>``, :func:`layout`; ``ALIGN``, ``WIDTH_ALIGN`` and
    ``BOX_ALIGN``, :func:`_known_strides` and :func:`_widened`) whose kernel loads the
    ``rows`` tensors along the rows of its tiles' boxes, ``columns`` a step (of queries with
    ``inverse``). ``ALIGN``: where a ``rows`` tensor holds planes, the launch shape's own
    (:func:`_launch_alignment`; then ``BOX_ALIGN`` is ``ALIGN``), else the largest of 8, 4, 2
    that divides every stride of each tensor but its unit one and, where one holds planes,
    the map's width (then ``WIDTH_ALIGN`` is ``ALIGN``), and with which no box of this map
    widened to its multiples takes more steps (:func:`_widening_is_free`); else 1. In
    elements: ``ALIGN`` 4 lets a bfloat16 row move 8 bytes a load. Returns the launch's
    constexprs, and the alignment constexprs of its other variant, which
    :func:`~.triton_jit.launch` compiles at the kernel's first launch (two a kernel over all
    map sizes)."""
    codes = {f'LAYOUT_{name}': layout(t) for name, t in tensors.items()}
    width = next(iter(tensors.values())).shape[3]
    planes = PLANES.value in codes.values()
    box = any(codes[f'LAYOUT_{name}'] == PLANES.value for name in rows)
    strides = [s for t, code in zip(tensors.values(), codes.values()) if code != OTHER_LAYOUT.value
               for axis, s in enumerate(t.stride()) if axis != t.dim() + _unit_axis(code)]
    candidates = (_launch_alignment(tile_w, kernel_size, columns, inverse),) if box else \
        (ALIGNMENT, 4, 2)

    def variant(align: int) -> Dict[str, int]:
        return dict(ALIGN=align, WIDTH_ALIGN=align if planes else 1, BOX_ALIGN=align if box else 1)

    for align in candidates:
        if align > 1 and not (any(s % align for s in strides) or (planes and width % align) or (
                box and not _widening_is_free(width, tile_w, kernel_size, columns, align,
                                              inverse))):
            return dict(codes, **variant(align)), variant(1)
    return dict(codes, **variant(1)), variant(candidates[0])


def _head_block(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _launch(blocks: Blocks) -> dict:
    return dict(TILE_H=blocks.tile_h, TILE_W=blocks.tile_w, num_warps=blocks.num_warps,
                num_stages=blocks.num_stages)


def _tiles(height: int, width: int, blocks: Blocks) -> int:
    return cdiv(height, blocks.tile_h) * cdiv(width, blocks.tile_w)


def _common(q: Tensor, kernel_size: int, rpb: Optional[Tensor]) -> dict:
    return dict(HEAD_DIM=q.shape[-1], KERNEL=kernel_size, HAS_RPB=rpb is not None,
                BLOCK_D=_head_block(q.shape[-1]), DOT_PRECISION=dot_precision(q.dtype))


def bias_shift(tile_w: int) -> int:
    """The forward's ``BIAS_SHIFT``: how far a box's left column may lie left of a query
    column less ``k - 1`` (the tile's width and the widening by :func:`_widened`, at most
    ``ALIGNMENT - 1``, less one each)."""
    return ALIGNMENT + tile_w - 2


@tensor_cache(maxsize=64)
def _bias_table_index(kernel_size: int, tile_w: int, columns: int, device: torch.device) -> Tensor:
    """Indices into ``rpb[h].flatten()`` of :func:`bias_table`'s entries: row ``dy``, shift
    ``e``, column ``c`` holds ``rpb[h, dy, c + e - BIAS_SHIFT]``, clamped into the table where
    out of range (those entries serve only pairs outside every window, which are masked)."""
    width = 2 * kernel_size - 1
    shift = bias_shift(tile_w)
    dy = torch.arange(width, device=device)[:, None, None]
    dx = torch.arange(kernel_size + shift, device=device)[None, :, None] \
        + torch.arange(columns, device=device)[None, None, :] - shift
    return (dy * width + dx.clamp(0, width - 1)).flatten()


def bias_table(rpb: Tensor, kernel_size: int, tile_w: int, columns: int) -> Tensor:
    """``rpb (heads, 2k-1, 2k-1)`` as the forward and ``dq`` read it for query tiles
    ``tile_w`` wide: for each bias row ``dy`` and each offset ``e = left - qx + k - 1 +
    BIAS_SHIFT`` of a query column ``qx`` from its box's left column, the biases of the box's
    first ``columns`` columns in a row (``(heads, 2k-1, k + BIAS_SHIFT, columns)``,
    flattened; no gradient). A step's bias is then a row of contiguous values a (query, box
    row) pair, which Triton loads 16 bytes at a time without masks, where gathering them
    from ``rpb`` took a load a pair (docs/benchmarks.md)."""
    index = _bias_table_index(kernel_size, tile_w, columns, rpb.device)
    return rpb.detach().reshape(rpb.shape[0], -1).index_select(1, index)


def _check_bias_table(table: Optional[Tensor], heads: int, kernel_size: int, tile_w: int,
                      columns: int) -> None:
    size = heads * (2 * kernel_size - 1) * (kernel_size + bias_shift(tile_w)) * columns
    if table is None or table.numel() != size or not table.is_contiguous():
        raise ValueError(f'the bias table must be bias_table(rpb, {kernel_size}, {tile_w}, '
                         f'{columns}) ({size} contiguous values), got '
                         f'{None if table is None else tuple(table.shape)}')


def _na2d_forward_impl(q: Tensor, k: Tensor, v: Tensor, rpb: Optional[Tensor],
                      table: Optional[Tensor], kernel_size: int,
                      blocks: List[int]) -> Tuple[Tensor, Tensor]:
    """Output ``(B, heads, H, W, d)`` (``q``'s dtype, laid out by
    :func:`~.triton_jit.empty_channels_first`) and the base-2 log-sum-exp ``(B, heads, H, W)``
    float32 of every query; ``table``: ``rpb`` as :func:`bias_table` (``rpb`` itself is
    taken for the backward)."""
    batch, heads, height, width, _ = q.shape
    fwd = Blocks(*blocks[:5])
    out = empty_channels_first(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    step = forward_step(fwd, kernel_size)
    alignment, other = load_alignment(dict(Q=q, K=k, V=v, O=out), 'KV', kernel_size, fwd.tile_w,
                                      step['COLS'])
    if rpb is not None:
        _check_bias_table(table, heads, kernel_size, fwd.tile_w, step['COLS'])
    launch(_na_fwd_kernel, (_tiles(height, width, fwd), batch * heads),
           q, k, v, q if rpb is None else table, out, lse, heads, height, width,
           *q.stride(), *k.stride(), *v.stride(), *out.stride(),
           **step, **_common(q, kernel_size, rpb), **_launch(fwd),
           **alignment, BIAS_SHIFT=bias_shift(fwd.tile_w), other_alignment=other)
    return out, lse


def _na2d_forward_fake(q, k, v, rpb, table, kernel_size, blocks):
    return empty_channels_first(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@tensor_cache(maxsize=256)
def _window_class_one_hot(length: int, kernel_size: int, device: torch.device) -> Tensor:
    """``(length, k)`` float32: query ``i`` in class ``start(i) - i + k - 1``, the bias row of
    its window's first key."""
    i = torch.arange(length, device=device)
    start = (i - kernel_size // 2).clamp(min=0).clamp(max=length - min(kernel_size, length))
    return F.one_hot(start - i + kernel_size - 1, kernel_size).float()


@tensor_cache(maxsize=16)
def _bias_fold_matrix(kernel_size: int, device: torch.device) -> Tensor:
    """``(k**4, (2k-1)**2)`` float32 one-hot: row ``(i', j', a, b)`` (a window class and a
    position in the window) picks the bias ``(i' + a, j' + b)``."""
    c = torch.arange(kernel_size, device=device)
    rows = c[:, None, None, None] + c[None, None, :, None]
    cols = c[None, :, None, None] + c[None, None, None, :]
    return F.one_hot((rows * (2 * kernel_size - 1) + cols).reshape(-1),
                     (2 * kernel_size - 1) ** 2).float()


def _fold_bias_grad(g: Tensor, kernel_size: int) -> Tensor:
    """``(heads, 2k-1, 2k-1)`` from ``G (heads, groups, H, W, k, k)``: queries are summed over
    the groups and within their (row class, column class) by two matrix products, then each
    class's ``k x k`` window is added at its offset by a third (:func:`_bias_fold_matrix`;
    ``F.fold`` of the 2028 biases of SegMAN-L's stage 3 took 31 us on an H100,
    docs/benchmarks.md)."""
    heads, groups, height, width, k, _ = g.shape
    rows = _window_class_one_hot(height, k, g.device).t().repeat(1, groups)  # (k, groups * H)
    cols = _window_class_one_hot(width, k, g.device).t()  # (k, W)
    g = rows @ g.reshape(heads, groups * height, width * k * k)  # (heads, i', (W, a, b))
    g = cols @ g.reshape(heads * k, width, k * k)  # (heads * i', j', (a, b))
    table = g.reshape(heads, k ** 4) @ _bias_fold_matrix(k, g.device)
    return table.view(heads, 2 * k - 1, 2 * k - 1)


def _na2d_backward_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, rpb: Optional[Tensor],
                       out: Tensor, lse: Tensor, kernel_size: int, rpb_grad: bool,
                       blocks: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dq``, ``dk``, ``dv`` (laid out as ``out``, dtypes of q, k, v) and ``d rpb`` (``rpb``'s
    dtype, or an empty tensor unless ``rpb_grad``)."""
    batch, heads, height, width, _ = q.shape
    dq_blocks, dkdv_blocks = Blocks(*blocks[5:10]), Blocks(*blocks[10:15])
    # out, dq, dk, dv: one layout, one set of strides
    dq, dk, dv = (empty_channels_first(t) for t in (q, k, v))
    delta = torch.empty_like(lse)
    store_g = rpb is not None and rpb_grad
    batches_per_group = _batches_per_group(batch, heads * height * width * kernel_size ** 2) \
        if store_g else 1
    groups = math.ceil(batch / batches_per_group)
    # every element is written but where a window is cut to a short axis
    covered = min(height, width) >= kernel_size
    g = (torch.empty if covered else torch.zeros)(
        heads, groups if store_g else 0, height, width, kernel_size, kernel_size,
        dtype=torch.float32, device=q.device)
    common = _common(q, kernel_size, rpb)
    rpb_arg = q if rpb is None else rpb
    # the table's rows cover the box's columns in whole steps (powers of two)
    bias_columns = max(box_columns(dq_blocks.tile_w, kernel_size), dq_blocks.columns)
    alignment, other = load_alignment(dict(Q=q, K=k, V=v, O=out, DO=grad_out), 'KV',
                                      kernel_size, dq_blocks.tile_w, dq_blocks.columns)
    launch(_na_bwd_dq_kernel, (_tiles(height, width, dq_blocks), heads, groups),
           q, k, v, q if rpb is None else bias_table(rpb, kernel_size, dq_blocks.tile_w,
                                                     bias_columns),
           out, grad_out, lse, delta, dq, g, batch, batches_per_group, heads,
           height, width, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
           *grad_out.stride(), STORE_G=store_g, PAIRS=batches_per_group > 1,
           BLOCK_N=dq_blocks.columns, **common, **_launch(dq_blocks),
           BIAS_SHIFT=bias_shift(dq_blocks.tile_w), BIAS_COLS=bias_columns,
           **alignment, other_alignment=other)
    alignment, other = load_alignment(dict(Q=q, K=k, V=v, O=dk, DO=grad_out), ('Q', 'DO'),
                                      kernel_size, dkdv_blocks.tile_w, dkdv_blocks.columns,
                                      inverse=True)
    launch(_na_bwd_dkdv_kernel, (_tiles(height, width, dkdv_blocks), batch * heads),
           q, k, v, rpb_arg, grad_out, lse, delta, dk, dv, heads, height, width,
           *q.stride(), *k.stride(), *v.stride(), *dk.stride(), *grad_out.stride(),
           BLOCK_M=dkdv_blocks.columns, **common, **_launch(dkdv_blocks),
           **alignment, other_alignment=other)
    drpb = _fold_bias_grad(g, kernel_size).to(rpb.dtype) if store_g else q.new_empty(0)
    return dq, dk, dv, drpb


def _na2d_backward_fake(grad_out, q, k, v, rpb, out, lse, kernel_size, rpb_grad, blocks):
    drpb = rpb.new_empty(rpb.shape) if rpb is not None and rpb_grad else q.new_empty(0)
    return empty_channels_first(q), empty_channels_first(k), empty_channels_first(v), drpb


def _setup_context(ctx, inputs, output):
    """What the backward needs, for the custom op and the eager Function alike."""
    q, k, v, rpb, _, kernel_size, blocks = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, rpb, out, lse)
    ctx.kernel_size, ctx.blocks = kernel_size, blocks
    ctx.rpb_grad = rpb is not None and ctx.needs_input_grad[3]


def _gradients(forward: Callable, backward: Callable) -> Callable:
    """The autograd backward that computes the gradients with ``backward`` (the forward is
    not recomputed)."""

    def gradients(ctx, grad_out, grad_lse):
        # saved_tensors is unpacked once: checkpointing (with_cp) forbids a second unpack
        q, k, v, rpb, out, lse = ctx.saved_tensors
        dq, dk, dv, drpb = backward(grad_out, q, k, v, rpb, out, lse, ctx.kernel_size,
                                    ctx.rpb_grad, ctx.blocks)
        return dq, dk, dv, drpb if ctx.rpb_grad else None, None, None, None

    return gradients


NA2D = TritonAutogradOp('na2d', _na2d_forward_impl, _na2d_forward_fake, _na2d_backward_impl,
                        _na2d_backward_fake, _setup_context, _gradients)


def neighborhood_attention_triton(q: Tensor, k: Tensor, v: Tensor, kernel_size: int,
                                  rpb: Optional[Tensor] = None,
                                  blocks: Optional[Tuple[Blocks, Blocks, Blocks]] = None) -> Tensor:
    """Fused neighborhood attention; arguments as :func:`neighborhood_attention_2d`.

    ``q``, ``k``, ``v`` share one dtype (float32, bfloat16 or float16) and may have any
    strides. ``blocks``: launch shapes of the forward, ``dq`` and ``dk``/``dv`` kernels
    (default :func:`block_sizes`). Returns ``(B, heads, H, W, d)`` laid out as
    ``(B, heads, d, H, W)``, through :data:`NA2D`.
    """
    blocks = blocks or block_sizes(q.shape[-1], kernel_size)
    launch = [n for b in blocks for n in b]
    records = records_autograd(q, k, v, rpb)
    table = None
    if rpb is not None:
        geometry = (kernel_size, blocks[0].tile_w, box_columns(blocks[0].tile_w, kernel_size))
        # kept at inference; in training rpb changes at every step (and a training graph's
        # replays would read a kept table in place)
        table = bias_table(rpb, *geometry) if records else \
            kept(rpb, ('bias_table', *geometry), lambda t: bias_table(t, *geometry))
    return NA2D(q, k, v, rpb, table, kernel_size, launch, records=records)[0]
