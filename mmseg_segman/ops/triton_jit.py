"""``triton.jit`` for kernels whose sizes and strides stay runtime values (and the alignment
that such a kernel may assume of them), the exact GELU's normal distribution in a kernel,
the launch of a compiled kernel without Triton's per-call work, when a Triton backend needs
its autograd wrapper, and the precision of float32 products; kernels made no-ops, for
counting without a GPU."""
import inspect
import math
import os
import warnings
from contextlib import contextmanager
from typing import Callable, Collection, Dict, Iterator, Optional, Sequence, Tuple, Type

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel


def jit_with_runtime_ints(runtime_ints: Collection[str]) -> Callable:
    """``triton.jit`` that does not specialise the kernel on the int arguments named in
    ``runtime_ints``. Triton otherwise specialises every int argument on being 1, a multiple
    of 16 or neither, and compiles the kernel again when that changes: for sizes and the
    strides that follow them, at new input sizes."""

    def decorate(fn: Callable):
        names = [name for name in inspect.signature(fn).parameters if name in runtime_ints]
        return triton.jit(do_not_specialize=names)(fn)

    return decorate


ALIGNMENT = 8  # elements: 16 bytes of a 16-bit map, the widest load or store of a thread


def alignment(*ints: int) -> int:
    """The ``ALIGN`` of a launch whose kernel takes ``ints`` (sizes and strides, in elements)
    through :func:`aligned`: :data:`ALIGNMENT` where every one is a multiple of it (SegMAN's
    maps at 512x512 and most other sizes), else 1. Two compilations of a kernel at most."""
    return ALIGNMENT if math.gcd(*ints) % ALIGNMENT == 0 else 1


@triton.jit
def aligned(n, ALIGN: tl.constexpr):
    """``n``, which the host checked to be a multiple of ``ALIGN`` (:func:`alignment`), as the
    compiler then knows it to be. A runtime int (:func:`jit_with_runtime_ints`) is otherwise
    of unknown alignment, so Triton moves one element a thread per load and store along the
    rows it offsets: 2 bytes of a bfloat16 map where it could move 16."""
    return n // ALIGN * ALIGN


# the exact GELU's constants, and whether Triton's interpreter runs the kernels (it runs no
# inline PTX; read once, as Triton reads it)
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
LOG2_E = tl.constexpr(1.4426950408889634)
_INTERPRETED = tl.constexpr(os.environ.get('TRITON_INTERPRET') == '1')


