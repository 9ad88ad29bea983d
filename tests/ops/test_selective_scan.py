"""Selective scan: the parallel PyTorch path against the sequential recurrence."""
import pytest
import torch

from mmseg_segman.ops import (both_orders, cross_merge, cross_scan, cross_selective_scan,
                              direction_order, flip_reversed, selective_scan)
from mmseg_segman.ops.selective_scan import (linear_recurrence, linear_recurrence_exportable,
                                              selective_scan_reference)

from .autograd_memory import saved_bytes


def scan_inputs(batch=2, groups=4, channels=3, state=1, length=37, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    gd = groups * channels
    return dict(u=torch.randn(batch, gd, length, generator=g, dtype=dtype),
                delta=torch.randn(batch, gd, length, generator=g, dtype=dtype),
                A=-torch.rand(gd, state, generator=g, dtype=dtype) * 2,
                B=torch.randn(batch, groups, state, length, generator=g, dtype=dtype),
                C=torch.randn(batch, groups, state, length, generator=g, dtype=dtype),
                D=torch.randn(gd, generator=g, dtype=dtype),
                delta_bias=torch.randn(gd, generator=g, dtype=dtype))


@pytest.mark.parametrize('recurrence', [linear_recurrence, linear_recurrence_exportable])
@pytest.mark.parametrize('length', [1, 15, 16, 17, 255, 1000, 64**2 + 65])
def test_linear_recurrence_matches_loop(recurrence, length):
    """Both schedules; 64**2 + 65 steps take the exportable one's third level of chunks."""
    g = torch.Generator().manual_seed(length)
    log_decay = -torch.rand(3, 2, length, generator=g, dtype=torch.float64) * 3 / length ** 0.5
    drive = torch.randn(3, 2, length, generator=g, dtype=torch.float64)
    h, expected = torch.zeros(3, 2, dtype=torch.float64), []
    for t in range(length):
        h = log_decay[..., t].exp() * h + drive[..., t]
        expected.append(h)
    torch.testing.assert_close(recurrence(log_decay, drive), torch.stack(expected, -1))


@pytest.mark.parametrize('state,length', [(1, 37), (1, 300), (2, 20)])
def test_parallel_scan_matches_sequential_float64(state, length):
    inputs = scan_inputs(state=state, length=length)
    torch.testing.assert_close(selective_scan(**inputs), selective_scan_reference(**inputs),
                               rtol=1e-10, atol=1e-10)


def test_float32_inputs_compute_in_float32():
    inputs = scan_inputs(length=500, dtype=torch.float32)
    out = selective_scan(**inputs)
    assert out.dtype == torch.float32
    expected = selective_scan_reference(**{k: v.double() for k, v in inputs.items()})
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_inputs_give_float32():
    inputs = scan_inputs(length=64, dtype=torch.bfloat16)
    out = selective_scan(**inputs)
    assert out.dtype == torch.float32
    expected = selective_scan_reference(**{k: v.double() for k, v in inputs.items()})
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('state', [1, 2])
def test_gradcheck(state):
    inputs = scan_inputs(batch=1, groups=2, channels=2, state=state, length=21)
    names = list(inputs)
    tensors = [inputs[n].requires_grad_() for n in names]
    assert torch.autograd.gradcheck(lambda *t: selective_scan(**dict(zip(names, t))), tensors)


@pytest.mark.parametrize('height,width', [(3, 5), (4, 4), (1, 6), (5, 1)])
def test_cross_scan_orders_and_merge_inverts(height, width):
    x = torch.arange(2 * 3 * height * width, dtype=torch.float64).view(2, 3, height, width)
    xs = cross_scan(x)
    assert torch.equal(xs[:, 0], x.flatten(2))
    assert torch.equal(xs[:, 1], x.transpose(2, 3).flatten(2))
    assert torch.equal(xs[:, 2], x.flatten(2).flip(-1))
    assert torch.equal(xs[:, 3], x.transpose(2, 3).flatten(2).flip(-1))
    assert torch.equal(both_orders(x), xs[:, :2])
    # per-direction maps in direction order: row-major (0, 2), column-major (1, 3), not reversed
    per_direction = torch.stack([x, x + 1, x + 2, x + 3], 1)
    ordered = direction_order(per_direction)
    for k in range(4):
        flat = x.flatten(2) if k % 2 == 0 else x.transpose(2, 3).flatten(2)
        assert torch.equal(ordered[:, k], flat + k)
    assert torch.equal(flip_reversed(ordered), xs + torch.arange(4.).view(1, 4, 1, 1).double())
    assert torch.equal(flip_reversed(flip_reversed(ordered)), ordered)
    # merge undoes each order and sums
    torch.testing.assert_close(cross_merge(xs, height, width), 4 * x)


def test_direction_order_triton_needs_contiguous_maps_within_the_grid(monkeypatch):
    """The kernel reads contiguous maps and has a plane of the grid per (b, k, c); other maps
    get the reference (the reason says why)."""
    pytest.importorskip('triton')
    from mmseg_segman.ops.cross_scan import _direction_order
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert _direction_order.why_not('triton', torch.zeros(2, 4, 3, 5, 6)) is None
    strided = torch.zeros(2, 4, 3, 6, 5).transpose(3, 4)
    assert 'not contiguous' in _direction_order.why_not('triton', strided)
    assert _direction_order.select(strided) == 'torch'
    many = torch.zeros(1, 4, 2 ** 14, 1, 1)  # 65536 planes
    assert '65536 planes' in _direction_order.why_not('triton', many)


def test_cross_selective_scan_is_four_sequential_scans():
    torch.manual_seed(0)
    batch, channels, state, height, width = 2, 3, 1, 4, 5
    x = torch.randn(batch, channels, height, width, dtype=torch.float64)
    dt_low = torch.randn(batch, 4, 2, height * width, dtype=torch.float64)
    dt_proj = torch.randn(4, channels, 2, dtype=torch.float64)
    # delta = dt_proj[k] @ dt_low[b, k], in direction order: back to maps for the loop below
    delta = torch.einsum('kdr,bkrl->bkdl', dt_proj, dt_low)
    delta = torch.stack([delta[:, k].unflatten(-1, (height, width)) if k % 2 == 0 else
                         delta[:, k].unflatten(-1, (width, height)).transpose(-1, -2)
                         for k in range(4)], 1)
    Bs, Cs = torch.randn(2, batch, 4, state, height, width, dtype=torch.float64)
    A = -torch.rand(4 * channels, state, dtype=torch.float64)
    D, bias = torch.randn(2, 4 * channels, dtype=torch.float64)
    # the per-direction maps in direction order, written out here
    rows, cols = (lambda t: t.flatten(-2)), (lambda t: t.transpose(-1, -2).flatten(-2))
    ordered = [torch.stack([(rows, cols)[k % 2](t[:, k]) for k in range(4)], 1)
               for t in (Bs, Cs)]
    out = cross_selective_scan(x, dt_low, dt_proj, A, ordered[0], ordered[1], D, bias)
    expected = torch.zeros_like(x)
    orders = [rows, cols]
    for k in range(4):
        order = orders[k % 2]
        seq = lambda t: order(t).flip(-1) if k >= 2 else order(t)  # noqa: E731
        sl = slice(k * channels, (k + 1) * channels)
        y = selective_scan_reference(seq(x), seq(delta[:, k]), A[sl], seq(Bs[:, k]).unsqueeze(1),
                                     seq(Cs[:, k]).unsqueeze(1), D[sl], bias[sl])
        y = y.flip(-1) if k >= 2 else y
        y = y.unflatten(-1, (height, width)) if k % 2 == 0 else \
            y.unflatten(-1, (width, height)).transpose(-1, -2)
        expected += y
    torch.testing.assert_close(out, expected)


def test_bad_shapes_are_named():
    inputs = scan_inputs()
    with pytest.raises(ValueError, match='A must be'):
        selective_scan(**{**inputs, 'A': inputs['A'][:5]})
    with pytest.raises(ValueError, match='B and C must be'):
        selective_scan(**{**inputs, 'B': inputs['B'][..., :3]})
    x = torch.randn(1, 3, 4, 4)
    rest = torch.randn(12, 1), torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16), \
        torch.randn(12), torch.randn(12)
    with pytest.raises(ValueError, match=r'dt_low must be \(1, 4, R, 16\) \(direction order\)'):
        cross_selective_scan(x, torch.randn(1, 4, 2, 4, 4), torch.randn(4, 3, 2), *rest)
    with pytest.raises(ValueError, match=r'dt_proj must be \(4, 3, 2\) \(4, D, R\)'):
        cross_selective_scan(x, torch.randn(1, 4, 2, 16), torch.randn(4, 2, 3), *rest)
    with pytest.raises(ValueError, match='B and C must be'):
        cross_selective_scan(x, torch.randn(1, 4, 2, 16), torch.randn(4, 3, 2), torch.randn(12, 1),
                             torch.randn(1, 4, 1, 4, 4), torch.randn(1, 4, 1, 4, 4),
                             torch.randn(12), torch.randn(12))


