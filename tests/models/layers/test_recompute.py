"""recomputed_for_backward: what autograd keeps, and gradients equal to keeping the tensor."""
import sys
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from mmseg_segman.models import SegMANEncoder
from mmseg_segman.models.variants import ENCODER_ARCHS
from mmseg_segman.models.layers import SS2D, SegMANBlock, recompute
from mmseg_segman.models.layers.recompute import (recomputed_for_backward, recomputing,
                                                  recomputing_now)

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / 'tools' / 'analysis_tools'))
from saved_for_backward import fake_cuda  # noqa: E402

from ...ops.autograd_memory import kept_storages  # noqa: E402

TINY = dict(embed_dims=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
            window_size=[5, 3, 3, 3], mlp_ratios=[2, 2, 2, 2], layerscales=[True] * 4)


@pytest.fixture(autouse=True)
def as_in_a_graph_capture():
    """Every test as inside a training graph's capture, where the maps are recomputed."""
    with recomputing():
        yield


def test_only_a_graph_capture_recomputes(monkeypatch):
    """Eagerly the maps are kept (the hooks cost host time); where the stream is being
    captured into a CUDA graph (a training graph) they are recomputed."""
    monkeypatch.setattr(recompute, '_forced', [])  # out of the fixture's block
    assert not recomputing_now()
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    with recomputed_for_backward(y, x, lambda t: t * 2):
        _, kept = kept_storages(torch.square, y)
    assert y.untyped_storage()._cdata in kept
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_current_stream_capturing', lambda: True)
    assert recomputing_now()
    with recomputing(False):
        assert not recomputing_now()


def conv_then_norm(x, weight, recompute_on=True):
    """``layer_norm`` (which keeps a permuted view of its input) of ``x + dwconv(x)``."""
    def dwconv(source):
        return source + F.conv2d(source, weight, padding=1, groups=source.shape[1])

    y = dwconv(x)
    with recomputed_for_backward(y, x, dwconv) if recompute_on else nullcontext():
        normed = F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2])
        return (normed * torch.arange(normed.numel()).view(normed.shape).cos()).sum(), y


@pytest.mark.parametrize('autocast', [False, True])
def test_the_tensor_is_not_kept_and_the_gradients_are_unchanged(autocast):
    torch.manual_seed(0)
    weight = torch.randn(4, 1, 3, 3, requires_grad=True)
    x = torch.randn(2, 4, 5, 6, requires_grad=True)
    grads, kept = [], []
    for recompute_on in (False, True):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            (loss, y), saved = kept_storages(conv_then_norm, x, weight, recompute_on)
        kept.append(y.untyped_storage()._cdata in saved)
        grads.append(torch.autograd.grad(loss, (x, weight)))
    assert kept == [True, False]
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)


def test_an_enclosing_hook_receives_the_source_where_the_tensor_was():
    """The enclosing hooks (checkpointing, offloading) pack ``x`` in ``y``'s place and
    unpack it for the recomputation."""
    torch.manual_seed(0)
    weight = torch.randn(4, 1, 3, 3)
    x = torch.randn(2, 4, 5, 6, requires_grad=True)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return t.clone()  # as an offload: a copy, so what comes back is what was packed

    def unpack(t):
        unpacked.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss, y = conv_then_norm(x, weight)
    assert not any(t.untyped_storage()._cdata == y.untyped_storage()._cdata for t in packed)
    assert any(torch.equal(t, x) for t in packed)
    grad, = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad, torch.autograd.grad(conv_then_norm(x, weight, False)[0], x)[0],
                               rtol=0, atol=0)
    assert any(torch.equal(t, x) for t in unpacked)


def test_the_recomputation_takes_the_layout_the_forward_pass_had():
    x = torch.randn(2, 4, 5, 6, requires_grad=True)
    layouts = iter([torch.contiguous_format, torch.channels_last])  # forward, then backward

    def doubled(source):
        return (source * 2).contiguous(memory_format=next(layouts))

    y = doubled(x)
    with recomputed_for_backward(y, x, doubled):
        loss = (y.permute(0, 2, 3, 1) ** 2).sum()
    grad, = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad, 8 * x, rtol=0, atol=0)


