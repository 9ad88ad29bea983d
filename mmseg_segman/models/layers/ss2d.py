"""SS2D: the 2-D selective-scan token mixer (VMamba style, used by encoder and decoder)."""
import math
from typing import Optional

import torch
from torch import Tensor, nn

from ...ops import cross_selective_scan, direction_order, pointwise_conv2d
from ...ops.dispatch import cast
from ...ops.pointwise_conv import Residual

NUM_DIRECTIONS = 4


class SS2D(nn.Module):
    """Four-direction selective scan over a ``(B, C, H, W)`` map.

    Parameters keep the released names and shapes (``R = ceil(C / 16)``, ``K = 4``):
    ``x_proj_weight (K*(R+2N), C, 1)``, ``dt_projs_weight (K, C, R)``,
    ``dt_projs_bias (K, C)``, ``A_logs (K*C, N)``, ``Ds (K*C)``.

    Args:
        embed_dim: channels ``C``.
        d_state: state size ``N`` (1 in SegMAN).
        dt_rank: rank ``R`` of the step projection; ``'auto'`` is ``ceil(C / 16)``.
    """

    def __init__(self, embed_dim: int, d_state: int = 1, dt_rank='auto', dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        self.embed_dim = embed_dim
        self.d_state = d_state
        self.dt_rank = math.ceil(embed_dim / 16) if dt_rank == 'auto' else int(dt_rank)
        k, c, r, n = NUM_DIRECTIONS, embed_dim, self.dt_rank, d_state

        x_proj = torch.empty(k, r + 2 * n, c)
        bound = c ** -0.5  # nn.Linear's default init
        nn.init.uniform_(x_proj, -bound, bound)
        self.x_proj_weight = nn.Parameter(x_proj.view(-1, c, 1))

        std = r ** -0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(k, c, r).uniform_(-std, std))
        # softplus(dt_projs_bias) is log-uniform in [dt_min, dt_max]
        dt = torch.exp(torch.rand(k, c) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))

        a = torch.arange(1, n + 1, dtype=torch.float32).repeat(k * c, 1)
        self.A_logs = nn.Parameter(torch.log(a))
        self.Ds = nn.Parameter(torch.ones(k * c))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True

    def forward(self, x: Tensor, residual: Optional[Residual] = None) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)`` in ``x``'s dtype (the scan runs in float32), then
        ``residual.add_to``."""
        k, r, n = NUM_DIRECTIONS, self.dt_rank, self.d_state
        # Per-pixel projections in the map's own layout: the same numbers as projecting
        # each direction's sequence, since a 1x1 projection commutes with reordering. As a 1x1
        # convolution it keeps x itself for the backward (the scan keeps it too), where an
        # einsum would keep a transposed copy. Its (R + 2N)-channel result is laid out in
        # direction order for the scan (a small copy). The scan takes the steps in their
        # low-rank form (R rows) with their projection dt_projs_weight.
        batch, _, height, width = x.shape
        x_dbl = pointwise_conv2d(x, self.x_proj_weight.unsqueeze(-1))
        x_dbl = direction_order(x_dbl.view(batch, k, r + 2 * n, height, width))
        dt_low, Bs, Cs = x_dbl.split_with_sizes([r, n, n], dim=2)
        y = cross_selective_scan(x, dt_low, self.dt_projs_weight, self._decay_rates(), Bs, Cs,
                                 cast(self.Ds, torch.float32),
                                 cast(self.dt_projs_bias.reshape(-1), torch.float32))
        return y if residual is None else residual.add_to(y)

    def _decay_rates(self) -> Tensor:
        """``A = -exp(A_logs)`` in float32; in place of the exponential where autograd does
        not record (one kernel where inference would launch two)."""
        rates = torch.exp(cast(self.A_logs, torch.float32))
        return -rates if torch.is_grad_enabled() and self.A_logs.requires_grad else rates.neg_()

    def extra_repr(self) -> str:
        return f'embed_dim={self.embed_dim}, d_state={self.d_state}, dt_rank={self.dt_rank}'
