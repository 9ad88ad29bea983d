"""The one place that decides which backend runs each SegMAN op.

Every op under :mod:`mmseg_segman.ops` owns an :class:`OpDispatcher` that lists its
backends from fastest to slowest; the first one that is available for the given inputs
runs, unless an override names another. Overrides, strongest first:

1. :func:`set_backend` (what the ``op_backends`` key of ``SegMANEncoder`` / ``SegMANHead``
   configs calls), e.g. ``set_backend('selective_scan', 'torch')``;
2. the environment variable ``SEGMAN_BACKEND_<OP>`` (e.g. ``SEGMAN_BACKEND_SELECTIVE_SCAN``);
3. the environment variable ``SEGMAN_BACKEND`` for every op (``torch`` forces the reference
   paths everywhere).

The first time a backend runs for an op, one line says so in mmengine's log.
"""
import os
from typing import Callable, Dict, NamedTuple, Optional

from mmengine.logging import print_log

_overrides: Dict[str, str] = {}
_registry: Dict[str, 'OpDispatcher'] = {}


class Backend(NamedTuple):
    """A way to run an op: ``fn`` runs it, ``available(*args)`` says whether it can."""
    fn: Callable
    available: Callable[..., bool]


def set_backend(op: str, backend: Optional[str]) -> None:
    """Force ``op`` onto ``backend`` (``None`` restores automatic choice)."""
    if op not in _registry:
        raise KeyError(f'unknown SegMAN op {op!r}; known ops: {sorted(_registry)}')
    if backend is not None:
        _registry[op].check_name(backend)
        _overrides[op] = backend
    else:
        _overrides.pop(op, None)


def set_backends(op_backends: Optional[Dict[str, Optional[str]]]) -> None:
    """Apply a ``{op: backend}`` mapping, as given by a config's ``op_backends`` key."""
    for op, backend in (op_backends or {}).items():
        set_backend(op, backend)


def registered_ops() -> Dict[str, 'OpDispatcher']:
    return dict(_registry)


class OpDispatcher:
    """Picks and runs one backend of the op ``name``.

    Args:
        name: the op's name, as used by overrides and logs.
        backends: ``{backend name: Backend}``, fastest first; the last one must be the
            pure-PyTorch reference, available everywhere.
    """

    def __init__(self, name: str, backends: Dict[str, Backend]):
        self.name = name
        self.backends = dict(backends)
        self._logged = set()
        _registry[name] = self

    def check_name(self, backend: str) -> None:
        if backend not in self.backends:
            raise ValueError(f'op {self.name!r} has no backend {backend!r}; '
                             f'choose one of {list(self.backends)}')

    def requested(self) -> Optional[str]:
        """The backend an override asks for, or ``None`` for automatic choice."""
        if self.name in _overrides:
            return _overrides[self.name]
        specific = os.environ.get(f'SEGMAN_BACKEND_{self.name.upper()}')
        if specific:
            self.check_name(specific)
            return specific
        general = os.environ.get('SEGMAN_BACKEND')
        return general if general in self.backends else None

    def select(self, *args, **kwargs) -> str:
        """The backend that would run for these inputs."""
        choice = self.requested()
        if choice is not None:
            if not self.backends[choice].available(*args, **kwargs):
                raise RuntimeError(f'backend {choice!r} of op {self.name!r} was requested but '
                                   'cannot run these inputs here (missing package, device or '
                                   'unsupported setting)')
            return choice
        for name, backend in self.backends.items():
            if backend.available(*args, **kwargs):
                return name
        raise RuntimeError(f'no backend of op {self.name!r} can run these inputs')

    def __call__(self, *args, **kwargs):
        name = self.select(*args, **kwargs)
        if name not in self._logged:
            self._logged.add(name)
            print_log(f'SegMAN op {self.name}: running backend {name!r}', logger='current')
        return self.backends[name].fn(*args, **kwargs)


def always(*args, **kwargs) -> bool:
    """Availability of the pure-PyTorch reference backends."""
    return True
