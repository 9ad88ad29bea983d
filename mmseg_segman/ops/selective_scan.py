"""The selective scan of SS2D (Mamba's S6 recurrence with a diagonal state).

For each channel ``c`` of group ``g`` and step ``t`` (``h_0 = 0``)::

    delta_t = softplus(delta_t + delta_bias_c)
    h_t = exp(delta_t * A_c) * h_{t-1} + delta_t * B_{g,t} * u_t
    y_t = sum_n C_{g,t,n} * h_{t,n} + D_c * u_t

Two entry points:

* :func:`cross_selective_scan`, what SS2D calls: the four directions of a 2-D map
  (see :mod:`.cross_scan`) scanned and merged back. Its per-direction inputs come in
  direction order (each direction's sequence contiguous, reversed or not), so fused backends
  read every direction coalesced and in place. Backends: ``triton``
  (fused kernels, state size 1) and ``torch``, the pure-PyTorch reference;
* :func:`selective_scan` on sequences laid out in scan order: the reference scan alone
  (pure PyTorch, no other backend), the building block of the ``torch`` backend above.

The reference computes in float32 (float64 if the inputs are float64), in chunks of the
sequence (:func:`linear_recurrence`), and has its own backward that recomputes the states: it
keeps only its inputs for the backward pass, and its temporaries are a few tensors of the
inputs' size.
"""
import math
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .cross_scan import cross_merge, cross_scan, flip_reversed
from .dispatch import (TRITON_DTYPES, TRITON_INSTALLED, Backend, OpDispatcher, autocast_off,
                       runs_anywhere)



def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _steps(u, delta, A, B, C, delta_bias, delta_softplus):
    """The inputs in the compute dtype, split by group.

    Returns ``u (b, g, d, 1, T)``, the pre-softplus ``z`` and ``dt`` ``(b, g, d, 1, T)``, the
    per-step decay ``log_decay = dt * A`` ``(b, g, d, n, T)`` and ``B``, ``C`` ``(b, g, 1, n, T)``.
    """
    batch, channels, _ = u.shape
    groups, state = B.shape[1], B.shape[2]
    dtype = _compute_dtype(u)
    split = (batch, groups, channels // groups, 1, -1)
    z = delta.to(dtype)
    if delta_bias is not None:
        z = z + delta_bias.to(dtype)[:, None]
    z = z.view(split)
    dt = F.softplus(z) if delta_softplus else z
    log_decay = dt * A.to(dtype).view(groups, -1, state, 1)
    return (u.to(dtype).view(split), z, dt, log_decay, B.to(dtype).unsqueeze(2),
            C.to(dtype).unsqueeze(2))


def _skip(D: Optional[Tensor], groups: int, dtype: torch.dtype) -> Optional[Tensor]:
    """``D`` as ``(g, d, 1)``, or None."""
    return None if D is None else D.to(dtype).view(groups, -1, 1)


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                             delta_softplus: bool = True) -> Tensor:
    """The recurrence step by step: a Python loop over L, for tests only."""
    batch, channels, length = u.shape
    u, _, dt, log_decay, B, C = _steps(u, delta, A, B, C, delta_bias, delta_softplus)
    decay, drive = log_decay.exp(), dt * B * u
    h = torch.zeros_like(drive[..., 0])
    states = []
    for t in range(length):
        h = decay[..., t] * h + drive[..., t]
        states.append(h)
    y = (torch.stack(states, -1) * C).sum(-2)
    D = _skip(D, B.size(1), y.dtype)
    return (y if D is None else y + D * u.squeeze(-2)).reshape(batch, channels, length)


