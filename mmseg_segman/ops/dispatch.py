"""The one place that decides which backend runs each SegMAN op.

Every op under :mod:`mmseg_segman.ops` owns an :class:`OpDispatcher` that lists its backends
from fastest to slowest; the last one, ``torch``, is the pure-PyTorch reference and runs
anywhere. A backend is ``Backend(fn, unavailable)``: ``fn(*args)`` runs the op,
``unavailable(*args)`` returns ``None`` when the backend can run these inputs here and
otherwise a short reason (``'needs CUDA tensors'``, ``'natten has no libnatten'``).

Choosing backends. A choice names a backend of an op, or is ``None`` (automatic: the first
backend that can run the inputs). Choices come from three places; for each op the strongest
place that names it decides:

1. code: ``with use_backends(...)`` around the call (of nested scopes the innermost wins),
   e.g. ``with use_backends('torch'):`` (every op on its reference) or
   ``with use_backends(neighborhood_attention='flex'):``; a choice may also be a function
   with the op's arguments (the FLOP counter makes each op one trace node this way);
2. config: the ``op_backends`` of a model (``SegMANEncoder`` / ``SegMANHead``), active while
   that model's forward runs (and while activation checkpointing recomputes a block of it),
   never for another model;
3. environment: ``SEGMAN_BACKEND_<OP>`` (e.g. ``SEGMAN_BACKEND_NEIGHBORHOOD_ATTENTION``), then
   ``SEGMAN_BACKEND`` for every op that has a backend of that name (``torch``: the reference
   path everywhere).

Unknown op or backend names are refused with an error that names them: in code when the
scope is entered, in a config when the model is built, in the environment at the next op
call (variable names: when the environment's keys have changed, not while compiling). A
chosen backend that cannot run the inputs raises a ``RuntimeError`` saying who chose it and
why it cannot run them; automatic choice never fails (the reference runs anywhere).
The first time a backend runs eagerly for an op, one line says so in mmengine's log.

Scopes are process-wide while they are entered, as ``torch.backends``' switches are: enter
them in the thread that runs the model. They are plain lists, not :mod:`contextvars`, so that
``torch.compile`` traces a forward that enters one, with no graph break on any torch version,
and traces again when the scopes around a compiled call change. For non-reentrant
``torch.utils.checkpoint`` pass ``context_fn=recompute_in_current_scope`` so that the
recompute runs on the same backends.
"""
import importlib.util
import os
from contextlib import contextmanager, nullcontext
from functools import lru_cache, wraps
from typing import (Callable, ContextManager, Dict, Hashable, Iterator, List, Mapping, NamedTuple,
                    Optional, Sequence, Tuple, Union)

import torch
from mmengine.logging import print_log
from torch.utils.weak import WeakIdKeyDictionary

Choice = Union[str, Callable, None]
# op -> (choice, who made it), one mapping per place that can choose
_Layer = Dict[str, Tuple[Choice, str]]
# the scopes entered and not yet left, outermost first; each entry holds its own choices
# merged over those of the scopes around it, so the last entry is what holds now
_code: List[_Layer] = []
_config: List[_Layer] = []
_registry: Dict[str, 'OpDispatcher'] = {}
_ENV = 'SEGMAN_BACKEND'


class Backend(NamedTuple):
    """A way to run an op: ``fn`` runs it; ``unavailable(*args)`` is ``None`` when it can run
    these inputs here, else the reason why not."""
    fn: Callable
    unavailable: Callable[..., Optional[str]]


def runs_anywhere(*args, **kwargs) -> None:
    """``unavailable`` of the pure-PyTorch reference backends: never."""
    return None


def triton_unavailable(x: torch.Tensor) -> Optional[str]:
    """``None`` where a Triton backend can run on ``x``'s device: CUDA, or the CPU under
    ``TRITON_INTERPRET=1`` (Triton's interpreter, for CI), with triton installed; else why not."""
    if not x.is_cuda and os.environ.get('TRITON_INTERPRET') != '1':
        return 'needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)'
    return None if TRITON_INSTALLED else 'triton is not installed'


# whether triton is installed, looked up once without importing it (a function with an
# lru_cache would make dynamo warn when it traces a forward)
TRITON_INSTALLED = importlib.util.find_spec('triton') is not None


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_float_unavailable(x: torch.Tensor) -> Optional[str]:
    """``None`` where a Triton backend can run on ``x``: where Triton runs
    (:func:`triton_unavailable`), on a float32, bfloat16 or float16 map computed in one of
    those."""
    reason = triton_unavailable(x)
    if reason is not None:
        return reason
    if x.dtype not in TRITON_DTYPES or autocast_dtype(x) not in TRITON_DTYPES:
        return (f'{x.dtype} maps (computed in {autocast_dtype(x)}) are not float32, bfloat16 '
                'or float16')
    return None


