"""Let ``torch.load(weights_only=True)`` read the checkpoints mmengine writes, and nothing more.

Since torch 2.6 ``torch.load`` defaults to ``weights_only=True``, which refuses every global
it does not know. mmengine 0.10.7 checkpoints hold a few: its ``HistoryBuffer`` (the message
hub's logged scalars), numpy arrays, scalars and dtypes. So mmseg's ``tools/test.py`` and
``tools/train.py --resume`` fail on the checkpoints ``train.py`` wrote. We admit exactly those
types. ``HistoryBuffer`` pickles its statistics methods as ``getattr(HistoryBuffer, 'mean')``;
admitting ``getattr`` itself would let a checkpoint reach any attribute of anything it can
name, so ``builtins.getattr`` is bound to :func:`history_buffer_getattr`, which returns only
those methods. ``argparse.Namespace`` (the ``args`` of timm-style ImageNet checkpoints) is a
plain attribute bag and is admitted too.
"""
import argparse
import pickle
from typing import Any, Callable

import numpy as np
import torch
from mmengine.logging import HistoryBuffer


def history_buffer_getattr(obj: Any, name: str) -> Callable:
    """``getattr`` limited to ``HistoryBuffer``'s registered statistics methods."""
    methods = HistoryBuffer._statistics_methods
    if obj is HistoryBuffer and isinstance(name, str) and name in methods \
            and getattr(HistoryBuffer, name, None) is methods[name]:
        return methods[name]
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({obj!r}, {name!r}); only the statistics methods of '
        f'mmengine HistoryBuffer ({sorted(methods)}) are allowed when loading weights')


def _numpy_globals():
    """numpy's pickling helpers under the module names numpy 1.x and 2.x write."""
    from numpy._core import multiarray  # numpy >= 2 (the project pins numpy 2.x)

    entries = [np.ndarray, np.dtype]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        entries += [(multiarray._reconstruct, f'{module}._reconstruct'),
                    (multiarray.scalar, f'{module}.scalar')]
    # numpy >= 1.25 pickles dtypes of builtin types through their numpy.dtypes classes
    entries += [cls for cls in vars(getattr(np, 'dtypes', object)).values()
                if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return entries


def allow_mmengine_checkpoints() -> None:
    """Admit mmengine checkpoint types to ``torch.load(weights_only=True)``; idempotent."""
    HistoryBuffer()  # registers the default statistics methods (done lazily by mmengine)
    torch.serialization.add_safe_globals([
        HistoryBuffer,
        (history_buffer_getattr, 'builtins.getattr'),
        argparse.Namespace,
        *_numpy_globals(),
    ])