def linear_recurrence(log_decay: Tensor, drive: Tensor) -> Tensor:
    """All ``h_t = exp(log_decay_t) * h_{t-1} + drive_t`` (``h_0 = 0``) along the last dim.

    The sequence is cut into about ``sqrt(L)`` chunks of about ``sqrt(L)`` steps. One loop over
    the steps of a chunk runs the recurrence in every chunk at once, from 0, and the product
    of the decays so far; a loop over the chunks carries each chunk's end into the next; the
    carries, times those products, are added. The arithmetic of the recurrence itself
    (products of decays <= 1, no division, no logarithm), ``O(sqrt(L))`` Python steps, and
    temporaries of the inputs' size. For use without autograd (its graph would keep every step).
    In an ONNX export it runs :func:`linear_recurrence_exportable` instead.
    """
    if torch.onnx.is_in_onnx_export():
        return linear_recurrence_exportable(log_decay, drive)
    length = log_decay.size(-1)
    steps = max(1, math.ceil(math.sqrt(length)))  # not isqrt: torch.compile cannot trace it
    pad = -length % steps
    # (steps, ..., chunks): one contiguous slice per step
    decay = F.pad(log_decay, (0, pad)).exp().unflatten(-1, (-1, steps)).movedim(-1, 0).contiguous()
    drive = F.pad(drive, (0, pad)).unflatten(-1, (-1, steps)).movedim(-1, 0).contiguous()
    h, decayed = torch.empty_like(drive), torch.empty_like(decay)
    h[0], decayed[0] = drive[0], decay[0]
    for t in range(1, steps):
        torch.addcmul(drive[t], decay[t], h[t - 1], out=h[t])
        torch.mul(decayed[t - 1], decay[t], out=decayed[t])
    carry = torch.empty_like(h[0])  # (..., chunks): h just before each chunk
    carry[..., 0] = 0
    for chunk in range(1, carry.size(-1)):
        carry[..., chunk] = decayed[-1][..., chunk - 1] * carry[..., chunk - 1] + h[-1][..., chunk - 1]
    h.addcmul_(decayed, carry)
    return h.movedim(0, -1).flatten(-2)[..., :length]


EXPORT_CHUNK = 64  # steps per chunk of the exportable recurrence (a power of 2)
EXPORT_LEVELS = 4  # its levels of chunks: up to 64**4 (16.7M) steps, a 16k x 16k image's 1/4 map


def linear_recurrence_exportable(log_decay: Tensor, drive: Tensor, levels: int = EXPORT_LEVELS,
                                 length: Optional[int] = None) -> Tensor:
    """:func:`linear_recurrence` without a Python number taken from the length, so that a
    graph traced at one size computes every other (ONNX export with dynamic sizes).

    The sequence is cut into chunks of ``EXPORT_CHUNK`` steps. In every chunk at once,
    ``log2(EXPORT_CHUNK)`` doubling steps (Hillis-Steele) compose the steps' maps
    ``h -> a h + b``: the recurrence from 0 and the product of the decays so far. The chunks'
    ends are carried by this function on the sequence of chunks, ``levels`` deep, so sequences
    of up to ``EXPORT_CHUNK ** levels`` steps are exact (longer ones would lose the carries
    beyond). Products of decays <= 1, no division; ``O(L log EXPORT_CHUNK)`` work. Sizes are
    computed from ``length`` (default: the last dim's), never read from an intermediate tensor:
    the TorchScript exporter may fold those into constants.
    """
    length = log_decay.size(-1) if length is None else length
    chunks = (length + EXPORT_CHUNK - 1) // EXPORT_CHUNK  # not -(-a // b): ONNX division truncates

    def chunked(t: Tensor) -> Tensor:  # (..., chunks, steps), padded with decay 1 and drive 0
        padded = F.pad(t, (0, EXPORT_CHUNK - 1))[..., :chunks * EXPORT_CHUNK]
        return padded.unflatten(-1, (-1, EXPORT_CHUNK))

    log_decay, h = chunked(log_decay), chunked(drive)
    decayed, steps = log_decay.exp(), torch.arange(EXPORT_CHUNK, device=h.device)
    shift = 1
    while shift < EXPORT_CHUNK:  # each step composed with the `shift` steps before it
        first = steps < shift  # no steps before these in the chunk: identity maps
        h = torch.addcmul(h, decayed, h.roll(shift, -1).masked_fill(first, 0.0))
        decayed = decayed * decayed.roll(shift, -1).masked_fill(first, 1.0)
        shift *= 2
    if levels > 1:  # h at the end of each chunk, then carried into the next one
        ends = linear_recurrence_exportable(log_decay.sum(-1), h[..., -1], levels - 1, chunks)
        carry = F.pad(ends, (1, 0))[..., :chunks]  # h before each chunk
        h = torch.addcmul(h, decayed, carry.unsqueeze(-1))
    return h.flatten(-2)[..., :length]


