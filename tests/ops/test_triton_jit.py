"""``triton_jit.launch``: Triton's path the first time for each specialization, then the
compiled kernel's launcher with the same arguments. The launcher is a stand-in here (no GPU);
``tools/gpu_checks/check_ops.py`` runs every backend twice on the GPU and compares."""
import os
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip('triton')

from triton.compiler import CompiledKernel  # noqa: E402

from mmseg_segman.ops import triton_jit  # noqa: E402


class StandIn(CompiledKernel):
    """A compiled kernel whose launcher records its calls."""

    def __init__(self):
        self.module, self.function, self.packed_metadata = None, 'function', 'metadata'
        self.launches = []
        self.launcher = lambda *call: self.launches.append(call)

    @property
    def run(self):
        return self.launcher


class Kernel:
    """A kernel ``k(x_ptr, n, SCALE: constexpr, FLAG: constexpr = False)``: ``kernel[grid]``
    records the call and returns :class:`StandIn`."""

    def __init__(self):
        self.params = [SimpleNamespace(name=n, default=d) for n, d in
                       (('x_ptr', None), ('n', None), ('SCALE', None), ('FLAG', False))]
        self.compiled = StandIn()
        self.triton_calls = []
        self.warmups = []

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.triton_calls.append((grid, args, meta))
            return self.compiled
        return call

    def warmup(self, *args, grid, **meta):
        self.warmups.append((grid, args, meta))


@pytest.fixture
def on_device(monkeypatch):
    """A CUDA device 0 with stream 7, direct launches on, an empty cache."""
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(triton_jit, '_current_stream', lambda device: 7)
    monkeypatch.setattr(triton_jit, 'DIRECT_LAUNCH', True)
    monkeypatch.setattr(triton_jit, '_launches', {})
    monkeypatch.setattr(triton_jit, '_binders', {})


def test_launches_directly_after_the_first_call(on_device):
    kernel, x = Kernel(), torch.zeros(64)
    triton_jit.launch(kernel, (3, 2), x, 100, SCALE=4, num_warps=8)
    assert len(kernel.triton_calls) == 1 and not kernel.compiled.launches
    y = torch.ones(64)
    triton_jit.launch(kernel, (5, ), y, 200, SCALE=4, num_warps=8)
    assert len(kernel.triton_calls) == 1
    (call, ) = kernel.compiled.launches
    # grid to three dims, the stream, handle and metadata, no launch metadata or hooks, then
    # every parameter in order: the positional ones (a tensor as its address, which the
    # launcher takes without asking the driver), SCALE from the call, FLAG's default
    assert call == (5, 1, 1, 7, 'function', 'metadata', None, None, None, y.data_ptr(), 200, 4,
                    False)


@pytest.mark.parametrize('align, other', [(triton_jit.ALIGNMENT, 1), (1, triton_jit.ALIGNMENT)])
def test_the_first_launch_compiles_the_other_alignment_too(on_device, align, other):
    """A kernel taking ``ALIGN``: its first launch also compiles (warms up) the other
    alignment with the same arguments, once; a kernel without ``ALIGN`` compiles nothing more."""
    kernel, x = Kernel(), torch.zeros(64)
    triton_jit.launch(kernel, (3, ), x, 100, SCALE=4, ALIGN=align, num_warps=8)
    assert kernel.warmups == [((3, ), (x, 100), dict(SCALE=4, ALIGN=other, num_warps=8))]
    triton_jit.launch(kernel, (3, ), x, 100, SCALE=4, ALIGN=align, num_warps=8)
    assert len(kernel.warmups) == 1 and len(kernel.compiled.launches) == 1
    plain = Kernel()
    triton_jit.launch(plain, (3, ), x, 100, SCALE=4)
    assert not plain.warmups


def test_a_launch_may_name_its_other_alignment(on_device):
    """Where a kernel aligns more than ``ALIGN`` (the attention's), the launch names the other
    variant's constexprs, and the first launch compiles that one, not the kernel."""
    kernel, x = Kernel(), torch.zeros(64)
    triton_jit.launch(kernel, (3, ), x, 100, SCALE=4, ALIGN=4, num_warps=8,
                      other_alignment=dict(ALIGN=1, SCALE=2))
    assert kernel.warmups == [((3, ), (x, 100), dict(SCALE=2, ALIGN=1, num_warps=8))]
    assert kernel.triton_calls and all('other_alignment' not in call[-1]
                                       for call in kernel.triton_calls)


