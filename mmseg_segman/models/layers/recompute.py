"""Tensors the backward pass needs, recomputed from one it keeps anyway instead of kept,
while a CUDA graph captures the training step.

A block's depthwise convolutions with a residual (``cpe1``, ``cpe2``, the FFN's ``dwconv``)
make maps that the next op saves for its backward pass, while their own input is kept anyway.
:func:`recomputed_for_backward` makes autograd keep that input alone and make the map again
when the backward pass unpacks it: a memory-bound kernel in exchange for a map
(docs/benchmarks.md). LASS's rotated queries and keys are kept: making them again took two
launches a block for a map of 2C channels.

It acts where the training step is captured as a CUDA graph (``cuda_graph=True``): the
graph's memory pool cannot lend the rest of the step what it holds, and a replay pays no
host time for the hooks and the extra kernels. Eagerly the maps are kept: the step is bound
by the host there, and with the hooks SegMAN-L's eager step ran 11-25% slower in three
calls. :func:`recomputing` turns it on or off inside a block of code.
"""
import weakref
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator, List, NamedTuple, Tuple

import torch
from torch import Tensor


class _Recompute(NamedTuple):
    """What autograd keeps in place of a view of ``output``: ``source`` (packed by the
    enclosing hooks, if any) and the view's size, strides and offset."""
    source: Any
    view: Tuple[torch.Size, Tuple[int, ...], int]


# recomputing(...) blocks entered and not left, innermost last
_forced: List[bool] = []


@contextmanager
def recomputing(enabled: bool = True) -> Iterator[None]:
    """Within, :func:`recomputed_for_backward` acts (or not) whether or not a CUDA graph is
    being captured (tests, ``tools/analysis_tools/saved_for_backward.py --graphed``)."""
    _forced.append(enabled)
    try:
        yield
    finally:
        _forced.pop()


def recomputing_now() -> bool:
    """Whether :func:`recomputed_for_backward` acts: inside :func:`recomputing`, as it says;
    else while this thread's CUDA stream is being captured into a graph."""
    if _forced:
        return _forced[-1]
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def recomputed_for_backward(output: Tensor, source: Tensor,
                            fn: Callable[[Tensor], Tensor]) -> ContextManager[None]:
    """Within, an op that saves ``output`` (or a view of it) for its backward pass saves
    ``source`` instead, and its backward pass gets ``fn(source)`` (computed under
    ``torch.no_grad()``, in the autocast of the forward pass), where :func:`recomputing_now`.

    ``output`` must be ``fn(source)``, and ``source`` should be kept by autograd anyway (else
    this costs memory). An enclosing ``saved_tensors_hooks`` (activation checkpointing,
    offloading) packs what this keeps: ``source`` where ``output`` was. Nothing changes where
    autograd records nothing, under ``torch.compile`` (inductor chooses what to recompute),
    while tracing, or where ``output`` does not fill its memory alone (views of it could not
    be made again).
    """
    if not (torch.is_grad_enabled() and output.requires_grad) or not recomputing_now() \
            or torch.compiler.is_compiling() or torch.jit.is_tracing() \
            or output.storage_offset() != 0 \
            or output.untyped_storage().nbytes() != output.numel() * output.element_size():
        return nullcontext()
    return _hooks(output, source, fn)


@contextmanager
def _hooks(output: Tensor, source: Tensor, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    # the hooks this context replaces (only the innermost pair runs): they receive what it keeps
    enclosing = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = enclosing or (_identity, _identity)
    dtype, device_type = output.dtype, output.device.type
    output_shape, output_stride = output.shape, output.stride()
    # autograd keeps the hooks as long as what they packed: they must not keep ``output`` or
    # ``source`` (an enclosing checkpoint would not free it), both alive wherever ``pack`` runs
    output_ref, source_ref = weakref.ref(output), weakref.ref(source)
    has_autocast = torch.amp.is_autocast_available(device_type)  # not on 'meta'
    autocast = torch.get_autocast_dtype(device_type) \
        if has_autocast and torch.is_autocast_enabled(device_type) else None

    def pack(t: Tensor) -> Any:
        output = output_ref()  # ``output`` or a view of it (a view's ``_base``), in its dtype
        if t.dtype != dtype or output is None or (t is not output and t._base is not output):
            return outer_pack(t)
        view = (t.shape, t.stride(), t.storage_offset())
        return _Recompute(outer_pack(source_ref().detach()), view)

    def unpack(packed: Any) -> Tensor:
        if not isinstance(packed, _Recompute):
            return outer_unpack(packed)
        forward_autocast = nullcontext() if not has_autocast else torch.autocast(
            device_type, dtype=autocast, enabled=autocast is not None, cache_enabled=False)
        with torch.no_grad(), forward_autocast:
            full = fn(outer_unpack(packed.source))
        if full.stride() != output_stride or full.dtype != dtype:  # as the forward pass had it
            full = torch.empty_strided(output_shape, output_stride, dtype=dtype,
                                       device=full.device).copy_(full)
        return full.as_strided(*packed.view)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _identity(t: Any) -> Any:
    return t
