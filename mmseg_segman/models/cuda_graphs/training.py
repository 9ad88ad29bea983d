"""A module's training forward and backward replayed as two CUDA graphs.

Eager training of SegMAN is bound by the host: a SegMAN-L training step launches about five
thousand kernels, each behind Python and PyTorch's dispatch, and the GPU waits for them
(``docs/benchmarks.md``). :class:`TrainingGraph` captures a module's forward and its backward
once (as ``torch.cuda.make_graphed_callables`` does) and from then on replays them: one
autograd node each way, the same kernels, no host work per kernel. The gradients, the batch
norms' running statistics and the outputs are those of the eager step.

It graphs a call only where that is exact and safe, and else runs the forward eagerly:

- on CUDA tensors, in training mode with autograd recording, outside ``torch.compile``,
  tracing, ONNX export and the capture of a graph around it;
- for one input signature (shapes, dtypes, autocast): a call with another one stops the
  graphing for good (logged once), since each signature would hold a graph's own memory; so
  does a change of a module's training mode inside after the capture;
- not while the autograd graph of its previous call still waits for its backward (a second
  forward before the backward would overwrite what that backward needs);
- not for a module with hooks registered inside it (a graph would not run them); with
  synchronised batch norms in a distributed run only where their collectives run on NCCL,
  which a graph can hold (every rank captures at its first step, when all of them take it);
- a capture that fails raises an error that says so (it can leave CUDA's random number
  generator unusable, so there is no falling back);
- parameters or buffers moved to new memory (``module.to``) are captured again.

The capture runs the forward and backward three times eagerly first (Triton's
compilations, cuBLAS's and cuDNN's choices); the running statistics those steps change are
put back. The forward runs under the caller's autocast, the backward without autocast, as
eager training's backward runs (mmengine's ``AmpOptimWrapper`` calls it outside): under it,
the backward's own operations were autocast too (the attention's bias-gradient fold ran in
bfloat16, after casting its float32 buffer, docs/benchmarks.md). The graph's memory (the
activations its backward keeps) stays reserved between steps; each call's inputs are copied
into the graph's own; the outputs of a replay are overwritten by the next one.
"""
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from ...ops.dispatch import autocast_off
from .common import (GraphLog, addresses, capture_autocast, capture_failed, copy_into, describe,
                     eager_only, modes, signature, synchronises, unsupported)

WARMUP_STEPS = 3