@pytest.mark.parametrize('first, second', [(17, 1), (2 ** 36, 2 ** 64 - 32)],
                         ids=['one apart from other ints', 'signed and unsigned 64-bit'])
def test_int_classes_are_launched_apart(on_device, first, second):
    kernel, x = Kernel(), torch.zeros(64)
    triton_jit.launch(kernel, (1, ), x, first, SCALE=4)
    triton_jit.launch(kernel, (1, ), x, second, SCALE=4)
    assert len(kernel.triton_calls) == 2 and not kernel.compiled.launches


class OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA."""

    @property
    def is_cuda(self):
        return True


def test_a_tensor_off_cuda_where_one_on_cuda_was_launched_takes_tritons_path(on_device):
    """Triton's launcher refuses a host pointer (its first call for that key): a tensor off
    CUDA never reaches the direct launch, which passes addresses unchecked."""
    kernel, x = Kernel(), torch.zeros(64)
    triton_jit.launch(kernel, (1, ), x.as_subclass(OnCuda), 32, SCALE=4)
    triton_jit.launch(kernel, (1, ), x.as_subclass(OnCuda), 32, SCALE=4)
    assert len(kernel.triton_calls) == 1 and len(kernel.compiled.launches) == 1
    triton_jit.launch(kernel, (1, ), x, 32, SCALE=4)
    assert len(kernel.triton_calls) == 2 and len(kernel.compiled.launches) == 1


@pytest.mark.parametrize('change', ['dtype', 'alignment', 'int class', 'int width', 'constexpr',
                                    'option'])
def test_a_new_specialization_takes_tritons_path(on_device, change):
    kernel, x = Kernel(), torch.zeros(64)
    triton_jit.launch(kernel, (1, ), x, 32, SCALE=4, num_warps=8)
    args, meta = [x, 32], dict(SCALE=4, num_warps=8)
    if change == 'dtype':
        args[0] = x.double()
    elif change == 'alignment':
        args[0] = x[1:]  # 4 bytes past an aligned address
    elif change == 'int class':
        args[1] = 33  # not a multiple of 16
    elif change == 'int width':
        args[1] = 2 ** 36  # a multiple of 16 too, but 64-bit
    elif change == 'constexpr':
        meta['SCALE'] = 2
    else:
        meta['num_warps'] = 4
    triton_jit.launch(kernel, (1, ), *args, **meta)
    assert len(kernel.triton_calls) == 2 and not kernel.compiled.launches


@pytest.mark.parametrize('kinds', ['int for tensor', 'float for int'])
def test_an_argument_of_another_kind_takes_tritons_path(on_device, kinds):
    """The binder made at a kernel's first launch assumes its kinds of arguments; others
    are bound apart and never reach the launcher compiled for the first ones."""
    kernel, x = Kernel(), torch.zeros(64)
    for _ in range(2):
        triton_jit.launch(kernel, (1, ), x, 32, SCALE=4)
    args = (32, x) if kinds == 'int for tensor' else (x, 32.0)
    triton_jit.launch(kernel, (1, ), *args, SCALE=4)
    assert len(kernel.triton_calls) == 2 and len(kernel.compiled.launches) == 1
    assert kernel.triton_calls[1][1] == args


def test_switched_off_or_hooked_takes_tritons_path(on_device, monkeypatch):
    kernel, x = Kernel(), torch.zeros(64)
    monkeypatch.setattr(triton_jit, 'DIRECT_LAUNCH', False)
    for _ in range(2):
        triton_jit.launch(kernel, (1, ), x, 32, SCALE=4)
    monkeypatch.setattr(triton_jit, 'DIRECT_LAUNCH', True)
    monkeypatch.setattr(triton_jit, '_hook_set', lambda hook: True)  # a Triton profiler
    for _ in range(2):
        triton_jit.launch(kernel, (1, ), x, 32, SCALE=4)
    assert len(kernel.triton_calls) == 4 and not kernel.compiled.launches


def test_a_launcher_that_refuses_the_call_falls_back_once_for_all(on_device):
    kernel, x = Kernel(), torch.zeros(64)

    def refuse(*call):
        raise TypeError('function takes 12 positional arguments')
    kernel.compiled.launcher = refuse
    triton_jit.launch(kernel, (1, ), x, 32, SCALE=4)
    with pytest.warns(UserWarning, match='refused a direct kernel launch'):
        triton_jit.launch(kernel, (1, ), x, 32, SCALE=4)
    triton_jit.launch(kernel, (1, ), x, 32, SCALE=4)
    assert len(kernel.triton_calls) == 3 and not triton_jit.DIRECT_LAUNCH


def test_without_cuda_every_call_takes_tritons_path(monkeypatch):
    """Triton's interpreter (CPU tensors, CUDA not initialised) never caches."""
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: False)
    monkeypatch.setattr(triton_jit, '_launches', {})
    kernel, x = Kernel(), torch.zeros(64)
    for _ in range(2):
        triton_jit.launch(kernel, (1, ), x, 32, SCALE=4)
    assert len(kernel.triton_calls) == 2 and not triton_jit._launches


