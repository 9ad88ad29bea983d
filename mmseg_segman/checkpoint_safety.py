"""Checkpoints are data: what loading one may build, and what a loaded one may not carry.

Since torch 2.6 ``torch.load`` defaults to ``weights_only=True``, which refuses every global it
does not know. mmengine 0.10.7 checkpoints hold a few: its ``HistoryBuffer`` (the message
hub's logged scalars, whose statistics methods pickle as ``getattr(HistoryBuffer, 'mean')``)
and numpy arrays and scalars (logged values, the best score). :func:`checkpoint_globals`
admits exactly those, and only while a checkpoint is read: :func:`guard_mmengine_loading`
(run by ``import mmseg_segman``) puts mmengine's ``CheckpointLoader.load_checkpoint``, which
``Runner.load_checkpoint`` / ``resume``, ``load_checkpoint``, ``init_cfg`` ``Pretrained`` and
the mmseg inferencer go through, inside it; the plugin's tools use :func:`load_checkpoint_file`.

* ``getattr`` returns only ``HistoryBuffer``'s registered statistics methods.
* numpy values are rebuilt by this module's stand-ins registered under numpy's pickle names:
  numeric dtypes only (bool, int, uint, float, complex) in their plain pickled state, arrays
  from a copy of their raw bytes. numpy's own dtype and array ``__setstate__`` never see
  checkpoint data, so object arrays and crafted dtype states are refused, never built.
* A user's own safe globals (``torch.serialization.add_safe_globals``) win over ours for the
  same name, and stay admitted afterwards.

A loaded checkpoint is then checked: a zip archive's CRC-32 checksums must match (a damaged
or truncated file gets :class:`CheckpointError`), and the config text mmengine stores
(``meta['config']``, ``meta['cfg']``, ``message_hub['runtime_info']['cfg']``) is removed,
since ``Runner.resume`` and ``MMSegInferencer(model=None)`` pass it to ``Config.fromstring``,
which executes it.
"""
import math
import os
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader

NUMERIC_KINDS = 'biufc'  # bool, signed and unsigned integers, floats, complex
# numpy's pickled dtype state (version, byte order, subarray, names, fields, elsize,
# alignment, flags) for a plain numeric dtype; only the byte order may vary.
PLAIN_DTYPE_STATE = (3, None, None, None, None, -1, -1, 0)
# Where mmengine stores the config text that Runner.resume / BaseInferencer execute.
CONFIG_TEXT_KEYS = (('meta', 'config'), ('meta', 'cfg'), ('message_hub', 'runtime_info', 'cfg'))


class CheckpointError(pickle.UnpicklingError):
    """A checkpoint that holds something loading refuses to build, or a damaged file."""


def history_buffer_getattr(obj: Any, name: str) -> Callable:
    """``getattr`` limited to ``HistoryBuffer``'s registered statistics methods."""
    methods = HistoryBuffer._statistics_methods
    if obj is HistoryBuffer and isinstance(name, str) and name in methods \
            and getattr(HistoryBuffer, name, None) is methods[name]:
        return methods[name]
    raise CheckpointError(
        f'checkpoint asks for getattr({obj!r}, {name!r}); only the statistics methods of '
        f'mmengine HistoryBuffer ({sorted(methods)}) are allowed when loading weights')


class NumpyNdarrayName:
    """Stands for ``numpy.ndarray`` in a pickle: an argument of ``_reconstruct``, never built."""

    def __new__(cls, *args: Any, **kwargs: Any) -> None:
        raise CheckpointError('checkpoint builds a numpy.ndarray directly; only numpy\'s own '
                              'array pickles (numeric dtypes) are allowed when loading weights')