def _backward(outputs: List[Tensor], inputs: List[Tensor],
              grad_outputs: List[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The gradients of ``inputs`` (None where unused), autocast off as in eager training."""
    with autocast_off('cuda'):
        return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)


class _GraphedStep:
    """``forward(*samples)`` of ``module`` and its backward (the gradients of the samples
    that require one and of the parameters), captured as two CUDA graphs on a stream of their
    own after :data:`WARMUP_STEPS` eager steps there; a call with inputs like ``samples``
    replays them, as one autograd node on that stream.

    As ``torch.cuda.make_graphed_callables`` does, with two differences: the node, and so the
    parameters' gradient accumulation, runs on the capture's stream, where their accumulators
    were made (no synchronisation between streams, no warning about it); and a ``.grad`` that
    is still one of the graph's gradient buffers when the forward replays again (gradients
    summed over several backward passes without zeroing) is copied first: the forward's
    temporaries share the graph's memory with those buffers, and the backward writes them.
    Autograd takes the buffers as ``.grad`` where ``.grad`` is None: copying them at every
    step, one copy a parameter, filled the GPU's command buffer and held the host up
    (SegMAN-L: 140 against 162 ms a step, docs/benchmarks.md).
    """

    def __init__(self, module: nn.Module, forward: Callable, samples: Tuple[Tensor, ...]):
        self.samples = samples
        self.params = tuple(p for p in module.parameters() if p.requires_grad)
        self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        with _parameter_aliases(module) as aliases:
            surface = samples + aliases
            differentiable = [t for t in surface if t.requires_grad]
            with torch.cuda.stream(self.stream):
                for _ in range(WARMUP_STEPS):
                    outputs = [o for o in tree_leaves(forward(*samples)) if o.requires_grad]
                    _backward(outputs, differentiable, [torch.empty_like(o) for o in outputs])
                del outputs
            torch.cuda.synchronize()
            # the warm-up's memory back to the device: the graphs' pool cannot use it, and the
            # two together would hold twice the step's activations
            torch.cuda.empty_cache()
            self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            capture = dict(pool=torch.cuda.graph_pool_handle(), stream=self.stream,
                           capture_error_mode='thread_local' if synchronises(module) else 'global')
            with torch.cuda.graph(self.forward_graph, **capture):
                self.outputs, self.spec = tree_flatten(forward(*samples))
            self.grad_outputs = [torch.empty_like(o) if o.requires_grad else None
                                 for o in self.outputs]
            with torch.cuda.graph(self.backward_graph, **capture):
                grads = iter(_backward([o for o in self.outputs if o.requires_grad], differentiable,
                                       [g for g in self.grad_outputs if g is not None]))
            self.grads = [next(grads) if t.requires_grad else None for t in surface]
        self.param_grads = [(p, g) for p, g in zip(self.params, self.grads[len(samples):])
                            if g is not None]
        self.function = _replay_function(self)

    def release_grads(self) -> None:
        """Copy each ``.grad`` that is still the graph's buffer (see the class doc)."""
        for param, buffer in self.param_grads:
            grad = param.grad
            if grad is not None and grad.data_ptr() == buffer.data_ptr():
                param.grad = grad.clone()

    def __call__(self, *inputs: Tensor):
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            outputs = self.function.apply(*inputs, *self.params)
        current.wait_stream(self.stream)
        return tree_unflatten(list(outputs), self.spec)


@contextmanager
def _parameter_aliases(module: nn.Module) -> Iterator[Tuple[Tensor, ...]]:
    """Inside, each trainable parameter of ``module`` is a new leaf that shares its memory
    (yielded in ``module.parameters()`` order); the originals are put back on leaving.

    A capture takes the gradients at these leaves. Autograd makes the stream a backward pass
    ends on wait for the stream each leaf's gradient accumulator was made on, and an
    accumulator that lives on, such as one DDP's reducer holds from its construction on the
    default stream, would join that stream to the capture, which CUDA refuses; the aliases'
    accumulators are made inside the warm-up, on the capture's stream. A replay writes the
    parameters' own memory all the same."""
    aliases, originals = {}, []
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None and param.requires_grad:
                alias = aliases.setdefault(id(param), nn.Parameter(param.detach()))
                originals.append((sub, name, param))
                sub._parameters[name] = alias
    try:
        yield tuple(p for p in module.parameters() if p.requires_grad)
    finally:
        for sub, name, param in originals:
            sub._parameters[name] = param


def _replay_function(step: _GraphedStep) -> type:
    """The autograd Function that replays ``step``'s graphs."""

    class Replay(torch.autograd.Function):

        @staticmethod
        def forward(ctx, *surface: Tensor) -> Tuple[Tensor, ...]:
            step.release_grads()
            copy_into(step.samples, surface)
            step.forward_graph.replay()
            return tuple(o.detach() for o in step.outputs)

        @staticmethod
        @once_differentiable
        def backward(ctx, *output_grads: Tensor) -> Tuple[Optional[Tensor], ...]:
            copy_into(step.grad_outputs, output_grads)
            step.backward_graph.replay()
            return tuple(None if g is None else g.detach() for g in step.grads)

    return Replay


class _Backward:
    """Whether the backward of one replay has run; lives as long as that replay's autograd
    node."""
    done = False

    def mark(self, *_) -> None:
        self.done = True


class _Captured:

    def __init__(self, signature: Tuple, graphed: Callable, addresses: List[int],
                 modes: Tuple[bool, ...]):
        self.signature, self.graphed, self.addresses, self.modes = \
            signature, graphed, addresses, modes


class TrainingGraph:
    """Runs ``forward(*inputs)`` of a module, in training, as replays of CUDA graphs captured
    at its first call (see the module doc). ``name`` names the module in the log."""

    def __init__(self, name: str):
        self.name = name
        self._captured: Optional[_Captured] = None
        self._off: Optional[str] = None
        self._last: Optional[weakref.ref] = None  # the _Backward of the last replay
        self._log = GraphLog(name)

    def __call__(self, module: nn.Module, forward: Callable, *inputs: Tensor):
        """``forward(*inputs)``: replayed where this call can be graphed, else eager."""
        if self._off is not None or not module.training or not torch.is_grad_enabled() \
                or eager_only(inputs):
            return forward(*inputs)
        key = signature(inputs)
        captured = self._captured
        if captured is not None and captured.signature != key:
            self._stop(f'inputs {describe(key)} after {describe(captured.signature)}; '
                       'graphs are kept for one input signature')
            return forward(*inputs)
        if captured is not None and captured.modes != modes(module):
            self._stop('the training mode of a module inside changed after the capture (a graph '
                       'keeps the modes it was captured in)')
            return forward(*inputs)
        last = self._last and self._last()
        if last is not None and not last.done:
            self._log.say('pending', 'called again before the backward of its previous call: this '
                      'call runs eagerly (a replay would overwrite what that backward needs)')
            return forward(*inputs)
        if captured is None or captured.addresses != addresses(module):
            captured = self._captured = None  # the old graphs' memory freed before capturing
            captured = self._captured = self._capture(module, forward, inputs, key)
            if captured is None:
                return forward(*inputs)
        outputs = captured.graphed(*inputs)
        node = tree_leaves(outputs)[0].grad_fn
        if node is not None:
            backward = _Backward()
            node.register_hook(backward.mark)
            self._last = weakref.ref(backward)
        return outputs

    def _capture(self, module: nn.Module, forward: Callable, inputs: Sequence[Tensor],
                 key: Tuple) -> Optional[_Captured]:
        reason = unsupported(module)
        if reason is not None:
            self._stop(reason)
            return None
        saved = [b.clone() for b in module.buffers()]
        # the inputs as leaves of their own: an input from another graph's replay has its
        # autograd node on the current stream, which the capture (on a stream of its own) must
        # not reach, and later inputs are copied into these, never into the caller's tensors
        samples = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in inputs)
        try:
            with capture_autocast():
                graphed = _GraphedStep(module, forward, samples)
        except Exception as error:  # a host sync or an unsupported operation in the step
            self._off = 'its capture failed'
            raise capture_failed(self.name, 'training step', error) from error
        finally:
            with torch.no_grad():  # the warm-up steps' running statistics do not count
                for buffer, value in zip(module.buffers(), saved):
                    buffer.copy_(value)
        self._log.say('captured', f'training forward and backward captured as CUDA graphs for '
                      f'inputs {describe(key)}')
        return _Captured(key, graphed, addresses(module), modes(module))

    def _stop(self, reason: str) -> None:
        self._off, self._captured = reason, None
        self._log.warn(f'training without CUDA graphs from now on: {reason}')

    def __getstate__(self):
        """Copies and pickles start without graphs (they hold the original's memory)."""
        return dict(name=self.name)

    def __setstate__(self, state) -> None:
        self.__init__(state['name'])