def _scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus) -> Tensor:
    """``y (b, g*d, L)`` in the compute dtype, without autograd (see :class:`_SelectiveScan`)."""
    batch, channels, length = u.shape
    x, _, dt, log_decay, Bs, Cs = _steps(u, delta, A, B, C, delta_bias, delta_softplus)
    y = (linear_recurrence(log_decay, dt * Bs * x) * Cs).sum(-2)
    D = _skip(D, B.size(1), y.dtype)
    return (y if D is None else y + D * x.squeeze(-2)).view(batch, channels, length)


def _scan_backward(u, delta, A, B, C, D, delta_bias, delta_softplus, dy):
    """Gradients of all seven inputs (None for an absent D / delta_bias), in the compute dtype.

    Recomputes the states ``h``, then the adjoint recurrence ``g_t = C_t dy_t + a_{t+1}
    g_{t+1}`` (``g`` the gradient of ``h_t``, ``a_t = exp(dt_t A)``): the same recurrence on the
    reversed sequence.
    """
    batch, channels, length = u.shape
    groups, state = B.shape[1], B.shape[2]
    x, z, dt, log_decay, Bs, Cs = _steps(u, delta, A, B, C, delta_bias, delta_softplus)
    h = linear_recurrence(log_decay, dt * Bs * x)
    dy = dy.to(h.dtype).view(batch, groups, -1, 1, length)
    next_decay = F.pad(log_decay[..., 1:], (0, 1))
    g = linear_recurrence(next_decay.flip(-1), (Cs * dy).flip(-1)).flip(-1)
    decayed_prev = log_decay.exp() * F.pad(h[..., :-1], (1, 0))  # a_t h_{t-1}
    A = A.to(h.dtype).view(groups, -1, state, 1)
    ddt = (g * (Bs * x + A * decayed_prev)).sum(-2)  # (b, g, d, L)
    ddelta = (ddt * torch.sigmoid(z.squeeze(-2)) if delta_softplus else ddt).view(batch, channels, length)
    du = (g * dt * Bs).sum(-2)
    Ds = _skip(D, groups, h.dtype)
    if Ds is not None:
        du = du + Ds * dy.squeeze(-2)
    dD = None if D is None else (dy * x).sum((0, -1)).view(channels)
    dbias = None if delta_bias is None else ddelta.sum((0, -1))
    return (du.view(batch, channels, length), ddelta, (g * decayed_prev * dt).sum((0, -1)).view(channels, state),
            (g * dt * x).sum(2), (h * dy).sum(2), dD, dbias)


def _in_dtypes(grads, inputs) -> Tuple[Optional[Tensor], ...]:
    return tuple(None if g is None else g.to(t.dtype).view(t.shape) for g, t in zip(grads, inputs))


class _SelectiveScan(torch.autograd.Function):
    """The reference scan with its own backward: saves only the inputs and recomputes the
    states in the backward pass; its temporaries are a few tensors of the inputs' size."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.delta_softplus = delta_softplus
        return _scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        inputs = ctx.saved_tensors
        grads = _scan_backward(*inputs, ctx.delta_softplus, dy)
        return (*_in_dtypes(grads, inputs), None)


def _check_scan_inputs(u, delta, A, B, C, D, delta_bias):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f'u and delta must both be (B, G*D, L), got {tuple(u.shape)} and '
                         f'{tuple(delta.shape)}')
    batch, channels, length = u.shape
    if B.dim() != 4 or B.shape[0] != batch or B.shape[-1] != length or C.shape != B.shape:
        raise ValueError(f'B and C must be (B, G, N, L) = ({batch}, G, N, {length}), got '
                         f'{tuple(B.shape)} and {tuple(C.shape)}')
    if A.shape != (channels, B.shape[2]):
        raise ValueError(f'A must be ({channels}, {B.shape[2]}), got {tuple(A.shape)}')
    for name, t in (('D', D), ('delta_bias', delta_bias)):
        if t is not None and t.shape != (channels,):
            raise ValueError(f'{name} must be ({channels},), got {tuple(t.shape)}')


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = True) -> Tensor:
    """Selective scan over sequences in scan order.

    Args:
        u, delta: ``(B, G*D, L)``.
        A: ``(G*D, N)``, negative.
        B, C: ``(B, G, N, L)``, shared by the ``D`` channels of a group.
        D, delta_bias: ``(G*D,)`` or None.

    Returns:
        ``(B, G*D, L)`` in float32 (float64 for float64 inputs).
    """
    _check_scan_inputs(u, delta, A, B, C, D, delta_bias)
    return _SelectiveScan.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)


def _scan_order(x: Tensor, delta: Tensor, B: Tensor, C: Tensor) -> Tuple[Tensor, ...]:
    """The inputs as the ``(b, 4*D, L)`` / ``(b, 4, N, L)`` sequences of the four directions."""
    batch, length = x.size(0), x.size(2) * x.size(3)
    return (cross_scan(x).reshape(batch, -1, length), flip_reversed(delta).reshape(batch, -1, length),
            flip_reversed(B), flip_reversed(C))


def project_steps(dt_low: Tensor, dt_proj: Tensor) -> Tensor:
    """The steps ``delta (B, 4, D, L)`` from their low-rank form: ``dt_proj[k] @ dt_low[b, k]``
    for ``dt_low (B, 4, R, L)`` and ``dt_proj (4, D, R)``, in ``dt_low``'s dtype (bfloat16 in
    AMP training, as the release's einsum under autocast)."""
    return dt_proj.to(dt_low.dtype) @ dt_low


