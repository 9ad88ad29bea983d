import math

import torch

from mmseg_segman.models.layers import SS2D
from mmseg_segman.ops import cross_merge, cross_scan, selective_scan


def test_parameter_shapes_match_release():
    ss2d = SS2D(384)
    rank = math.ceil(384 / 16)
    shapes = {k: tuple(v.shape) for k, v in ss2d.state_dict().items()}
    assert shapes == {'x_proj_weight': (4 * (rank + 2), 384, 1), 'dt_projs_weight': (4, 384, rank),
                      'dt_projs_bias': (4, 384), 'A_logs': (4 * 384, 1), 'Ds': (4 * 384,)}


def test_map_layout_projection_equals_release_sequence_projection():
    """The release projects the cross-scanned sequences with grouped conv1d."""
    torch.manual_seed(0)
    ss2d = SS2D(8).double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    batch, channels, height, width = x.shape
    length, rank = height * width, ss2d.dt_rank
    xs = cross_scan(x).reshape(batch, -1, length)
    x_dbl = torch.nn.functional.conv1d(xs, ss2d.x_proj_weight, groups=4)
    dts, Bs, Cs = torch.split(x_dbl.view(batch, 4, -1, length), [rank, 1, 1], dim=2)
    dts = torch.nn.functional.conv1d(dts.reshape(batch, -1, length),
                                     ss2d.dt_projs_weight.reshape(4 * channels, -1, 1), groups=4)
    ys = selective_scan(xs, dts, -torch.exp(ss2d.A_logs), Bs, Cs, ss2d.Ds,
                        ss2d.dt_projs_bias.flatten())
    expected = cross_merge(ys.view(batch, 4, channels, length), height, width)
    torch.testing.assert_close(ss2d(x), expected)


def test_gradients_flow_to_every_parameter():
    ss2d = SS2D(6)
    x = torch.randn(1, 6, 4, 3, requires_grad=True)
    ss2d(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in ss2d.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