def traced() -> bool:
    """Whether the code runs under ``torch.compile``, a jit trace or an ONNX export (where what
    it does is recorded into a graph that may serve other sizes and calls)."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export())


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast computes in on ``x``'s device where it is on, else ``x``'s dtype."""
    device_type = 'cuda' if x.is_cuda else x.device.type  # is_cuda: no device object made
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call where ``t`` has that dtype already (a no-op ``to``
    costs about 1 us of host time on the development CPU; a SegMAN-T forward made 185 ``to``
    calls, docs/benchmarks.md)."""
    return t if t.dtype == dtype else t.to(dtype)


_kept = WeakIdKeyDictionary()  # tensor -> ((what, address, version), the value made of it)


def kept(t: torch.Tensor, what: Hashable, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``make(t.detach())``, kept from call to call while ``t`` is unchanged (same address,
    not written in place since; one value a tensor, ``what`` naming how it was made, freed
    with ``t``): what an op makes of a parameter at every eager inference call (a weight in
    the compute dtype, :func:`cast_kept`; the attention's bias table). Not for tensors that
    autograd records, which change at every step. Nothing is kept where the value would
    belong to something else: while ``torch.compile`` traces (inductor makes it at every
    call), under a ``FakeTensorMode``, for an inference-mode tensor (which has no version),
    while a CUDA graph captures (a value made then is the graph's, made again at each
    replay; one kept before is read, and
    :class:`~mmseg_segman.models.cuda_graphs.InferenceGraph` captures again once a tensor it
    was made of is written in place, so that its replays never read a stale one)."""
    if torch.compiler.is_compiling() or _fake_mode_on() or t.is_inference():
        return make(t.detach())
    key = (what, t.data_ptr(), t._version)
    entry = _kept.get(t)
    if entry is not None and entry[0] == key:
        return entry[1]
    value = make(t.detach())
    if not (t.is_cuda and torch.cuda.is_current_stream_capturing()):
        _kept[t] = (key, value)
    return value


