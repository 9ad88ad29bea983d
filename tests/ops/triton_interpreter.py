"""Run a test module's checks in Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so the module runs as a script
in a subprocess (the rest of the suite never sees the variable) and prints
'all checks passed' at the end. The checks that the Triton ops' modules share are here too;
the scripts import them as ``triton_interpreter`` (their folder is the first on ``sys.path``).
"""
import os
import subprocess
import sys

import torch


def assert_checks_pass_in_interpreter(path: str, timeout: int) -> None:
    result = subprocess.run([sys.executable, path], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, 'TRITON_INTERPRET': '1'})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert 'all checks passed' in result.stdout, result.stdout[-4000:]


def custom_ops_dispatched(fn):
    """``fn()``'s result and the ``mmseg_segman::`` custom ops that reached PyTorch's
    dispatcher while it ran (a backward inside ``fn`` included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == 'mmseg_segman':
                seen.add(func._schema.name)
            return func(*args, **(kwargs or {}))

    with Record():
        result = fn()
    return result, seen


def output_and_grads(fn, inputs, grad_out):
    """``fn``'s output on fresh leaves of ``inputs`` (``None`` stays ``None``) and, after
    ``backward(grad_out)``, the leaves' gradients."""
    leaves = [t if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves if t is not None]


def assert_identical(got, want, label: str) -> None:
    assert len(got) == len(want), label
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f'{label}, tensor {i}: {m}')


def compile_recording_graphs(fn):
    """``torch.compile(fn, fullgraph=True)`` through AOTAutograd, and the ``call_function``
    targets (as strings) of its forward and backward graphs, filled as they are compiled."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    targets = {'forward': set(), 'backward': set()}

    def recorder(kind):
        def compiler(gm, example_inputs):
            targets[kind].update(str(n.target) for n in gm.graph.nodes if n.op == 'call_function')
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=recorder('forward'), bw_compiler=recorder('backward'))
    return torch.compile(fn, backend=backend, fullgraph=True), targets


def check_eager_calls_skip_custom_ops(eager, custom_op, inputs, grad_out, op_names) -> None:
    """The Triton backend ``eager(*inputs)`` against its custom op ``custom_op(*inputs)``
    (named ``op_names``: forward, backward), in the interpreter: eager calls dispatch no
    ``mmseg_segman`` op and give the custom op's output, without and with autograd recording,
    and its gradients (also under non-reentrant checkpointing), bitwise, without binding
    arguments through ``inspect.signature`` (what ``torch.autograd.Function.apply`` does at
    every call of a Function with a separate ``setup_context``: 60-100 us of host time);
    ``torch.compile`` of ``eager`` traces the forward op into the forward graph and the
    backward op into the backward graph, with the same results."""
    import inspect
    from unittest import mock

    from torch.utils.checkpoint import checkpoint

    forward_op, backward_op = (f'mmseg_segman::{name}' for name in op_names)
    with torch.no_grad():
        want, ops = custom_ops_dispatched(lambda: custom_op(*inputs))
        assert ops == {forward_op}, ops  # the recorder sees the custom op where it runs
        got, ops = custom_ops_dispatched(lambda: eager(*inputs))
    assert not ops, f'without autograd recording the eager call went through {ops}'
    assert_identical([got], [want], 'no autograd')
    want, ops = custom_ops_dispatched(lambda: output_and_grads(custom_op, inputs, grad_out))
    assert ops == {forward_op, backward_op}, ops
    binding = AssertionError('the eager call bound arguments through inspect.signature')
    with mock.patch.object(inspect, 'signature', side_effect=binding):
        got, ops = custom_ops_dispatched(lambda: output_and_grads(eager, inputs, grad_out))
    assert not ops, f'with autograd recording the eager call went through {ops}'
    assert_identical(got, want, 'autograd')
    got, ops = custom_ops_dispatched(lambda: output_and_grads(
        lambda *t: checkpoint(eager, *t, use_reentrant=False), inputs, grad_out))
    assert not ops, ops
    assert_identical(got, want, 'checkpointed')
    torch._dynamo.reset()
    compiled, targets = compile_recording_graphs(eager)
    got = output_and_grads(compiled, inputs, grad_out)
    for kind, op in (('forward', forward_op), ('backward', backward_op)):
        assert op.replace('::', '.') + '.default' in targets[kind], (kind, targets[kind])
    assert_identical(got, want, 'compiled')


def check_launches_directly(function, call, inputs, differentiable: int) -> None:
    """``call(*inputs)`` of a Triton backend launches its kernel without ``function`` (the
    backend's ``torch.autograd.Function``) where autograd does not record, and through it where
    ``inputs[differentiable]`` needs a gradient; both give the same output, bitwise."""
    from unittest import mock

    with mock.patch.object(function, 'apply', side_effect=function.apply) as spy:
        with torch.no_grad():
            direct = call(*inputs)
        assert not spy.called, 'the autograd.Function ran without autograd recording'
        recording = list(inputs)
        recording[differentiable] = inputs[differentiable].detach().requires_grad_()
        through_function = call(*recording)
        assert spy.called, 'the autograd.Function did not run with autograd recording'
    assert_identical([direct], [through_function.detach()], 'direct launch')