@pytest.mark.parametrize('case', ['no grad', 'a view', 'not requiring grad'])
def test_nothing_changes_where_there_is_nothing_to_recompute(case):
    x = torch.randn(2, 3, requires_grad=case != 'not requiring grad')
    fn = mock.Mock(side_effect=lambda t: t * 2)
    with torch.no_grad() if case == 'no grad' else nullcontext():
        y = x * 2
        if case == 'a view':
            y = y[1:]
        with recomputed_for_backward(y, x, fn):
            loss = (y ** 2).sum()
    if loss.requires_grad:
        loss.backward()
    fn.assert_not_called()


def test_a_block_keeps_less_and_its_gradients_are_unchanged():
    """cpe1 -> norm1, cpe2 -> norm2 and the FFN's dwconv -> fc2: the three maps are made again
    (float32 on the CPU: bit for bit the gradients of keeping them)."""
    torch.manual_seed(0)
    block = SegMANBlock(8, SS2D(8), ffn_dim=16).train()
    x = torch.randn(2, 8, 6, 7, requires_grad=True)
    results = []
    for recompute_on in (False, True):
        with recomputing(recompute_on):
            out, kept = kept_storages(block, x)
        results.append((sum(kept.values()), torch.autograd.grad(out.square().sum(),
                                                                 (x, *block.parameters()))))
    (plain_bytes, plain_grads), (bytes_, grads) = results
    map_bytes = 2 * 8 * 6 * 7 * 4  # a float32 map of the block's 8 channels
    assert plain_bytes - bytes_ == 4 * map_bytes  # cpe1's, cpe2's and the FFN's 16 channels
    for plain, recomputed in zip(plain_grads, grads):
        assert torch.equal(plain, recomputed)


def test_the_encoder_on_the_gpus_path_keeps_two_maps_and_its_ffn_map_fewer_a_block():
    """On the GPU's path (fake CUDA tensors, Triton kernels not launched): a block keeps
    neither the cpe convolutions' outputs nor the FFN's hidden map (LASS's rotated q and k
    are kept)."""
    pytest.importorskip('triton')
    encoder = SegMANEncoder(arch='t').train()
    kept = {}
    with fake_cuda():
        encoder = encoder.cuda()
        x = torch.randn(2, 3, 64, 96, device='cuda')
        for recompute_on in (False, True):
            with recomputing(recompute_on):
                kept[recompute_on] = sum(kept_storages(encoder, x)[1].values())
    arch = ENCODER_ARCHS['t']
    # a float32 (B, C, H, W) map a block: cpe1's and cpe2's outputs, mlp_ratio for the FFN
    maps = [(2 + ratio) * 2 * channels * (64 // stride) * (96 // stride) * 4 * depth
            for channels, ratio, stride, depth
            in zip(arch['embed_dims'], arch['mlp_ratios'], (4, 8, 16, 32), arch['depths'])]
    assert kept[False] - kept[True] == sum(maps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='the fast path needs CUDA')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_gradients_on_the_gpu_are_those_of_keeping_the_maps(dtype):
    """The Triton kernels' recomputations give the gradients of keeping the maps (up to the
    order of the weight gradients' atomic sums)."""
    torch.manual_seed(0)
    encoder = SegMANEncoder(arch=TINY).cuda().train()
    x = torch.randn(2, 3, 64, 96, device='cuda')
    grads = []
    for recompute_on in (False, True):
        with recomputing(recompute_on), \
                torch.autocast('cuda', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = sum(o.float().square().mean() for o in encoder(x))
        grads.append(torch.autograd.grad(loss, list(encoder.parameters())))
    for (name, _), plain, recomputed in zip(encoder.named_parameters(), *grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-4, atol=1e-6, msg=name)


def test_the_encoder_with_checkpointing_and_without():
    """Inside ``with_cp``'s non-reentrant checkpoint the recomputations nest: the gradients
    are those without checkpointing."""
    torch.manual_seed(0)
    plain = SegMANEncoder(arch=TINY).train()
    checkpointed = SegMANEncoder(arch=TINY, with_cp=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 40, 40)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        sum(o.square().sum() for o in model(x)).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