def kept_from(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Those of ``tensors`` that :func:`kept` holds a value made of."""
    return [t for t in tensors if t in _kept]


def cast_kept(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`cast`, :func:`kept` (a view, such as ``weight[:, :, None, None]``, through its
    contiguous base): a 1x1 kernel reads a bfloat16 weight rather than rounding the float32
    one in every tile (SegMAN-L's stage-3 products 62.0 -> 48.8 us, docs/benchmarks.md)."""
    if t.dtype == dtype:
        return t
    base = t if t._base is None else t._base
    if not base.is_contiguous():
        return t.to(dtype)
    copy = kept(base, dtype, lambda b: b.to(dtype))
    if base is t:
        return copy
    return copy.as_strided(t.shape, t.stride(), t.storage_offset() - base.storage_offset())


def _fake_mode_on() -> bool:
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def promote_types(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types(a, b)``, without the call where they are equal."""
    return a if a == b else torch.promote_types(a, b)


def planes_contiguous(x: torch.Tensor) -> bool:
    """Whether each ``H x W`` plane of ``x (B, C, H, W)`` is contiguous (a channel slice of
    a contiguous map is): the layout the Triton kernels read, with any batch and channel
    strides."""
    return x.stride(3) == 1 and x.stride(2) == x.size(3)


def with_contiguous_planes(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself where :func:`planes_contiguous`, else a contiguous copy."""
    return x if planes_contiguous(x) else x.contiguous()


# the device types autocast exists for (all but meta), probed once: torch 2.11's dynamo does not
# trace torch.amp.is_autocast_available (a graph break), a set membership it does
_AUTOCAST_DEVICE_TYPES = frozenset(
    device_type for device_type in ('cpu', 'cuda', 'xpu', 'hpu', 'mps', 'xla', 'mtia', 'maia',
                                    torch._C._get_privateuse1_backend_name())
    if torch.amp.is_autocast_available(device_type))


def autocast_off(device_type: str) -> ContextManager[None]:
    """Autocast disabled on ``device_type`` (nothing to disable where it does not exist, such as
    the meta device)."""
    if device_type in _AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def tensor_cache(maxsize: int) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """``functools.lru_cache`` for a function that makes a tensor from hashable arguments (a
    resize matrix, a window's one-hot classes), bypassed while ``torch.compile`` traces
    (dynamo would trace through the cache) and under a ``FakeTensorMode`` (a fake tensor holds
    no memory: a later real call given it would read none, docs/benchmarks.md)."""

    def decorate(build: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        cached = lru_cache(maxsize=maxsize)(build)

        @wraps(build)
        def get(*args, **kwargs) -> torch.Tensor:
            if torch.compiler.is_compiling() or _fake_mode_on():
                return build(*args, **kwargs)
            return cached(*args, **kwargs)

        get.cache_clear = cached.cache_clear
        return get

    return decorate


def registered_ops() -> Dict[str, 'OpDispatcher']:
    return dict(_registry)


def _dispatcher(op: str) -> 'OpDispatcher':
    if op not in _registry:
        raise ValueError(f'unknown SegMAN op {op!r}; known ops: {sorted(_registry)}')
    return _registry[op]


def _every_op(backend: str, source: str) -> Dict[str, str]:
    """``backend`` for every op that has it; refused if none has."""
    ops = {op: backend for op, d in _registry.items() if backend in d.backends}
    if not ops:
        names = sorted({name for d in _registry.values() for name in d.backends})
        raise ValueError(f'{source}: no SegMAN op has a backend {backend!r}; backends: {names}')
    return ops


def _layer(choices: Mapping[str, Choice], source: str, callables: bool) -> _Layer:
    """Checked ``{op: (choice, source)}``."""
    layer = {}
    for op, choice in choices.items():
        dispatcher = _dispatcher(op)
        if isinstance(choice, str):
            dispatcher.check_name(choice, source)
        elif choice is not None and not (callables and callable(choice)):
            raise TypeError(f'{source}: the backend of {op!r} must be a backend name or None, '
                            f'got {choice!r}')
        layer[op] = (choice, source)
    return layer


def _current(scopes: List[_Layer]) -> _Layer:
    """The choices of the entered ``scopes``; the innermost wins."""
    return scopes[-1] if scopes else {}


@contextmanager
def _entered(scopes: List[_Layer], layer: _Layer) -> Iterator[None]:
    if not layer:
        yield
        return
    scopes.append({**_current(scopes), **layer})
    try:
        yield
    finally:
        scopes.pop()


def use_backends(choices: Union[str, Mapping[str, Choice], None] = None,
                 **by_op: Choice) -> ContextManager[None]:
    """A scope in which the SegMAN ops run on the given backends (strongest of all choices).

    ``choices`` is a backend name for every op that has it (``'torch'``: the reference path)
    or ``{op: backend}``; keywords add ``op=backend``. ``None`` is automatic choice.
    """
    if isinstance(choices, str):
        choices = _every_op(choices, f'use_backends({choices!r})')
    merged = {**(choices or {}), **by_op}
    return _entered(_code, _layer(merged, f'use_backends({merged})', callables=True))


def check_op_backends(op_backends: Optional[Mapping[str, Optional[str]]],
                      owner: str) -> Dict[str, Optional[str]]:
    """A model's ``op_backends`` config, checked (unknown names refused) and copied."""
    _layer(op_backends or {}, f'{owner}(op_backends={op_backends})', callables=False)
    return dict(op_backends or {})


def with_op_backends(forward: Callable) -> Callable:
    """Decorates a model's ``forward``: its ``self.op_backends`` choose while it runs."""

    @wraps(forward)
    def scoped(self, *args, **kwargs):
        layer = {op: (choice, f'{type(self).__name__}(op_backends)')
                 for op, choice in self.op_backends.items()}
        with _entered(_config, layer):
            return forward(self, *args, **kwargs)

    return scoped


def recompute_in_current_scope() -> Tuple[ContextManager, ContextManager]:
    """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: the recompute in the
    backward pass runs under the backend choices active during the forward."""
    code, config = _current(_code), _current(_config)

    @contextmanager
    def restored() -> Iterator[None]:
        with _entered(_code, code), _entered(_config, config):
            yield

    return nullcontext(), restored()


_checked_environment_keys: Tuple = ()


# os.environ's own dict (of bytes on POSIX): its keys compare at C speed, and a value read
# from it skips os.environ's encoding of the name and decoding of the value (a few us a call)
_RAW_ENVIRON = getattr(os.environ, '_data', None)
_RAW_ENVIRON_IS_BYTES = os.name == 'posix' and isinstance(_RAW_ENVIRON, dict)


def _check_environment_names() -> None:
    """Refuse ``SEGMAN_BACKEND_<X>`` variables that name no op. The names are decoded and
    scanned again only when the environment's keys have changed (compared as os.environ's
    raw keys, at C speed: an op call would otherwise pay about 0.1 ms of host time)."""
    global _checked_environment_keys
    if torch.compiler.is_compiling():
        return
    keys = tuple(_RAW_ENVIRON if _RAW_ENVIRON is not None else os.environ)
    if keys == _checked_environment_keys:
        return
    for key in os.environ:
        if key.startswith(_ENV + '_') and key[len(_ENV) + 1:].lower() not in _registry:
            raise ValueError(f'environment variable {key} names no SegMAN op; known ops: '
                             f'{sorted(_registry)}')
    _checked_environment_keys = keys


def _environment_value(name: str) -> Optional[str]:
    """``os.environ.get(name)``."""
    if not _RAW_ENVIRON_IS_BYTES:
        return os.environ.get(name)
    value = _RAW_ENVIRON.get(_raw_names.get(name) or name.encode())
    return None if value is None else os.fsdecode(value)


# variable name -> its bytes in os.environ's own dict, encoded once (not at every op call) for
# every name the ops read, as they are registered: never changed while a forward runs, since
# torch.compile guards on it (a first call that filled it made a second compilation)
_raw_names: Dict[str, bytes] = {_ENV: _ENV.encode()}


def _environment_choice(op: str, specific: str) -> Optional[Tuple[Choice, str]]:
    """``specific`` (``SEGMAN_BACKEND_<OP>``), else ``SEGMAN_BACKEND``; unknown names refused."""
    _check_environment_names()
    value = _environment_value(specific)
    if value:
        _registry[op].check_name(value, f'{specific}={value}')
        return value, specific
    general = _environment_value(_ENV)
    if general and op in _every_op(general, f'{_ENV}={general}'):
        return general, _ENV
    return None


class OpDispatcher:
    """Picks and runs one backend of the op ``name``.

    Args:
        name: the op's name, as used by choices and logs.
        backends: ``{backend name: Backend}``, fastest first; the last one must be the
            pure-PyTorch reference, available everywhere.
    """

    def __init__(self, name: str, backends: Dict[str, Backend]):
        self.name = name
        self.backends = dict(backends)
        self._environment_name = f'{_ENV}_{name.upper()}'
        _raw_names[self._environment_name] = self._environment_name.encode()
        self._logged = set()
        _registry[name] = self

    def check_name(self, backend: str, source: str = 'backend choice') -> None:
        if backend not in self.backends:
            raise ValueError(f'{source}: op {self.name!r} has no backend {backend!r}; '
                             f'choose one of {list(self.backends)}')

    def requested(self) -> Optional[Tuple[Choice, str]]:
        """The strongest choice for this op and who made it, or ``None`` (automatic)."""
        if _code and self.name in _code[-1]:
            return _code[-1][self.name]
        if _config and self.name in _config[-1]:
            return _config[-1][self.name]
        return _environment_choice(self.name, self._environment_name)

    def why_not(self, backend: str, *args, **kwargs) -> Optional[str]:
        """Why ``backend`` cannot run these inputs here, or ``None`` if it can."""
        reason = self.backends[backend].unavailable(*args, **kwargs)
        if reason is not None and not isinstance(reason, str):
            raise self._not_a_reason(backend, reason)
        return reason

    def _not_a_reason(self, backend: str, reason: object) -> TypeError:
        return TypeError(f'unavailable() of backend {backend!r} of op {self.name!r} must '
                         f'return None or a reason string, got {reason!r}')

    def resolve(self, *args, **kwargs) -> Tuple[str, Callable]:
        """The name and function of the backend that runs these inputs."""
        choice, source = self.requested() or (None, None)
        if callable(choice):
            return getattr(choice, '__name__', repr(choice)), choice
        if choice is not None:
            reason = self.why_not(choice, *args, **kwargs)
            if reason is not None:
                raise RuntimeError(f'backend {choice!r} of op {self.name!r} (chosen by {source}) '
                                   f'cannot run these inputs: {reason}')
            return choice, self.backends[choice].fn
        for name, backend in self.backends.items():
            reason = backend.unavailable(*args, **kwargs)
            if reason is None:
                return name, backend.fn
            if not isinstance(reason, str):
                raise self._not_a_reason(name, reason)
        raise RuntimeError(f'no backend of op {self.name!r} can run these inputs')

    def select(self, *args, **kwargs) -> str:
        """The name of the backend that would run these inputs."""
        return self.resolve(*args, **kwargs)[0]

    def __call__(self, *args, **kwargs):
        name, fn = self.resolve(*args, **kwargs)
        # not while torch.compile traces: logging would break the graph
        if name not in self._logged and not torch.compiler.is_compiling():
            self._logged.add(name)
            print_log(f'SegMAN op {self.name}: running backend {name!r}', logger='current')
        return fn(*args, **kwargs)
