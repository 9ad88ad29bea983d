"""InferenceGraph's decisions, on the CPU: the capture (``_Replay``) is replaced by a stand-in
that counts captures and calls the forward (what a replay computes), and the inputs count as
on the GPU. The graphs themselves are checked on the GPU by the tests marked ``needs_cuda``
and by ``tools/gpu_checks/check_inference_graph.py``."""
import copy
import pickle

import pytest
import torch
from torch import nn

from mmseg_segman.models import SegMANEncoder
from mmseg_segman.models.cuda_graphs import CUDAGraphs, InferenceGraph
from mmseg_segman.models.cuda_graphs import inference as ig
from mmseg_segman.models.decode_heads import SegMANHead
from mmseg_segman.ops.dispatch import kept

from ...conftest import captured_log
from .modules import ConvBN, fake_captures


class FakeReplays:
    """Stands in for ``_Replay``: counts captures (and the signatures captured) and replays
    by calling the forward; ``fail`` makes a capture raise."""

    def __init__(self):
        self.captures, self.replays, self.fail = [], 0, False

    def __call__(self, forward, inputs, memory):
        if self.fail:
            raise RuntimeError('operation not permitted when stream is capturing')
        self.captures.append(tuple(x.shape for x in inputs))

        def replay(given):
            self.replays += 1
            return forward(*given)

        return replay


@pytest.fixture
def fake(monkeypatch):
    return fake_captures(monkeypatch, ig, '_Replay', FakeReplays())


def infer(graph, module, x):
    with torch.no_grad():
        return graph(module, module.forward, x)


def test_captures_a_size_at_its_second_call_and_replays_it(fake):
    module, graph = ConvBN().eval(), InferenceGraph('ConvBN')
    x = torch.randn(2, 3, 8, 8)
    infer(graph, module, x)
    assert fake.captures == []  # the first call of a size runs eagerly
    with captured_log() as records:
        out = infer(graph, module, x)
    assert fake.captures == [((2, 3, 8, 8),)] and fake.replays == 1
    assert 'captured as a CUDA graph for inputs (2, 3, 8, 8) float32 (1 of at most 8)' \
        in records[0].getMessage()
    torch.testing.assert_close(out, module(x))
    infer(graph, module, torch.randn(2, 3, 8, 8))
    assert len(fake.captures) == 1 and fake.replays == 2
    with torch.inference_mode():  # another signature: inference tensors
        graph(module, module.forward, x)
        graph(module, module.forward, x)
    assert len(fake.captures) == 2


def test_at_most_max_graphs_then_eager(fake):
    module, graph = ConvBN().eval(), InferenceGraph('ConvBN', max_graphs=2)
    with captured_log() as records:
        for _ in range(3):
            for side in (8, 9, 10):
                infer(graph, module, torch.randn(1, 3, side, side))
    assert [c[0][-1] for c in fake.captures] == [8, 9]  # never one dropped for another
    assert fake.replays == 4
    assert sum('2 inference graphs captured (max_graphs)' in r.getMessage() for r in records) == 1


def test_eager_while_training_recording_or_off_the_gpu(fake, monkeypatch):
    module, graph, x = ConvBN().eval(), InferenceGraph('ConvBN'), torch.randn(2, 3, 8, 8)
    for _ in range(2):
        graph(module, module.forward, x)  # autograd recording
    module.bn.train()  # a module inside training
    for _ in range(2):
        infer(graph, module, x)
    module.eval()
    monkeypatch.setattr(ig, 'eager_only', lambda inputs: True)
    for _ in range(2):
        infer(graph, module, x)
    assert fake.captures == []


def test_eager_while_a_module_inside_has_forward_hooks(fake):
    module, graph, x = ConvBN().eval(), InferenceGraph('ConvBN'), torch.randn(2, 3, 8, 8)
    for _ in range(2):
        infer(graph, module, x)
    seen = []
    handle = module.bn.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with captured_log() as records:
        infer(graph, module, x)
    assert seen == [(2, 4, 8, 8)] and fake.replays == 1  # the hook ran: eager
    assert 'BatchNorm2d has forward hooks' in records[0].getMessage()
    handle.remove()
    infer(graph, module, x)
    assert fake.replays == 2


