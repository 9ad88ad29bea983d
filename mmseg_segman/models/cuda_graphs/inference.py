"""A module's inference forward replayed as CUDA graphs, one per input signature.

Eager inference of SegMAN is bound by the host as its training is: at batch 16 on the H100
machines SegMAN-T's forward took 29 ms of wall time for 7.3 ms of GPU work, SegMAN-L's 80 for
49 (``docs/benchmarks.md``). :class:`InferenceGraph` captures a module's forward for an input
signature and from then on replays it: the same kernels and outputs, no host work per kernel.

It replays only where that is exact and safe, and else runs the forward eagerly:

- on CUDA tensors, with every module inside evaluating and autograd not recording
  (``torch.no_grad`` or ``torch.inference_mode``), outside ``torch.compile``, tracing, ONNX
  export and the capture of a graph around it, and with no forward hooks inside (a graph
  would not run them; checked at every call);
- a signature (input shapes, dtypes, autocast, inference mode) is captured at its
  ``min_calls``-th call: the calls before run eagerly, compile what a new size needs and fill
  the model's caches (rotary tables, resize matrices), which the capture must find filled
  rather than fill with the graph's memory;
- at most ``max_graphs`` signatures are captured; the others run eagerly (logged once). No
  graph is dropped for another: images of many sizes in turn would capture again and again;
- the graphs share one memory pool (they replay one at a time, in order); each call's inputs
  are copied into the graph's own and its outputs copied out, so the caller owns both;
- parameters or buffers moved or replaced (``module.to``, ``load_state_dict(assign=True)``,
  a new submodule), or written in place (``load_state_dict``) where an op keeps a value made
  of them (:func:`~mmseg_segman.ops.dispatch.kept`: the 1x1 convolutions' weights in the
  compute dtype, the attention's bias tables, which a replay reads as its capture found
  them) drop the graphs, and they are captured again as calls come; so does
  :meth:`InferenceGraph.release` (the module back in training: the memory is the step's);
- a capture that fails raises an error that says so.

A capture runs the forward once eagerly on the capture's stream first (cuBLAS's workspace
for that stream), then records it.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module
from torch.utils._pytree import tree_flatten, tree_unflatten

from ...ops.dispatch import kept_from
from .common import (GraphLog, capture_autocast, capture_failed, copy_into, describe, eager_only,
                     signature)

# signatures counted before any is captured; past this the counts start again (sizes that
# came once each, by the thousand)
MAX_COUNTED = 4096

_structure_changes = 0  # bumped whenever any module registers a parameter, buffer or submodule
_watching = False


def _count_structure_change(*_) -> None:
    global _structure_changes
    _structure_changes += 1


def _watch_structure() -> None:
    """Count every parameter, buffer and submodule registered from now on, anywhere: a
    replaced parameter keeps no address that a graph could check."""
    global _watching
    if not _watching:
        _watching = True
        torch_module.register_module_parameter_registration_hook(_count_structure_change)
        torch_module.register_module_buffer_registration_hook(_count_structure_change)
        torch_module.register_module_module_registration_hook(_count_structure_change)


class _Memory:
    """The memory pool and the capture stream that the graphs of one module share, made at
    their first capture."""

    def __init__(self):
        self._pool = self._stream = None

    def get(self) -> Tuple[Tuple[int, int], torch.cuda.Stream]:
        if self._pool is None:
            self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        return self._pool, self._stream


class _Replay:
    """``forward`` captured for inputs like ``inputs`` into ``memory``."""

    def __init__(self, forward: Callable, inputs: Sequence[Tensor], memory: _Memory):
        self.samples = tuple(x.detach().clone() for x in inputs)
        pool, stream = memory.get()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward(*self.samples)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.outputs, self.spec = tree_flatten(forward(*self.samples))

    def __call__(self, inputs: Sequence[Tensor]):
        copy_into(self.samples, inputs)
        self.graph.replay()
        return tree_unflatten([o.clone() if isinstance(o, Tensor) else o for o in self.outputs],
                              self.spec)


class _Watched:
    """What the graphs of a module were captured against: its modules and tensors, their
    addresses, the structure changes counted then, and the in-place writes of the tensors
    that ops keep values made of (:meth:`watch_kept`)."""

    def __init__(self, module: nn.Module):
        self.modules: List[nn.Module] = list(module.modules())
        self.tensors = [*module.parameters(), *module.buffers()]
        self.addresses = [t.data_ptr() for t in self.tensors]
        self.changes = _structure_changes
        self.kept: List[Tensor] = []
        self.versions: List[int] = []

    def watch_kept(self) -> None:
        """At a capture: the tensors of which ops keep values (``ops.dispatch.kept``: the
        1x1 weights in the compute dtype, the attention's bias tables), which the graphs read,
        and their in-place write counts (only these: a tensor read in place needs no new
        capture; reading SegMAN-L's 1554 counts took 155 us of host time a call on the
        development CPU, its 240 kept ones 21)."""
        self.kept = kept_from(self.tensors)
        self.versions = [t._version for t in self.kept]

    def current(self) -> bool:
        return self.changes == _structure_changes \
            and [t.data_ptr() for t in self.tensors] == self.addresses \
            and [t._version for t in self.kept] == self.versions

    def evaluating(self) -> bool:
        return not any(m.training for m in self.modules)

    def hooked(self) -> Optional[str]:
        """A module inside with forward hooks, or None."""
        for m in self.modules:
            if m._forward_hooks or m._forward_pre_hooks:
                return type(m).__name__
        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return 'every module (global hooks)'
        return None


class InferenceGraph:
    """Runs ``forward(*inputs)`` of an evaluating module as replays of CUDA graphs, one per
    input signature met ``min_calls`` times, at most ``max_graphs`` (see the module doc).
    ``name`` names the module in the log."""

    def __init__(self, name: str, max_graphs: int = 8, min_calls: int = 2):
        for key, value, least in (('max_graphs', max_graphs, 1), ('min_calls', min_calls, 2)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f'{name}: {key} must be an integer >= {least}, got {value!r}')
        self.name, self.max_graphs, self.min_calls = name, max_graphs, min_calls
        self._log = GraphLog(name)
        self._graphs: Dict[Tuple, _Replay] = {}
        self._calls: Dict[Tuple, int] = {}
        self._watched: Optional[_Watched] = None
        self._memory = _Memory()
        self._off = False

    def __call__(self, module: nn.Module, forward: Callable, *inputs: Tensor):
        """``forward(*inputs)``: replayed where this call can be, else eager."""
        if self._off or torch.is_grad_enabled() or eager_only(inputs):
            return forward(*inputs)
        watched = self._watched
        if watched is None or not watched.current():
            if watched is not None:
                self._log.say('moved', 'parameters or buffers moved, replaced or written in '
                              'place, or modules registered somewhere: inference graphs '
                              'captured again')
            self.release()
            _watch_structure()
            watched = self._watched = _Watched(module)
        hooked = watched.hooked()
        if hooked is not None:
            self._log.say('hooked', f'{hooked} has forward hooks, which a graph would not run: '
                          'inference runs eagerly while they are there')
            return forward(*inputs)
        if not watched.evaluating():
            return forward(*inputs)
        key = signature(inputs)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._count_or_capture(forward, inputs, key)
            if graph is None:
                return forward(*inputs)
        return graph(inputs)

    def _count_or_capture(self, forward: Callable, inputs: Sequence[Tensor],
                          key: Tuple) -> Optional[_Replay]:
        """The new graph for ``key`` at its ``min_calls``-th call, else None."""
        if len(self._graphs) >= self.max_graphs:
            self._log.say('full', f'{self.max_graphs} inference graphs captured (max_graphs): inputs '
                          'of other sizes run eagerly')
            return None
        if len(self._calls) >= MAX_COUNTED and key not in self._calls:
            self._calls.clear()
        calls = self._calls[key] = self._calls.get(key, 0) + 1
        if calls < self.min_calls:
            return None
        try:
            with capture_autocast():
                graph = _Replay(forward, inputs, self._memory)
        except Exception as error:  # a host sync or an unsupported operation in the forward
            self._off = True
            self.release()
            raise capture_failed(self.name, 'inference forward', error) from error
        self._graphs[key] = graph
        self._watched.watch_kept()
        del self._calls[key]
        self._log.info(f'inference forward captured as a CUDA graph for inputs {describe(key)} '
                       f'({len(self._graphs)} of at most {self.max_graphs})')
        return graph

    def release(self) -> None:
        """Drop the graphs and their memory (the module back in training, or moved)."""
        if self._watched is None and not self._calls:
            return  # nothing held (every training step asks)
        if self._graphs:
            self._graphs.clear()
            torch.cuda.empty_cache()
        self._calls.clear()
        self._watched = None
        self._memory = _Memory()

    def __getstate__(self):
        """Copies and pickles start without graphs (they hold the original's memory)."""
        return dict(name=self.name, max_graphs=self.max_graphs, min_calls=self.min_calls)

    def __setstate__(self, state) -> None:
        self.__init__(**state)
