"""TrainingGraph's decisions, on the CPU: the capture (``_GraphedStep``) is replaced by a
stand-in that runs its warm-up steps as the real one does and then calls the forward (what a
replay computes), and the inputs count as on the GPU. The graphs themselves are checked on
the GPU by ``tools/gpu_checks/check_training_graph.py``."""
import copy
import pickle
import weakref

import pytest
import torch
from mmengine.logging import MMLogger
from torch import nn

from mmseg_segman.models import SegMANEncoder
from mmseg_segman.models.cuda_graphs import TrainingGraph
from mmseg_segman.models.cuda_graphs import training as tg
from mmseg_segman.models.decode_heads import SegMANHead

from ...conftest import captured_log
from .modules import ConvBN, fake_captures


class Replays:
    """What a stand-in capture returns: calls the forward."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *inputs):
        return self.forward(*inputs)


class FakeGraphs:
    """Stands in for ``_GraphedStep``: counts captures, runs the warm-up forwards and
    backwards, and then the forward itself; ``alive`` is how many earlier captures were still
    held when the last one began (their memory not yet freed)."""

    def __init__(self, fail: bool = False):
        self.captures, self.fail, self.earlier, self.alive = 0, fail, [], 0

    def __call__(self, module, forward, samples):
        self.captures += 1
        self.alive = sum(ref() is not None for ref in self.earlier)
        assert all(x.grad_fn is None for x in samples), 'inputs of another graph captured'
        for _ in range(tg.WARMUP_STEPS):
            outputs = torch.utils._pytree.tree_leaves(forward(*samples))
            torch.autograd.grad(outputs, [p for p in module.parameters() if p.requires_grad],
                                [torch.ones_like(o) for o in outputs], allow_unused=True)
        if self.fail:
            raise RuntimeError('operation not permitted when stream is capturing')
        replays = Replays(forward)
        self.earlier.append(weakref.ref(replays))
        return replays


@pytest.fixture
def fake_graphs(monkeypatch):
    return fake_captures(monkeypatch, tg, '_GraphedStep', FakeGraphs())


def step(graph, module, x):
    out = graph(module, module.forward, x)
    out.sum().backward()
    return out


def test_captures_once_and_keeps_eager_statistics(fake_graphs):
    torch.manual_seed(0)
    module, graph, x = ConvBN().train(), TrainingGraph('ConvBN'), torch.randn(2, 3, 8, 8)
    eager = copy.deepcopy(module)
    with captured_log() as records:
        for _ in range(3):
            out, expected = step(graph, module, x), eager(x)
            expected.sum().backward()
            torch.testing.assert_close(out, expected)
    assert fake_graphs.captures == 1
    assert graph._captured is not None
    # the warm-up steps ran the batch norm three more times: their statistics were put back
    torch.testing.assert_close(module.bn.running_mean, eager.bn.running_mean)
    assert module.bn.num_batches_tracked.item() == 3
    torch.testing.assert_close(module.conv.weight.grad, eager.conv.weight.grad)
    assert sum('captured as CUDA graphs for inputs (2, 3, 8, 8) float32' in r.getMessage()
               for r in records) == 1


def test_a_second_input_shape_stops_graphing(fake_graphs):
    module, graph = ConvBN().train(), TrainingGraph('ConvBN')
    step(graph, module, torch.randn(2, 3, 8, 8))
    with captured_log() as records:
        step(graph, module, torch.randn(2, 3, 16, 8))
        step(graph, module, torch.randn(2, 3, 8, 8))
    assert fake_graphs.captures == 1 and graph._captured is None
    assert 'inputs (2, 3, 16, 8) float32 after (2, 3, 8, 8) float32' in graph._off
    assert sum('training without CUDA graphs from now on' in r.getMessage() for r in records) == 1


def test_a_module_mode_changed_after_the_capture_stops_graphing(fake_graphs):
    module, graph, x = ConvBN().train(), TrainingGraph('ConvBN'), torch.randn(2, 3, 8, 8)
    step(graph, module, x)
    module.bn.eval()  # as a frozen batch norm: the graph would still update its statistics
    step(graph, module, x)
    assert fake_graphs.captures == 1 and 'training mode of a module inside changed' in graph._off
    assert graph._captured is None


def test_a_call_before_the_previous_backward_runs_eagerly(fake_graphs, monkeypatch):
    module, graph, x = ConvBN().train(), TrainingGraph('ConvBN'), torch.randn(2, 3, 8, 8)
    replays = []
    first = graph(module, module.forward, x)
    captured = graph._captured.graphed
    monkeypatch.setattr(graph._captured, 'graphed', lambda *a: replays.append(1) or captured(*a))
    with captured_log() as records:
        second = graph(module, module.forward, x)  # the first one's backward is still to run
    assert replays == [] and 'called again before the backward' in records[0].getMessage()
    (first.sum() + second.sum()).backward()
    graph(module, module.forward, x)
    assert replays == [1]
    del first, second
    graph(module, module.forward, x)  # the last call's graph was freed without a backward
    assert replays == [1, 1]


def test_parameters_moved_to_new_memory_are_captured_again(fake_graphs):
    module, graph, x = ConvBN().train(), TrainingGraph('ConvBN'), torch.randn(2, 3, 8, 8)
    step(graph, module, x)
    step(graph, module, x)
    module.conv.weight.data = module.conv.weight.data.clone()  # as module.to() does
    step(graph, module, x)
    assert fake_graphs.captures == 2
    assert fake_graphs.alive == 0  # the first capture's graphs were let go before the second


def test_not_graphed_in_eval_mode_without_grad_or_off_the_gpu(fake_graphs, monkeypatch):
    module, graph, x = ConvBN(), TrainingGraph('ConvBN'), torch.randn(2, 3, 8, 8)
    graph(module.eval(), module.forward, x)
    with torch.no_grad():
        graph(module.train(), module.forward, x)
    monkeypatch.setattr(tg, 'eager_only', lambda inputs: True)
    step(graph, module, x)
    assert fake_graphs.captures == 0


def test_hooks_turn_it_off(fake_graphs):
    module, graph, x = ConvBN().train(), TrainingGraph('ConvBN'), torch.randn(2, 3, 8, 8)
    module.bn.register_forward_hook(lambda *args: None)
    step(graph, module, x)
    assert fake_graphs.captures == 0 and "'bn' has hooks" in graph._off


def distributed_on(monkeypatch, backend: str) -> None:
    """A distributed run on ``backend`` as the graphs see it (mmengine's logger made first: it
    would ask the process group for its rank)."""
    MMLogger.get_current_instance()
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.distributed, 'get_backend', lambda group=None: backend)


def test_sync_batch_norm_off_nccl_in_a_distributed_run_turns_it_off(fake_graphs, monkeypatch):
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)).train()
    distributed_on(monkeypatch, 'gloo')
    graph = TrainingGraph('synced')
    assert tg.unsupported(module) == ("module '1' is a SyncBatchNorm whose collectives run on the "
                                      "'gloo' backend, which a CUDA graph cannot hold (NCCL's can)")
    with captured_log() as records:
        graph(module, lambda x: module[0](x), torch.randn(2, 3, 8, 8)).sum().backward()
    assert fake_graphs.captures == 0 and "'gloo' backend" in graph._off
    assert 'training without CUDA graphs from now on' in records[0].getMessage()


def test_sync_batch_norm_on_nccl_is_captured_letting_other_threads_call_cuda(fake_graphs,
                                                                           monkeypatch):
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)).train()
    distributed_on(monkeypatch, 'nccl')
    assert tg.unsupported(module) is None and tg.synchronises(module)
    graph = TrainingGraph('synced')
    graph(module, lambda x: module[0](x), torch.randn(2, 3, 8, 8)).sum().backward()
    assert fake_graphs.captures == 1 and graph._off is None
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: False)
    assert tg.unsupported(module) is None and not tg.synchronises(module)
    assert not tg.synchronises(ConvBN())


def test_a_failed_capture_is_an_error(fake_graphs):
    fake_graphs.fail = True
    module, graph = ConvBN().train(), TrainingGraph('ConvBN')
    with pytest.raises(RuntimeError, match='ConvBN: capturing its training step as CUDA graphs '
                       'failed .RuntimeError: operation not permitted.*set cuda_graph=False'):
        step(graph, module, torch.randn(2, 3, 8, 8))
    assert module.bn.num_batches_tracked.item() == 0  # the warm-up steps' statistics put back
    step(graph, module, torch.randn(2, 3, 8, 8))  # later calls run eagerly
    assert fake_graphs.captures == 1


def test_copies_start_without_graphs(fake_graphs):
    module, graph = ConvBN().train(), TrainingGraph('ConvBN')
    step(graph, module, torch.randn(2, 3, 8, 8))
    for copied in (copy.deepcopy(graph), pickle.loads(pickle.dumps(graph))):
        assert copied.name == 'ConvBN' and copied._captured is None and copied._off is None


def test_segman_encoder_and_head_run_through_their_graphs(fake_graphs):
    torch.manual_seed(0)
    encoder = SegMANEncoder('t', cuda_graph=True).train()
    head = SegMANHead(feat_proj_dim=32, in_channels=[32, 64, 144, 192], channels=16,
                      num_classes=3, dropout_ratio=0, cuda_graph=True).train()
    eager_encoder, eager_head = copy.deepcopy(encoder), copy.deepcopy(head)
    eager_encoder.cuda_graphs = eager_head.cuda_graphs = None
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):
        logits, expected = head(encoder(x)), eager_head(eager_encoder(x))
        torch.testing.assert_close(logits, expected)
        logits.sum().backward()
    assert fake_graphs.captures == 2
    assert encoder.cuda_graphs.training._captured and head.cuda_graphs.training._captured


@pytest.mark.parametrize('other', ['with_cp', 'check_finite'])
def test_segman_encoder_turns_cuda_graph_off_with(other):
    with captured_log() as records:
        encoder = SegMANEncoder('t', cuda_graph=True, **{other: True})
    assert encoder.cuda_graphs is None
    assert any(f'cuda_graph is off: {other} is set' in r.getMessage() for r in records)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='CUDA graphs: run on the GPU machine')


@needs_cuda
def test_chained_graphs_give_eager_gradients_and_sums_on_the_gpu():
    """Two graphed modules in a chain, as encoder and head (the second one's inputs come from
    the first one's replay), against the same two eager: outputs and gradients bit for bit
    (cuDNN's convolutions, no cuBLAS), also where gradients add up over two backward passes
    without zeroing (a ``.grad`` that is still a graph's buffer is copied before the next
    replay would overwrite it); the caller's batches are left as they were."""
    torch.manual_seed(0)
    first = ConvBN().cuda().train()
    second = nn.Sequential(nn.Conv2d(4, 2, 3, padding=1), nn.BatchNorm2d(2)).cuda().train()
    eager_first, eager_second = copy.deepcopy(first), copy.deepcopy(second)
    graphs = TrainingGraph('first'), TrainingGraph('second')
    batches = [torch.randn(2, 3, 16, 16, device='cuda') for _ in range(4)]
    kept = [x.clone() for x in batches]
    for step_, x in enumerate(batches):
        out = graphs[1](second, second.forward, graphs[0](first, first.forward, x))
        expected = eager_second(eager_first(x))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        out.square().sum().backward()
        expected.square().sum().backward()
        if step_ % 2:  # gradients summed over two steps, then compared and dropped
            for graphed, eager in ((first, eager_first), (second, eager_second)):
                for p, q in zip(graphed.parameters(), eager.parameters()):
                    torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
                graphed.zero_grad(set_to_none=True)
                eager.zero_grad(set_to_none=True)
    assert all(graph._captured is not None for graph in graphs)
    torch.testing.assert_close(first.bn.running_mean, eager_first.bn.running_mean, rtol=0, atol=0)
    for x, before in zip(batches, kept):  # later batches copied into the graph's own inputs
        assert torch.equal(x, before)


def test_the_captured_backward_runs_without_autocast():
    """The warm-up's and the capture's backward passes run with autocast off, as eager
    training's (outside the autocast that the forward and ``torch.autograd.grad`` itself
    would pass on to a backward's own operations)."""
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(torch.is_autocast_enabled('cuda'))
            return g * 2

    x = torch.randn(3, requires_grad=True)
    enabled = torch.is_autocast_enabled('cuda')
    torch.set_autocast_enabled('cuda', True)  # a flag of the thread: no GPU needed
    try:
        torch.autograd.grad([Probe.apply(x)], [x], [torch.ones(3)])
        (grad, ) = tg._backward([Probe.apply(x)], [x], [torch.ones(3)])
    finally:
        torch.set_autocast_enabled('cuda', enabled)
    assert seen == [True, False]
    torch.testing.assert_close(grad, torch.full((3, ), 2.0))


def test_a_capture_sees_fresh_leaves_that_share_the_parameters_memory():
    module = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)).train()
    module[2].weight = module[0].weight  # one parameter in two modules
    module[1].bias.requires_grad_(False)
    before = list(module.parameters())
    with tg._parameter_aliases(module) as aliases:
        assert len(aliases) == 4  # the shared weight once; not the norm's frozen bias
        assert module[0].weight is module[2].weight is aliases[0]
        assert all(a is not p and a.data_ptr() == p.data_ptr() and a.is_leaf
                   for a, p in zip(aliases, [p for p in before if p.requires_grad]))
        assert module[1].bias is before[3]  # frozen: not aliased
        module(torch.randn(1, 3, 4, 4)).sum().backward()
    assert all(a is b for a, b in zip(module.parameters(), before))
    assert all(p.grad is None for p in before)
    with pytest.raises(ValueError):
        with tg._parameter_aliases(module):
            raise ValueError
    assert all(a is b for a, b in zip(module.parameters(), before))