def project_steps_backward(ddelta: Tensor, dt_low: Tensor, dt_proj: Tensor) -> Tuple[Tensor, Tensor]:
    """The gradients of ``dt_low`` and ``dt_proj`` from ``ddelta``, that of
    :func:`project_steps`' output, computed in ``ddelta``'s dtype (float32 from the scans,
    where autograd through a bfloat16 product would round ``ddelta`` first) and returned in
    the inputs' dtypes, autocast or not. Matrix products batched over ``(B, 4)``: none copies
    ``ddelta`` (an einsum would transpose it to one product per direction)."""
    with autocast_off(ddelta.device.type):
        d_dt_low = dt_proj.to(ddelta.dtype).transpose(-1, -2) @ ddelta
        d_dt_proj = (ddelta @ dt_low.to(ddelta.dtype).transpose(-1, -2)).sum(0)
    return d_dt_low.to(dt_low.dtype), d_dt_proj.to(dt_proj.dtype)


class _CrossSelectiveScan(torch.autograd.Function):
    """The ``torch`` backend: step projection, cross scan, the reference scan, cross merge,
    with one backward for the four that keeps only the inputs (see :class:`_SelectiveScan`)."""

    @staticmethod
    def forward(ctx, x, dt_low, dt_proj, A, B, C, D, delta_bias):
        ctx.save_for_backward(x, dt_low, dt_proj, A, B, C, D, delta_bias)
        u, dts, Bs, Cs = _scan_order(x, project_steps(dt_low, dt_proj), B, C)
        y = _scan_forward(u, dts, A, Bs, Cs, D, delta_bias, True)
        return cross_merge(y.view(x.size(0), 4, x.size(1), -1), *x.shape[2:]).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        inputs = x, dt_low, dt_proj, A, B, C, D, delta_bias = ctx.saved_tensors
        batch, channels, height, width = x.shape
        u, dts, Bs, Cs = _scan_order(x, project_steps(dt_low, dt_proj), B, C)
        du, ddelta, dA, dB, dC, dD, dbias = _scan_backward(
            u, dts, A, Bs, Cs, D, delta_bias, True, cross_scan(dy).reshape(batch, -1, height * width))
        dx = cross_merge(du.view(batch, 4, channels, -1), height, width)
        d_dt_low, d_dt_proj = project_steps_backward(
            flip_reversed(ddelta.view(batch, 4, channels, -1)), dt_low, dt_proj)
        grads = (dx, d_dt_low, d_dt_proj, dA, flip_reversed(dB), flip_reversed(dC), dD, dbias)
        return _in_dtypes(grads, inputs)


def _cross_selective_scan_torch(x, dt_low, dt_proj, A, B, C, D, delta_bias):
    return _CrossSelectiveScan.apply(x, dt_low, dt_proj, A, B, C, D, delta_bias)