def test_cross_selective_scan_gradcheck():
    """Covers cross scan and merge: gradients reach the map-layout inputs."""
    g = torch.Generator().manual_seed(0)
    channels, height, width = 2, 3, 2
    length = height * width
    inputs = [torch.randn(1, channels, height, width, generator=g, dtype=torch.float64),
              torch.randn(1, 4, 2, length, generator=g, dtype=torch.float64),
              torch.randn(4, channels, 2, generator=g, dtype=torch.float64),
              -torch.rand(4 * channels, 1, generator=g, dtype=torch.float64),
              torch.randn(1, 4, 1, length, generator=g, dtype=torch.float64),
              torch.randn(1, 4, 1, length, generator=g, dtype=torch.float64),
              torch.randn(4 * channels, generator=g, dtype=torch.float64),
              torch.randn(4 * channels, generator=g, dtype=torch.float64)]
    assert torch.autograd.gradcheck(cross_selective_scan, [t.requires_grad_() for t in inputs])


def cross_inputs(batch=2, channels=3, state=1, height=9, width=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    length = height * width
    rank = max(1, channels // 4)
    return [randn(batch, channels, height, width), randn(batch, 4, rank, length),
            randn(4, channels, rank), -torch.rand(4 * channels, state, generator=g, dtype=torch.float64),
            randn(batch, 4, state, length), randn(batch, 4, state, length),
            randn(4 * channels), randn(4 * channels)]


def test_reference_keeps_only_its_inputs():
    inputs = [t.float().requires_grad_() for t in cross_inputs(height=16, width=16, channels=8)]
    assert saved_bytes(cross_selective_scan, *inputs) == sum(t.numel() * t.element_size() for t in inputs)