class PickledDtype:
    """Stand-in for ``numpy.dtype(name, align, copy)`` and its pickled state; numeric only."""

    def __init__(self, name: Any, align: Any = False, copy: Any = False):
        try:
            dtype = np.dtype(name) if isinstance(name, str) else None
        except Exception:  # numpy parses dtype strings with several error types
            dtype = None
        if dtype is None or dtype.kind not in NUMERIC_KINDS or dtype.fields is not None:
            raise CheckpointError(f'checkpoint holds numpy dtype {name!r}; only numeric dtypes '
                                  f'({NUMERIC_KINDS!r} kinds) are allowed when loading weights')
        self.name = dtype

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == len(PLAIN_DTYPE_STATE)
                and state[1] in ('<', '>', '|', '=')
                and state[:1] + (None,) + state[2:] == PLAIN_DTYPE_STATE):
            raise CheckpointError(f'checkpoint holds a numpy dtype state {state!r:.200}; only '
                                  'the plain state of a numeric dtype is allowed')
        self.dtype = self.name.newbyteorder(state[1])

    def resolve(self) -> np.dtype:
        if not isinstance(getattr(self, 'dtype', None), np.dtype):
            raise CheckpointError('checkpoint holds a numpy dtype without its state')
        return self.dtype


def _raw_bytes(raw: Any, dtype: Any, count: int) -> np.ndarray:
    """``count`` values of ``dtype`` (a :class:`PickledDtype`) copied from ``raw`` bytes."""
    if not isinstance(dtype, PickledDtype):
        raise CheckpointError(f'checkpoint gives numpy data a {type(dtype).__name__} as dtype')
    dtype = dtype.resolve()
    if not isinstance(raw, bytes) or len(raw) != count * dtype.itemsize:
        raise CheckpointError(f'checkpoint holds {type(raw).__name__} of length '
                              f'{len(raw) if isinstance(raw, bytes) else "?"} as the data of '
                              f'{count} numpy {dtype} values')
    return np.frombuffer(bytearray(raw), dtype=dtype)


def empty_bytes(*args: Any) -> bytes:
    """Stand-in for ``bytes``, which pickle protocol 2 calls with no argument for ``b''``."""
    if args:
        raise CheckpointError(f'checkpoint calls bytes{args!r:.100}; only bytes() is allowed')
    return b''


def numpy_scalar(dtype: Any, raw: Any) -> np.generic:
    """Stand-in for ``numpy.core.multiarray.scalar``: numeric scalars from their bytes."""
    return _raw_bytes(raw, dtype, 1)[0]


class PickledArray:
    """Stand-in for ``numpy.core.multiarray._reconstruct`` and the array's pickled state.

    The unpickler builds this object, then calls ``__setstate__`` with ``(version, shape,
    dtype, is_fortran, raw bytes)``; :func:`resolve_pickled_numpy` swaps in the array.
    """

    def __init__(self, subtype: Any, shape: Any, typecode: Any):
        if subtype is not NumpyNdarrayName:
            raise CheckpointError(f'checkpoint rebuilds numpy arrays of type {subtype!r}; '
                                  'only numpy.ndarray is allowed')

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1
                and isinstance(state[1], tuple) and isinstance(state[3], bool)
                and all(type(n) is int and n >= 0 for n in state[1])):
            raise CheckpointError(f'checkpoint holds a numpy array state {state!r:.200}; only '
                                  'numeric arrays with their raw bytes are allowed')
        _, shape, dtype, fortran, raw = state
        self.array = _raw_bytes(raw, dtype, math.prod(shape)).reshape(
            shape, order='F' if fortran else 'C')

    def resolve(self) -> np.ndarray:
        if not isinstance(getattr(self, 'array', None), np.ndarray):
            raise CheckpointError('checkpoint holds a numpy array without its data')
        return self.array


def _checkpoint_entries() -> list:
    HistoryBuffer()  # registers the default statistics methods (done lazily by mmengine)
    entries = [HistoryBuffer, (history_buffer_getattr, 'builtins.getattr'),
               (NumpyNdarrayName, 'numpy.ndarray'), (PickledDtype, 'numpy.dtype'),
               (empty_bytes, 'builtins.bytes')]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):  # numpy 1.x, 2.x
        entries += [(PickledArray, f'{module}._reconstruct'), (numpy_scalar, f'{module}.scalar')]
    return entries


def _entry_name(entry: Union[Callable, tuple]) -> str:
    return entry[1] if isinstance(entry, tuple) else f'{entry.__module__}.{entry.__qualname__}'


@contextmanager
def checkpoint_globals(extra: tuple = ()) -> Iterator[None]:
    """Admit mmengine checkpoint types (and ``extra`` entries) to weights-only loading.

    Names the user has admitted already keep the user's entry; ours are removed on exit.
    """
    taken = {_entry_name(e) for e in torch.serialization.get_safe_globals()}
    ours = [e for e in (*_checkpoint_entries(), *extra) if _entry_name(e) not in taken]
    with torch.serialization.safe_globals(ours):
        yield