def test_eager_autograd_binds_no_arguments_through_inspect():
    """``eager_autograd`` runs a custom op's forward, setup_context and backward as one
    Function whose ``apply`` does not bind arguments through ``inspect.signature`` (60-100 us
    of host time a call for a Function with a separate ``setup_context``)."""
    import inspect
    from unittest import mock

    def forward(x, scale):
        return x * scale

    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[1]

    def backward(ctx, grad):
        return grad * ctx.scale, None

    Scale = triton_jit.eager_autograd('Scale', forward, setup_context, backward)
    assert Scale.__name__ == 'Scale' and issubclass(Scale, torch.autograd.Function)
    x = torch.randn(3, requires_grad=True)
    with mock.patch.object(inspect, 'signature', side_effect=AssertionError('bound through inspect')):
        y = Scale.apply(x, 3.0)
        y.sum().backward()
    torch.testing.assert_close(y, x.detach() * 3)
    torch.testing.assert_close(x.grad, torch.full((3,), 3.0))


@triton.jit
def _fill_kernel(ptr):
    triton.language.store(ptr, 1.0)


def test_kernels_not_launched():
    """Inside the scope a kernel call does nothing (no GPU, no interpreter needed); outside,
    this machine's Triton tries to launch it."""
    x = torch.zeros(1)
    with triton_jit.kernels_not_launched():
        _fill_kernel[(1,)](x)
    assert x.item() == 0.0
    if not torch.cuda.is_available() and os.environ.get('TRITON_INTERPRET') != '1':
        with pytest.raises(Exception):
            _fill_kernel[(1,)](x)


def test_alignment_is_8_only_where_every_size_and_stride_is_a_multiple_of_8():
    assert triton_jit.alignment(128 * 128, 96 * 128 * 128, 128 * 128) == triton_jit.ALIGNMENT
    assert triton_jit.alignment(0, 16) == triton_jit.ALIGNMENT  # a broadcast dimension's stride
    assert triton_jit.alignment(30 * 30, 96 * 30 * 30) == 1  # 900 = 8 * 112 + 4
    assert triton_jit.alignment(2 ** 40 + 8, 8) == triton_jit.ALIGNMENT  # 64-bit strides
    assert triton_jit.alignment(16, 24, 36) == 1


def test_partial_sum_rows_shared_past_their_count_unless_deterministic():
    from mmseg_segman.ops.triton_jit import empty_partial_sums, partial_sum_rows

    assert partial_sum_rows(3, 4) == (3, False) and partial_sum_rows(4, 4) == (4, False)
    assert partial_sum_rows(5, 4) == (4, True) and partial_sum_rows(500, 1) == (1, True)
    torch.use_deterministic_algorithms(True)
    try:
        assert partial_sum_rows(500, 1) == (500, False)
    finally:
        torch.use_deterministic_algorithms(False)
    zeroed = empty_partial_sums(2, 3, True, torch.device('cpu'))
    assert zeroed.dtype == torch.float32 and zeroed.shape == (2, 3) and not zeroed.any()