@triton.jit
def reciprocal(x):
    """``1 / x`` for float32 ``x``: the GPU's approximate reciprocal (one ``MUFU.RCP``, at most
    1 ulp off; Triton's division takes several instructions more), an exact division in
    Triton's interpreter."""
    if _INTERPRETED:
        return 1.0 / x
    return tl.inline_asm_elementwise('rcp.approx.ftz.f32 $0, $1;', '=r,r', [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def running_norm_scale_and_shift(mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, channels, mask):
    """A batch norm by its running statistics as ``x * scale + shift``, float32, for
    ``channels`` (a scalar or a vector, loaded where ``mask``): ``scale = gamma / sqrt(var +
    eps)``, ``shift = beta - mean * scale``."""
    scale = tl.load(gamma_ptr + channels, mask=mask, other=0.0).to(tl.float32) / tl.sqrt(
        tl.load(var_ptr + channels, mask=mask, other=1.0).to(tl.float32) + eps)
    shift = tl.load(beta_ptr + channels, mask=mask, other=0.0).to(tl.float32) \
        - tl.load(mean_ptr + channels, mask=mask, other=0.0).to(tl.float32) * scale
    return scale, shift


@triton.jit
def normal_cdf_and_density(x):
    """``Phi(x) = (1 + erf(x / sqrt 2)) / 2`` and ``exp(-x^2 / 2)`` for float32 ``x``, erf by
    Abramowitz and Stegun 7.1.26 (absolute error at most 1.5e-7): ``Phi`` is ``1 - tail`` for
    ``x >= 0`` and ``tail`` below, ``tail = t P(t) exp(-x^2 / 2) / 2`` with ``t = 1 / (1 + p
    |x| / sqrt 2)``: one reciprocal and one ``exp2``. With libdevice's ``erf`` the GELU added
    143 us to SegMAN-L's first-stage ``fc1`` at batch 16 (150 us without it) and spilled
    registers; this adds 63 (docs/benchmarks.md)."""
    z = tl.abs(x) * SQRT_HALF
    t = reciprocal(1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                            + t * 1.061405429))))
    density = tl.math.exp2(z * z * -LOG2_E)
    tail = 0.5 * poly * density
    return tl.where(x < 0, tail, 1.0 - tail), density


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints: ``triton.cdiv`` outside kernels, without the cost of its
    ``constexpr_function`` wrapper (a few us of host time a call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two ``>= n`` for ``n >= 1``, as ``triton.next_power_of_2``."""
    return 1 << max(0, n - 1).bit_length()


def partial_sum_rows(blocks: int, shared_rows: int) -> Tuple[int, bool]:
    """``(rows, atomic)``: where ``blocks`` programs each make partial sums of one set of
    gradients, the rows of partial sums they write, and whether programs add into shared
    rows. One row a program (stored, summed by PyTorch in a fixed order: deterministic) up to
    ``shared_rows`` programs or under ``torch.use_deterministic_algorithms``; else
    ``shared_rows`` rows (zeroed first), program ``i`` adding into row ``i % shared_rows`` by
    float32 atomics, whose order varies from run to run (a pass less over rows that PyTorch
    wrote and read back, or a launch less where one row is left)."""
    if blocks <= shared_rows or torch.are_deterministic_algorithms_enabled():
        return blocks, False
    return shared_rows, True


def empty_partial_sums(rows: int, columns: int, atomic: bool, device: torch.device) -> torch.Tensor:
    """Float32 ``(rows, columns)`` partial sums: zeroed where programs add into them."""
    return (torch.zeros if atomic else torch.empty)(rows, columns, dtype=torch.float32,
                                                    device=device)


def empty_channels_first(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor of ``like``'s ``(B, heads, H, W, d)`` shape and dtype, laid out as
    ``(B, heads, d, H, W)``: as the head vectors of a ``(B, C, H, W)`` map, which the model
    reads the attention's output and the ``qkv`` projection's gradient as (views)."""
    batch, heads, height, width, dim = like.shape
    return like.new_empty(batch, heads, dim, height, width).permute(0, 1, 3, 4, 2)


def records_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd records an op on ``tensors`` (``None`` allowed): where it does not
    (inference), a backend launches its kernel without an ``autograd.Function`` around it."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def eager_autograd(name: str, forward: Callable, setup_context: Callable,
                   backward: Callable) -> Type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` named ``name`` for the eager calls of a custom op's
    kernels (the custom op's dispatch costs host time at every call): ``forward(*inputs)``,
    then ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` as the custom op
    registers them. Its ``forward`` takes ``ctx`` itself: a Function with a separate
    ``setup_context`` has its arguments bound through ``inspect.signature`` at every call
    (60-100 us of host time a call on the CPU, docs/benchmarks.md)."""

    def forward_with_ctx(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), dict(
        __doc__=f'Eager autograd of ``{getattr(forward, "__name__", forward)}``.',
        forward=staticmethod(forward_with_ctx), backward=staticmethod(backward)))


class TritonAutogradOp:
    """A Triton op as two ``torch.library`` custom ops, ``mmseg_segman::<name>_forward`` and
    ``mmseg_segman::<name>_backward`` (what ``torch.compile`` traces, their fake
    implementations giving the outputs' shapes), the forward one with its autograd, and as a
    ``torch.autograd.Function`` (:func:`eager_autograd`) for eager calls: a custom op's
    dispatch cost 20-45 us of host time a call on the GPU machine
    (``tools/gpu_checks/check_host_time.py --ops``).

    ``forward(*inputs)`` and ``backward(*args)`` return new tensors (no output a view of an
    input or of another output) and are typed as custom ops need (``List[int]``, not
    ``Sequence``; a tensor that needs a gradient is an argument of its own);
    ``setup_context(ctx, inputs, output)`` keeps what the backward pass needs;
    ``gradients(forward, backward)`` makes the autograd backward ``(ctx, *output_grads) ->
    input grads`` that computes with those two: the custom ops under ``torch.compile``, the
    functions eagerly. ``direct(*inputs)``: what runs eagerly where autograd does not record,
    returning what ``forward`` does (default ``forward``)."""

    def __init__(self, name: str, forward: Callable, forward_fake: Callable, backward: Callable,
                 backward_fake: Callable, setup_context: Callable,
                 gradients: Callable[[Callable, Callable], Callable],
                 direct: Optional[Callable] = None):
        self.forward_op = torch.library.custom_op(f'mmseg_segman::{name}_forward', forward,
                                                  mutates_args=())
        self.forward_op.register_fake(forward_fake)
        self.backward_op = torch.library.custom_op(f'mmseg_segman::{name}_backward', backward,
                                                   mutates_args=())
        self.backward_op.register_fake(backward_fake)
        self.forward_op.register_autograd(gradients(self.forward_op, self.backward_op),
                                          setup_context=setup_context)
        self.function = eager_autograd(f'{name}_function', forward, setup_context,
                                       gradients(forward, backward))
        self.direct = direct or forward

    def __call__(self, *inputs, records: bool):
        """The forward's outputs: through the custom op under ``torch.compile``; eagerly
        through :attr:`function` where ``records`` (autograd records the op, see
        :func:`records_autograd`), else :attr:`direct` (no autograd node)."""
        if torch.compiler.is_compiling():
            return self.forward_op(*inputs)
        if records:
            return self.function.apply(*inputs)
        return self.direct(*inputs)


@contextmanager
def kernels_not_launched() -> Iterator[None]:
    """Every Triton kernel call a no-op, compiled or under Triton's interpreter: the host's
    side of the ops alone, for counting without a GPU (outputs are left as allocated)."""
    from unittest import mock

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def no_launch(self, *args, **kwargs):
        return None

    with mock.patch.object(JITFunction, 'run', no_launch), \
            mock.patch.object(InterpretedFunction, 'run', no_launch):
        yield


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for products of ``dtype`` as PyTorch's matmuls make them:
    float32-accurate (three TF32 products on the tensor cores, ``tf32x3``) unless TF32 is
    allowed; ignored for 16-bit inputs."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == 'highest':
        return 'tf32x3'
    return 'tf32'


def conv_dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for ``dtype`` maps as cuDNN's convolutions make them:
    TF32 where ``torch.backends.cudnn.allow_tf32`` (PyTorch's default), else float32-accurate
    (``tf32x3``); ignored for 16-bit maps. A kernel standing in for ``F.conv2d`` uses this
    one, not :func:`dot_precision`."""
    return 'tf32' if dtype != torch.float32 or torch.backends.cudnn.allow_tf32 else 'tf32x3'


def _int_key(name: str) -> str:
    """The expression of an int argument's specialization: 1, a multiple of 16 or neither
    (0) for a 32-bit int; its width (signed or unsigned 64-bit) and divisibility by 16 else."""
    # compared, not `in range(...)`: a float in a range is searched for element by element
    # (a minute for a float where an int was)
    return (f'((1 if {name} == 1 else 16 if {name} % 16 == 0 else 0) '
            f'if -2147483648 <= {name} < 2147483648 '
            f'else ("u64" if {name} >= 2 ** 63 else "i64", {name} % 16 == 0))')


def _binder(args: Sequence) -> Callable[..., Tuple[Tuple, Tuple]]:
    """A function of ``len(args)`` positional arguments that returns the specialization key of
    its arguments (what Triton compiles a kernel for) and the values the compiled launcher
    gets, generated for the kinds of ``args``: each a tensor, an int or another scalar.

    A tensor counts by its dtype, whether its address is 16-byte aligned and whether it is on
    CUDA, and is passed as its address: the launcher takes an int as it is, where for a tensor
    it would call ``data_ptr()`` and ask the driver about the pointer
    (``cuPointerGetAttribute``), for every tensor of every launch. A tensor not on CUDA has a
    key of its own, which Triton's path refuses (its first call), so it is never launched
    directly. An int counts by whether it is 1 or a multiple of 16 and by its width (32-bit,
    64-bit or unsigned 64-bit), and whether all ints are of type ``int``; None and bools by
    value, other scalars by type. Conservative: a key finer than Triton's only sends more
    calls through Triton's own path. The key starts with the kinds; an argument of another
    kind than the binder was made for raises (``AttributeError`` or ``TypeError``: a tensor's
    attributes, an int's arithmetic) or gives another key.

    The code is generated, as Triton's own binder is, so that a launch pays no loop over its
    arguments and no test of their kinds: the alignments are tested at once, as one OR of the
    addresses (2.4 against 6.7 us for 19 arguments on the CPU, docs/benchmarks.md)."""
    names = [f'a{i}' for i in range(len(args))]
    tensors = [n for n, a in zip(names, args) if isinstance(a, torch.Tensor)]
    scalars = [n for n in names if n not in tensors]
    pointers = {n: f'p{n[1:]}' for n in tensors}
    kinds = ''.join('t' if n in tensors else 'i' if type(a) is int else 's'
                    for n, a in zip(names, args))
    key = [repr(kinds)] + [f'{n}.dtype' for n in tensors]
    if tensors:
        addresses = ' | '.join(pointers.values())
        key += [f'not ({addresses}) & 15 or ({", ".join(f"{p} & 15" for p in pointers.values())},)',
                ' and '.join(f'{n}.is_cuda' for n in tensors)]
    ints = [n for n, a in zip(names, args) if n in scalars and type(a) is int]
    if ints:
        key.append(' and '.join(f'type({n}) is int' for n in ints))
    key += [_int_key(n) if n in ints else f'{n} if {n} is None or type({n}) is bool else type({n})'
            for n in scalars]
    values = [pointers.get(n, n) for n in names]
    source = (f'def bind({", ".join(names)}):\n'
              + ''.join(f'    {p} = {n}.data_ptr()\n' for n, p in pointers.items())
              + f'    return ({", ".join(key)},), ({", ".join(values)},)\n')
    namespace = {}
    exec(source, namespace)
    return namespace['bind']


# (id of the kernel, a module-level object that lives as long as the process; device;
# specialization of the arguments; keyword arguments) -> the compiled
# kernel's launcher, its function handle, packed metadata and the values of the parameters
# passed by keyword or left to their defaults, in the kernel's parameter order
_Launch = Tuple[Callable, object, object, Tuple]
_launches: Dict[Tuple, _Launch] = {}
# (id of the kernel, number of positional arguments) -> the binder made at its first launch
_binders: Dict[Tuple[int, int], Callable] = {}
# read once, as Triton's own switches are: set it before the process starts
DIRECT_LAUNCH = os.environ.get('SEGMAN_TRITON_DIRECT_LAUNCH', '1') != '0'


def _current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def _hook_set(hook) -> bool:
    """Whether a Triton launch hook is set: a function, or a hook chain with calls."""
    return hook is not None and bool(getattr(hook, 'calls', True))


def _direct_launch_possible() -> bool:
    """:data:`DIRECT_LAUNCH` (``SEGMAN_TRITON_DIRECT_LAUNCH=0`` turns it off), and no launch
    hook set (a Triton profiler sees every launch through Triton's path)."""
    runtime = getattr(getattr(triton, 'knobs', None), 'runtime', None)
    return DIRECT_LAUNCH and runtime is not None and not _hook_set(runtime.launch_enter_hook) \
        and not _hook_set(runtime.launch_exit_hook)


def launch(kernel, grid: Sequence[int], *args, other_alignment: Optional[dict] = None,
           **meta) -> None:
    """``kernel[grid](*args, **meta)``, the first time for each specialization (Triton binds the
    arguments, finds or compiles the kernel and launches it), then as a direct call of the
    compiled kernel's launcher on the current stream: Triton's launch path costs about 20 us
    more host time a call on the H100 machines, and a SegMAN-B training step launches about a
    thousand Triton kernels (docs/benchmarks.md). Positional ``args`` are the kernel's
    leading parameters; ``meta`` holds the rest (constexprs) and launch options
    (``num_warps``, ``num_stages``); ``other_alignment``, see :func:`other_alignment_of`.
    Under Triton's interpreter, or where :func:`_direct_launch_possible` is false, every call
    takes Triton's path."""
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else -1
    if device < 0 or not _direct_launch_possible():
        kernel[grid](*args, **meta)
        return
    binder = _binders.get((id(kernel), len(args)))
    if binder is None:
        binder = _binders[id(kernel), len(args)] = _binder(args)
    try:
        specialization, values = binder(*args)
    except (AttributeError, TypeError):  # arguments of other kinds: a binder for them
        specialization, values = _binder(args)(*args)
    key = (id(kernel), device, specialization, tuple(meta.items()))
    entry = _launches.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **meta)
        if isinstance(compiled, CompiledKernel):
            rest = kernel.params[len(args):]
            tail = tuple(meta[p.name] if p.name in meta else p.default for p in rest)
            _launches[key] = (compiled.run, compiled.function, compiled.packed_metadata, tail)
            _compile_other_alignment(kernel, grid, args, meta, other_alignment)
        return
    run, function, packed_metadata, tail = entry
    try:
        run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
            _current_stream(device), function, packed_metadata, None, None, None, *values, *tail)
    except TypeError as error:  # a Triton whose launcher takes other arguments
        _stop_direct_launch(error)
        kernel[grid](*args, **meta)


