"""Triton backend of :func:`mmseg_segman.ops.selective_scan.selective_scan` (state size 1).

Layout: ``u``, ``delta`` ``(B, G*D, L)``; ``B``, ``C`` ``(B, G, 1, L)``; ``A`` ``(G*D, 1)``.
One program owns ``BLOCK_D`` channels of one batch element and walks the sequence in tiles of
``BLOCK_L`` steps. Inside a tile the recurrence ``h_t = a_t h_{t-1} + b_t`` is one
``tl.associative_scan`` over ``(a, b)`` pairs; the state is carried between tiles. softplus,
``exp(dt * A)`` and the skip term are fused; everything is computed in float32.

The forward pass stores ``h`` (float32, the size of ``u``). The backward pass walks the tiles
from the end, reading each tile in reversed order, so the adjoint recurrence
``g_t = a_{t+1} g_{t+1} + C_t dy_t`` is again a forward scan. ``a_t h_{t-1}`` is computed from
``h_{t-1}`` read back (not as ``h_t - b_t``, which cancels when ``a_t`` is small and leaves
rounding noise in ``dA`` where it should be exactly zero, as at ``t = 0``). Per-channel sums
(dA, dD, d delta_bias) are reduced inside the program, then over the batch in PyTorch; dB and
dC are written per channel and summed over each group's channels in PyTorch.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_D = 16
BLOCK_L = 64


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
def _program_rows(a_ptr, d_ptr, bias_ptr, channels, length, group_channels, groups,
                  BLOCK_D: tl.constexpr):
    """The program's batch element and channels, their parameters and the offsets of their
    rows in the ``(B, G*D, L)`` and ``(B, G, 1, L)`` tensors."""
    batch = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ch_ok = ch < channels
    A, D, bias = _load_channel_params(a_ptr, d_ptr, bias_ptr, ch, ch_ok)
    row = (batch * channels + ch)[:, None] * length
    group_row = (batch * groups + ch // group_channels)[:, None] * length
    return batch, ch, ch_ok, A, D, bias, row, group_row


@triton.jit
def _scan_fwd_kernel(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr, y_ptr, h_ptr,
                     channels, length, group_channels, groups,
                     BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    batch, ch, ch_ok, A, D, bias, row, group_row = _program_rows(
        a_ptr, d_ptr, bias_ptr, channels, length, group_channels, groups, BLOCK_D)
    steps = tl.arange(0, BLOCK_L)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, length, BLOCK_L):
        pos = start + steps[None, :]
        ok = ch_ok[:, None] & (pos < length)
        u = tl.load(u_ptr + row + pos, mask=ok, other=0.0).to(tl.float32)
        dt = _softplus(tl.load(delta_ptr + row + pos, mask=ok, other=0.0).to(tl.float32) + bias)
        Bt = tl.load(b_ptr + group_row + pos, mask=ok, other=0.0).to(tl.float32)
        Ct = tl.load(c_ptr + group_row + pos, mask=ok, other=0.0).to(tl.float32)
        decay = tl.where(ok, tl.exp(dt * A), 1.0)
        h, carry = _scan_tile(decay, dt * Bt * u, carry, BLOCK_L)
        tl.store(h_ptr + row + pos, h, mask=ok)
        tl.store(y_ptr + row + pos, Ct * h + D * u, mask=ok)


@triton.jit
def _scan_bwd_kernel(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr, h_ptr, dy_ptr,
                     du_ptr, ddelta_ptr, db_ptr, dc_ptr, da_ptr, dd_ptr, dbias_ptr,
                     channels, length, group_channels, groups,
                     BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    batch, ch, ch_ok, A, D, bias, row, group_row = _program_rows(
        a_ptr, d_ptr, bias_ptr, channels, length, group_channels, groups, BLOCK_D)
    steps = tl.arange(0, BLOCK_L)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    dA = tl.zeros([BLOCK_D], dtype=tl.float32)
    dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    num_tiles = tl.cdiv(length, BLOCK_L)
    for tile in range(0, num_tiles):
        pos = (num_tiles - tile) * BLOCK_L - 1 - steps[None, :]  # the tile, last step first
        ok = ch_ok[:, None] & (pos < length)
        nxt_ok = ch_ok[:, None] & (pos + 1 < length)
        u = tl.load(u_ptr + row + pos, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(delta_ptr + row + pos, mask=ok, other=0.0).to(tl.float32) + bias
        dt = _softplus(z)
        z_next = tl.load(delta_ptr + row + pos + 1, mask=nxt_ok, other=0.0).to(tl.float32) + bias
        decay_next = tl.where(nxt_ok, tl.exp(_softplus(z_next) * A), 0.0)
        Bt = tl.load(b_ptr + group_row + pos, mask=ok, other=0.0).to(tl.float32)
        Ct = tl.load(c_ptr + group_row + pos, mask=ok, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + row + pos, mask=ok, other=0.0)
        h_prev = tl.load(h_ptr + row + pos - 1, mask=ok & (pos >= 1), other=0.0)
        dy = tl.load(dy_ptr + row + pos, mask=ok, other=0.0).to(tl.float32)
        g, carry = _scan_tile(decay_next, Ct * dy, carry, BLOCK_L)

        decayed_prev = tl.exp(dt * A) * h_prev  # a_t h_{t-1}, zero at t = 0
        dz = tl.where(ok, g * (Bt * u + A * decayed_prev) * tl.sigmoid(z), 0.0)
        tl.store(du_ptr + row + pos, dy * D + g * dt * Bt, mask=ok)
        tl.store(ddelta_ptr + row + pos, dz, mask=ok)
        tl.store(db_ptr + row + pos, g * dt * u, mask=ok)
        tl.store(dc_ptr + row + pos, dy * h, mask=ok)
        dA += tl.sum(tl.where(ok, g * decayed_prev * dt, 0.0), axis=1)
        dD += tl.sum(dy * u, axis=1)
        dbias += tl.sum(dz, axis=1)
    out = batch * channels + ch
    tl.store(da_ptr + out, dA, mask=ch_ok)
    tl.store(dd_ptr + out, dD, mask=ch_ok)
    tl.store(dbias_ptr + out, dbias, mask=ch_ok)


def _grid(batch: int, channels: int):
    return batch, triton.cdiv(channels, BLOCK_D)


class _TritonSelectiveScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias):
        u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
        A, D, delta_bias = (t.contiguous().float() for t in (A, D, delta_bias))
        batch, channels, length = u.shape
        groups = B.shape[1]
        y = torch.empty(batch, channels, length, device=u.device, dtype=torch.float32)
        h = torch.empty_like(y)
        _scan_fwd_kernel[_grid(batch, channels)](
            u, delta, A, B, C, D, delta_bias, y, h, channels, length, channels // groups, groups,
            BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L)
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, h)
        ctx.dtypes = [t.dtype for t in (u, delta, A, B, C, D, delta_bias)]
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, delta_bias, h = ctx.saved_tensors
        batch, channels, length = u.shape
        groups = B.shape[1]
        f32 = dict(device=u.device, dtype=torch.float32)
        du, ddelta, dB, dC = (torch.empty(batch, channels, length, **f32) for _ in range(4))
        dA, dD, dbias = (torch.empty(batch, channels, **f32) for _ in range(3))
        _scan_bwd_kernel[_grid(batch, channels)](
            u, delta, A, B, C, D, delta_bias, h, dy.contiguous().float(),
            du, ddelta, dB, dC, dA, dD, dbias, channels, length, channels // groups, groups,
            BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L)
        per_group = (batch, groups, 1, channels // groups, length)
        grads = (du, ddelta, dA.sum(0, keepdim=False)[:, None],
                 dB.view(per_group).sum(3), dC.view(per_group).sum(3), dD.sum(0), dbias.sum(0))
        return tuple(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                          delta_softplus: bool = True) -> Tensor:
    """The selective scan with state size 1 as fused Triton kernels; see the module doc."""
    channels = u.shape[1]
    D = D if D is not None else u.new_zeros(channels, dtype=torch.float32)
    delta_bias = delta_bias if delta_bias is not None else u.new_zeros(channels, dtype=torch.float32)
    return _TritonSelectiveScan.apply(u, delta, A, B, C, D, delta_bias)