class KeptScale(ConvBN):
    """ConvBN scaled by a value an op keeps, made of a parameter (``ops.dispatch.kept``, as
    the 1x1 convolutions' weights in the compute dtype)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(4))

    def forward(self, x):
        return super().forward(x) * kept(self.scale, 'double', lambda s: 2 * s).view(-1, 1, 1)


@pytest.mark.parametrize('change', ['moved', 'replaced', 'written', 'loaded', 'submodule'])
def test_parameters_moved_replaced_or_written_capture_again(fake, change):
    # written in place: a replay would read the kept value made of the old one before the
    # capture
    module, graph, x = KeptScale().eval(), InferenceGraph('KeptScale'), torch.randn(2, 3, 8, 8)
    for _ in range(2):
        infer(graph, module, x)
    if change == 'moved':
        module.conv.weight.data = module.conv.weight.data.clone()  # as module.to() does
    elif change == 'replaced':
        module.conv.weight = nn.Parameter(module.conv.weight.detach() * 2)
    elif change == 'written':
        with torch.no_grad():
            module.scale.mul_(2)
    elif change == 'loaded':
        module.load_state_dict({k: v * 2 for k, v in module.state_dict().items()})
    else:
        module.conv = nn.Conv2d(3, 4, 3, padding=1).eval()
    with captured_log() as records:
        out = infer(graph, module, x)
    assert fake.replays == 1 and 'captured again' in records[0].getMessage()  # eager
    torch.testing.assert_close(out, module(x))
    infer(graph, module, x)
    assert len(fake.captures) == 2 and fake.replays == 2


def test_parameters_written_in_place_are_read_by_the_replays(fake):
    # where no op keeps a value made of them, the graphs read them in place: no new capture
    module, graph, x = ConvBN().eval(), InferenceGraph('ConvBN'), torch.randn(2, 3, 8, 8)
    for _ in range(2):
        infer(graph, module, x)
    module.load_state_dict({k: v * 2 for k, v in module.state_dict().items()})
    infer(graph, module, x)
    assert len(fake.captures) == 1 and fake.replays == 2


def test_training_releases_the_inference_graphs(fake):
    module, graphs, x = ConvBN().eval(), CUDAGraphs('ConvBN'), torch.randn(2, 3, 8, 8)
    for _ in range(2):
        infer(graphs, module, x)
    assert graphs.inference._graphs
    graphs(module.train(), module.forward, x).sum().backward()  # on the CPU: eager training
    assert not graphs.inference._graphs and not graphs.inference._calls
    module.eval()
    infer(graphs, module, x)
    assert len(fake.captures) == 1  # counted from the start again


def test_a_failed_capture_is_an_error_then_eager(fake):
    fake.fail = True
    module, graph, x = ConvBN().eval(), InferenceGraph('ConvBN'), torch.randn(2, 3, 8, 8)
    infer(graph, module, x)
    with pytest.raises(RuntimeError, match='ConvBN: capturing its inference forward as CUDA graphs '
                       'failed .RuntimeError: operation not permitted.*set cuda_graph=False'):
        infer(graph, module, x)
    fake.fail = False
    for _ in range(3):
        infer(graph, module, x)
    assert fake.captures == []


def test_copies_start_without_graphs(fake):
    module, graph, x = ConvBN().eval(), InferenceGraph('ConvBN', max_graphs=3), torch.randn(1, 3, 4, 4)
    for _ in range(2):
        infer(graph, module, x)
    for copied in (copy.deepcopy(graph), pickle.loads(pickle.dumps(graph))):
        assert (copied.name, copied.max_graphs) == ('ConvBN', 3) and not copied._graphs


@pytest.mark.parametrize('arguments', [dict(max_graphs=0), dict(min_calls=1), dict(max_graphs=2.0)])
def test_refuses_bad_limits(arguments):
    with pytest.raises(ValueError, match=f'{next(iter(arguments))} must be an integer'):
        InferenceGraph('ConvBN', **arguments)


def test_segman_encoder_and_head_infer_through_their_graphs(fake):
    torch.manual_seed(0)
    encoder = SegMANEncoder('t', cuda_graph=True).eval()
    head = SegMANHead(feat_proj_dim=32, in_channels=[32, 64, 144, 192], channels=16,
                      num_classes=3, dropout_ratio=0, cuda_graph=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = head(encoder(x))
        logits = head(encoder(x))
        torch.testing.assert_close(logits, expected)
        assert len(fake.captures) == 2 and fake.replays == 2
        head(encoder(x))  # replayed again: the forward writes in place nothing ops keep values of
    assert len(fake.captures) == 2 and fake.replays == 4


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='CUDA graphs: run on the GPU machine')


@needs_cuda
def test_replays_equal_eager_and_hand_over_their_tensors_on_the_gpu():
    """Three sizes in turn through one pool, against eager: outputs bit for bit; an earlier
    call's outputs and the caller's inputs are not overwritten by later replays; under
    bfloat16 autocast and in inference mode too."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(),
                           nn.Conv2d(8, 4, 1)).cuda().eval()
    graph = InferenceGraph('net')
    sizes = (16, 24, 32)
    inputs = {s: torch.randn(2, 3, s, s, device='cuda') for s in sizes}
    kept = {s: x.clone() for s, x in inputs.items()}
    for mode in (torch.no_grad, torch.inference_mode):
        for dtype in (None, torch.bfloat16):
            with mode(), torch.autocast('cuda', dtype=torch.bfloat16, enabled=dtype is not None):
                outputs = {}
                for _ in range(3):
                    for s in sizes:
                        outputs.setdefault(s, []).append(graph(module, module, inputs[s]))
                        fresh = torch.randn_like(inputs[s])
                        graph(module, module, fresh)  # a later replay of the same graph
                for s in sizes:
                    expected = module(kept[s])
                    for out in outputs[s]:
                        assert torch.equal(out, expected)
                    assert torch.equal(inputs[s], kept[s])
    assert len(graph._graphs) == graph.max_graphs  # of 12 signatures: the last 4 ran eagerly