def resolve_pickled_numpy(obj: Any, memo: Dict[int, Any] = None) -> Any:
    """``obj`` with the :class:`PickledArray` / :class:`PickledDtype` stand-ins it holds
    replaced by numpy arrays and dtypes (containers and object attributes in place)."""
    memo = {} if memo is None else memo
    if isinstance(obj, (str, bytes, int, float, complex, type(None), torch.Tensor, np.generic)):
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    memo[id(obj)] = obj  # cycles through mutable containers end here
    if isinstance(obj, (PickledArray, PickledDtype)):
        memo[id(obj)] = obj.resolve()
    elif isinstance(obj, (tuple, set, frozenset)):
        items = [resolve_pickled_numpy(item, memo) for item in obj]
        if any(new is not old for new, old in zip(items, obj)):
            memo[id(obj)] = type(obj)(items)
    elif isinstance(obj, list):
        obj[:] = [resolve_pickled_numpy(item, memo) for item in obj]
    elif isinstance(obj, dict):
        if any(isinstance(key, (PickledArray, PickledDtype)) for key in obj):
            raise CheckpointError('checkpoint uses numpy values as dict keys')
        for key, value in obj.items():
            obj[key] = resolve_pickled_numpy(value, memo)
    if hasattr(obj, '__dict__') and not isinstance(obj, type) and not callable(obj):
        resolve_pickled_numpy(vars(obj), memo)
    return memo[id(obj)]


def check_archive(path: Union[str, Path]) -> None:
    """Refuse a damaged zip checkpoint (a CRC-32 mismatch, a truncated file)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise CheckpointError(f'{path} is a damaged checkpoint archive: {error}') from None
    if damaged is not None:
        raise CheckpointError(f'{path} is damaged: the CRC-32 checksum of {damaged} does not match '
                              'its data (bytes changed after saving)')


def _looks_like_zip(path: Union[str, Path]) -> bool:
    with open(path, 'rb') as f:
        return f.read(4) == b'PK\x03\x04'


def drop_config_text(checkpoint: Any) -> Any:
    """Remove the config text mmengine stores in a checkpoint (code that resuming or
    ``MMSegInferencer(model=None)`` would execute); returns ``checkpoint``."""
    for *parents, key in CONFIG_TEXT_KEYS:
        node = checkpoint
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    return checkpoint


def checked_checkpoint(load: Callable[[], Any], path: Any = None, extra: tuple = ()) -> Any:
    """``load()`` under :func:`checkpoint_globals` (with ``extra`` entries), with numpy values
    resolved and config text dropped; a local zip ``path`` is CRC-checked first."""
    if isinstance(path, (str, Path)) and os.path.isfile(os.path.expanduser(str(path))) \
            and _looks_like_zip(os.path.expanduser(str(path))):
        check_archive(os.path.expanduser(str(path)))
    with checkpoint_globals(extra):
        checkpoint = load()
    try:
        checkpoint = resolve_pickled_numpy(checkpoint)
    except RecursionError:
        raise CheckpointError(f'{path} nests containers too deeply to be a checkpoint') from None
    return drop_config_text(checkpoint)


def load_checkpoint_file(path: Union[str, Path], map_location: Any = 'cpu') -> Any:
    """``torch.load(path, weights_only=True)`` with the checks of :func:`checked_checkpoint`."""
    return checked_checkpoint(lambda: torch.load(path, map_location=map_location,
                                                 weights_only=True), path)


def guard_mmengine_loading() -> None:
    """Route mmengine's ``CheckpointLoader.load_checkpoint`` through
    :func:`checked_checkpoint`; idempotent."""
    load = CheckpointLoader.load_checkpoint.__func__
    if getattr(load, 'guarded_by_segman', False):
        return

    def guarded_load(cls, filename, map_location=None, logger='current'):
        return checked_checkpoint(lambda: load(cls, filename, map_location, logger), filename)

    guarded_load.guarded_by_segman = True
    CheckpointLoader.load_checkpoint = classmethod(guarded_load)
