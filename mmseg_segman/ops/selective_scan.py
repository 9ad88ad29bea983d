"""The selective scan of SS2D (Mamba's S6 recurrence with a diagonal state).

For each channel ``c`` of group ``g`` and step ``t`` (``h_0 = 0``)::

    delta_t = softplus(delta_t + delta_bias_c)
    h_t = exp(delta_t * A_c) * h_{t-1} + delta_t * B_{g,t} * u_t
    y_t = sum_n C_{g,t,n} * h_{t,n} + D_c * u_t

Two entry points:

* :func:`selective_scan` on sequences laid out in scan order;
* :func:`cross_selective_scan`, what SS2D calls: the four directions of a 2-D map
  (see :mod:`.cross_scan`) scanned and merged back. Its inputs stay in the map's own
  layout, so fused backends can read the scan orders in place.

The recurrence is computed in float32 (float64 if the inputs are float64).
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .cross_scan import cross_merge, cross_scan
from .dispatch import Backend, OpDispatcher, always

CHUNK = 16


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus):
    """Shared first step: float32 inputs, ``dt`` and the per-step decay ``dt * A``.

    Returns ``u (b, g, d, 1, L)``, ``dt`` and ``log_decay`` ``(b, g, d, n, L)``,
    ``B``, ``C`` ``(b, g, 1, n, L)``, ``D`` ``(g, d, 1)`` or None.
    """
    batch, channels, length = u.shape
    groups, state = B.shape[1], B.shape[2]
    if channels % groups:
        raise ValueError(f'{channels} channels do not split into {groups} groups')
    dtype = _compute_dtype(u)
    d = channels // groups
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt = dt.view(batch, groups, d, 1, length)
    log_decay = dt * A.to(dtype).view(groups, d, state, 1)
    u = u.to(dtype).view(batch, groups, d, 1, length)
    B = B.to(dtype).unsqueeze(2)
    C = C.to(dtype).unsqueeze(2)
    D = None if D is None else D.to(dtype).view(groups, d, 1)
    return u, dt, log_decay, B, C, D


def _finish(h, u, C, D, batch, length):
    y = (h * C).sum(-2)  # (b, g, d, L)
    if D is not None:
        y = y + D * u.squeeze(-2)
    return y.reshape(batch, -1, length)


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                             delta_softplus: bool = True) -> Tensor:
    """The recurrence step by step: a Python loop over L, for tests only."""
    batch, _, length = u.shape
    u, dt, log_decay, B, C, D = _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus)
    decay = log_decay.exp()
    drive = dt * B * u
    h = torch.zeros_like(drive[..., 0])
    states = []
    for t in range(length):
        h = decay[..., t] * h + drive[..., t]
        states.append(h)
    return _finish(torch.stack(states, -1), u, C, D, batch, length)


def _segment_sums(log_decay: Tensor) -> Tensor:
    """``(..., T) -> (..., T, T)``: entry ``[t, s]`` is ``sum_{s<r<=t} log_decay_r``, -inf above."""
    steps = log_decay.size(-1)
    x = log_decay.unsqueeze(-1).expand(*log_decay.shape, steps)  # [r, s] = log_decay_r
    strictly_lower = torch.ones(steps, steps, dtype=torch.bool, device=x.device).tril(-1)
    sums = x.masked_fill(~strictly_lower, 0).cumsum(-2)
    lower = torch.ones(steps, steps, dtype=torch.bool, device=x.device).tril()
    return sums.masked_fill(~lower, float('-inf'))


def linear_recurrence(log_decay: Tensor, drive: Tensor, chunk: int = CHUNK) -> Tensor:
    """All ``h_t = exp(log_decay_t) * h_{t-1} + drive_t`` (``h_0 = 0``) along the last dim.

    Parallel over the sequence: inside chunks of ``chunk`` steps a masked ``T x T`` decay
    matrix (every entry <= 1, so stable), across chunks the same recurrence on the chunk
    ends, recursively. No Python loop over L; memory ``O(L * chunk)``.
    """
    length = log_decay.size(-1)
    if length <= chunk:
        return (_segment_sums(log_decay).exp() @ drive.unsqueeze(-1)).squeeze(-1)
    pad = -length % chunk
    log_decay = F.pad(log_decay, (0, pad)).unflatten(-1, (-1, chunk))
    drive = F.pad(drive, (0, pad)).unflatten(-1, (-1, chunk))
    local = (_segment_sums(log_decay).exp() @ drive.unsqueeze(-1)).squeeze(-1)
    within = log_decay.cumsum(-1)  # decay from each chunk's start to step t
    ends = linear_recurrence(within[..., -1], local[..., -1], chunk)
    carry_in = F.pad(ends[..., :-1], (1, 0))
    h = local + within.exp() * carry_in.unsqueeze(-1)
    return h.flatten(-2)[..., :length]


def _selective_scan_torch(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    batch, _, length = u.shape
    u, dt, log_decay, B, C, D = _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus)
    h = linear_recurrence(log_decay, dt * B * u)
    return _finish(h, u, C, D, batch, length)


def _mamba_ssm_available(u, *args, **kwargs) -> bool:
    if not u.is_cuda:
        return False
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception:  # ImportError, or its CUDA extension failing to load
        return False
    return True


def _selective_scan_mamba_ssm(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    y = selective_scan_fn(u, delta, A.float(), B, C, None if D is None else D.float(), z=None,
                          delta_bias=None if delta_bias is None else delta_bias.float(),
                          delta_softplus=delta_softplus)
    return y.float()


def _triton_available(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True) -> bool:
    """State size 1, softplus on, float32/16 inputs, on CUDA (or CPU under TRITON_INTERPRET=1)."""
    if A.shape[1] != 1 or not delta_softplus or u.dtype == torch.float64:
        return False
    if not (u.is_cuda or os.environ.get('TRITON_INTERPRET') == '1'):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _selective_scan_triton(*args, **kwargs):
    from .triton_selective_scan import selective_scan_triton
    return selective_scan_triton(*args, **kwargs)


_selective_scan = OpDispatcher('selective_scan', {
    'triton': Backend(_selective_scan_triton, _triton_available),
    'mamba_ssm': Backend(_selective_scan_mamba_ssm, _mamba_ssm_available),
    'torch': Backend(_selective_scan_torch, always),
})


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
    return _selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus)


def _cross_selective_scan_torch(x, delta, A, B, C, D, delta_bias):
    batch, channels, height, width = x.shape
    length = height * width
    ys = selective_scan(cross_scan(x).reshape(batch, -1, length),
                        cross_scan(delta).reshape(batch, -1, length), A,
                        cross_scan(B), cross_scan(C), D, delta_bias, delta_softplus=True)
    return cross_merge(ys.view(batch, 4, channels, length), height, width)


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cross_triton_available(x, delta, A, B, C, D, delta_bias) -> bool:
    """The Triton cross scan runs when the state size N is 1, x, delta, B and C are
    float32, bfloat16 or float16, triton imports, and either every input is on CUDA or
    every input is on the CPU with ``TRITON_INTERPRET=1`` (Triton's interpreter, for CI;
    the variable must be set before triton is first imported)."""
    tensors = (x, delta, A, B, C, D, delta_bias)
    on_cuda = all(t.is_cuda for t in tensors)
    interpreted = os.environ.get('TRITON_INTERPRET') == '1' and not any(t.is_cuda for t in tensors)
    return ((on_cuda or interpreted) and all(t.dtype in _TRITON_DTYPES for t in (x, delta, B, C))
            and _triton_available(x, delta, A, B, C, D, delta_bias))


def _cross_selective_scan_triton(x, delta, A, B, C, D, delta_bias):
    from .triton_cross_selective_scan import cross_selective_scan_triton
    return cross_selective_scan_triton(x, delta, A, B, C, D, delta_bias)


_cross_selective_scan = OpDispatcher('cross_selective_scan', {
    'triton': Backend(_cross_selective_scan_triton, _cross_triton_available),
    'torch': Backend(_cross_selective_scan_torch, always),
})


def cross_selective_scan(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Tensor, delta_bias: Tensor) -> Tensor:
    """The SS2D scan: four directions over a map, each scanned, then merged.

    Args:
        x: ``(B, D, H, W)``, the input ``u`` of every direction.
        delta: ``(B, 4, D, H, W)``, before ``delta_bias`` and softplus; direction k's map.
        A: ``(4*D, N)``.
        B, C: ``(B, 4, N, H, W)``.
        D, delta_bias: ``(4*D,)``.

    Returns:
        ``(B, D, H, W)`` in float32: the sum over directions of each direction's output,
        put back at the pixel it belongs to.
    """
    batch, channels, height, width = x.shape
    if delta.shape != (batch, 4, channels, height, width):
        raise ValueError(f'delta must be {(batch, 4, channels, height, width)}, got {tuple(delta.shape)}')
    if B.dim() != 5 or B.shape[:2] != (batch, 4) or B.shape[3:] != (height, width) or C.shape != B.shape:
        raise ValueError(f'B and C must be ({batch}, 4, N, {height}, {width}), got '
                         f'{tuple(B.shape)} and {tuple(C.shape)}')
    return _cross_selective_scan(x, delta, A, B, C, D, delta_bias)