def _cross_triton_unavailable(x, dt_low, dt_proj, A, B, C, D, delta_bias) -> Optional[str]:
    """The Triton cross scan runs when the state size N is 1, x, dt_low, B and C are
    float32, bfloat16 or float16, triton imports, and either every input is on CUDA or
    every input is on the CPU with ``TRITON_INTERPRET=1`` (Triton's interpreter, for CI;
    the variable must be set before triton is first imported)."""
    tensors = (x, dt_low, dt_proj, A, B, C, D, delta_bias)
    if not (all(t.is_cuda for t in tensors) or (os.environ.get('TRITON_INTERPRET') == '1'
                                                and not any(t.is_cuda for t in tensors))):
        return 'needs every input on CUDA (or on the CPU with TRITON_INTERPRET=1)'
    if A.shape[1] != 1:
        return f'needs state size N = 1, got {A.shape[1]}'
    if any(t.dtype not in TRITON_DTYPES for t in (x, dt_low, B, C)):
        dtypes = {str(t.dtype) for t in (x, dt_low, B, C)}
        return f'needs float32, bfloat16 or float16 x, dt_low, B, C, got {sorted(dtypes)}'
    return None if TRITON_INSTALLED else 'triton is not installed'


def _cross_selective_scan_triton(x, dt_low, dt_proj, A, B, C, D, delta_bias):
    from .triton_cross_selective_scan import cross_selective_scan_triton
    return cross_selective_scan_triton(x, dt_low, dt_proj, A, B, C, D, delta_bias)


_cross_selective_scan = OpDispatcher('cross_selective_scan', {
    'triton': Backend(_cross_selective_scan_triton, _cross_triton_unavailable),
    'torch': Backend(_cross_selective_scan_torch, runs_anywhere),
})


def cross_selective_scan(x: Tensor, dt_low: Tensor, dt_proj: Tensor, A: Tensor, B: Tensor,
                         C: Tensor, D: Tensor, delta_bias: Tensor) -> Tensor:
    """The SS2D scan: four directions over a map, each scanned, then merged.

    The per-direction inputs come in direction order (:mod:`.cross_scan`): direction k's
    map flattened row-major (k = 0, 2) or column-major (k = 1, 3), so that every direction
    reads its sequence contiguously (:func:`~.cross_scan.direction_order` lays maps out so).
    The steps come in their low-rank form, ``delta = dt_proj[k] @ dt_low[b, k]``
    (:func:`project_steps`), so that a backend may recompute ``delta`` for the backward pass
    instead of keeping it (the Triton backend does: ``(B, 4, D, L)`` against ``R = D / 16``
    rows of ``dt_low``).

    Args:
        x: ``(B, D, H, W)``, the input ``u`` of every direction.
        dt_low: ``(B, 4, R, H*W)``, the steps' low-rank form.
        dt_proj: ``(4, D, R)``, their projection; ``delta`` is taken before ``delta_bias``
            and softplus.
        A: ``(4*D, N)``.
        B, C: ``(B, 4, N, H*W)``.
        D, delta_bias: ``(4*D,)``.

    Returns:
        ``(B, D, H, W)`` in ``x``'s dtype (computed in float32): the sum over directions of
        each direction's output, put back at the pixel it belongs to.
    """
    batch, channels, height, width = x.shape
    length = height * width
    if dt_low.dim() != 4 or dt_low.shape[:2] != (batch, 4) or dt_low.shape[3] != length:
        raise ValueError(f'dt_low must be ({batch}, 4, R, {length}) (direction order), got '
                         f'{tuple(dt_low.shape)}')
    if dt_proj.shape != (4, channels, dt_low.shape[2]):
        raise ValueError(f'dt_proj must be (4, {channels}, {dt_low.shape[2]}) (4, D, R), got '
                         f'{tuple(dt_proj.shape)}')
    if B.dim() != 4 or B.shape[:2] != (batch, 4) or B.shape[3] != length or C.shape != B.shape:
        raise ValueError(f'B and C must be ({batch}, 4, N, {length}) (direction order), got '
                         f'{tuple(B.shape)} and {tuple(C.shape)}')
    return _cross_selective_scan(x, dt_low, dt_proj, A, B, C, D, delta_bias)