def other_alignment_of(meta: dict, named: Optional[dict] = None) -> Optional[dict]:
    """The constexprs that a launch with ``meta`` changes for its kernel's other alignment:
    ``named`` where the launch names them (the attention's, which align more than ``ALIGN``:
    :func:`~.triton_neighborhood_attention.load_alignment`), else ``ALIGN`` 1 for 8 and 8 for
    1; None for a kernel without ``ALIGN``."""
    if named is None and meta.get('ALIGN') is not None:
        return {'ALIGN': 1 if meta['ALIGN'] == ALIGNMENT else ALIGNMENT}
    return named


def _compile_other_alignment(kernel, grid: Sequence[int], args: Sequence, meta: dict,
                             named: Optional[dict] = None) -> None:
    """With the first launch of a kernel that takes ``ALIGN`` (:func:`aligned`), compile
    (without launching) its other alignment (:func:`other_alignment_of`) for the same
    arguments: a process that has met only maps whose sizes are multiples of 8, or only
    others, would otherwise compile at its first image of the other kind (five kernels and
    about 4 s at SegMAN-T's first new shape after a 480x480 warm-up on an H100,
    docs/benchmarks.md). Found in Triton's cache when it was compiled before."""
    other = other_alignment_of(meta, named)
    if other is not None:
        kernel.warmup(*args, grid=grid, **{**meta, **other})


def _stop_direct_launch(error: Exception) -> None:
    global DIRECT_LAUNCH
    DIRECT_LAUNCH = False
    warnings.warn(f'Triton {triton.__version__} refused a direct kernel launch ({error}); '
                  'SegMAN launches its kernels through Triton from now on (slower on the host)')
