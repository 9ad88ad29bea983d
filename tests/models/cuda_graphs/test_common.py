"""What the CUDA graphs of a module are captured for, and the calls that stay eager."""
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from mmseg_segman.models.cuda_graphs import common


@contextmanager
def cuda_autocast_state(dtype):
    """CUDA's autocast switched on as ``torch.autocast('cuda')`` would (which, on a machine
    without CUDA, stays off)."""
    before = torch.is_autocast_enabled('cuda'), torch.get_autocast_dtype('cuda')
    torch.set_autocast_enabled('cuda', True)
    torch.set_autocast_dtype('cuda', dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled('cuda', before[0])
        torch.set_autocast_dtype('cuda', before[1])


def test_signature_tells_autocast_and_inference_mode_apart():
    x = torch.randn(2, 3, 4, 4)
    plain = common.signature([x])
    with cuda_autocast_state(torch.bfloat16):
        autocast = common.signature([x])
    with torch.inference_mode():
        inference = common.signature([x])
    assert len({plain, autocast, inference}) == 3
    assert common.signature([torch.randn(2, 3, 4, 5)]) != plain
    assert common.describe(autocast) == '(2, 3, 4, 4) float32 under bfloat16 autocast'


def test_eager_off_the_gpu_and_while_traced():
    assert common.eager_only([torch.randn(1, 3)])
    on_gpu = SimpleNamespace(is_cuda=True)  # an input as eager_only sees one on the GPU
    seen = []

    def record(t):
        seen.append(common.eager_only([on_gpu]))
        return t * 2

    torch.jit.trace(record, (torch.randn(1, 3),), check_trace=False)
    assert seen == [True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's autocast: run on the GPU machine")
def test_capture_autocast_keeps_no_casts():
    with common.capture_autocast():
        assert not torch.is_autocast_enabled('cuda')
    with torch.autocast('cuda', dtype=torch.float16):
        with common.capture_autocast():
            assert torch.is_autocast_enabled('cuda') and not torch.is_autocast_cache_enabled()
            assert torch.get_autocast_dtype('cuda') == torch.float16
        assert torch.is_autocast_cache_enabled()
