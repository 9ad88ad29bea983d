"""FLOP counting: the SegMAN op rules, and the tool against the paper's SegMAN-T figure."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.analysis import FlopAnalyzer
from torch import nn

from mmseg_segman.flops import node_name, segman_flop_analyzer
from mmseg_segman.models.layers import SS2D, PointwiseConv2d
from mmseg_segman.ops import biased_attention, neighborhood_attention_2d, use_backends
from mmseg_segman.ops.dispatch import Backend, registered_ops, runs_anywhere

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / 'tools' / 'analysis_tools' / 'get_flops.py'


class NeighborhoodAttention(nn.Module):
    def __init__(self, heads, kernel_size, with_rpb):
        super().__init__()
        self.heads, self.kernel_size = heads, kernel_size
        span = 2 * kernel_size - 1
        self.rpb = nn.Parameter(torch.zeros(heads, span, span)) if with_rpb else None

    def forward(self, x):  # x (B, heads, H, W, d) serves as q, k and v
        return neighborhood_attention_2d(x, x, x, self.kernel_size, self.rpb)


class GlobalAttention(nn.Module):
    def forward(self, x):  # (B, heads, L, d)
        return biased_attention(x, x, x, torch.zeros(x.size(1), x.size(2), x.size(2)))


def count(module, x):
    analyzer = segman_flop_analyzer(module, (x, ), warn_unsupported=False)
    return analyzer.total(), analyzer.by_operator()


@pytest.mark.parametrize('kernel_size,with_rpb,keys', [(3, True, 9), (3, False, 9), (7, True, 6 * 5)])
def test_neighborhood_attention_rule(kernel_size, with_rpb, keys):
    b, heads, h, w, d = 2, 3, 6, 5, 8
    total, by_op = count(NeighborhoodAttention(heads, kernel_size, with_rpb), torch.randn(b, heads, h, w, d))
    queries = b * heads * h * w
    assert total == 2 * queries * keys * d + (queries * keys if with_rpb else 0)
    assert set(by_op) == {node_name('neighborhood_attention')[len('prim::'):]}  # one node, nothing else


def test_global_attention_rule():
    b, heads, length, d = 2, 4, 20, 8
    total, _ = count(GlobalAttention(), torch.randn(b, heads, length, d))
    assert total == 2 * b * heads * length * length * d


def test_selective_scan_rule_and_projections():
    b, c, h, w = 2, 32, 6, 7
    ss2d = SS2D(c)
    r, n, length = ss2d.dt_rank, ss2d.d_state, h * w
    total, by_op = count(ss2d, torch.randn(b, c, h, w))
    scan = 9 * b * length * 4 * c * n + b * 4 * c * length  # the release's formula, 4 directions
    dt_projs = b * length * 4 * c * r  # the step projection, applied inside the scan op
    x_proj = b * length * 4 * (r + 2 * n) * c
    assert by_op[node_name('cross_selective_scan')[len('prim::'):]] == scan + dt_projs
    assert total == pytest.approx(scan + dt_projs + x_proj, rel=1e-3)  # mmengine rounds einsums
    # mmengine alone counts the reference scan's chunked matmuls instead of the recurrence
    plain = FlopAnalyzer(ss2d, (torch.randn(b, c, h, w), ))
    plain.unsupported_ops_warnings(False)
    assert plain.total() != total


def test_ops_are_restored_after_counting():
    ss2d, x = SS2D(16).eval(), torch.randn(1, 16, 5, 4)
    before = ss2d(x)
    count(ss2d, x)
    assert all(dispatcher.requested() is None for dispatcher in registered_ops().values())
    assert torch.equal(ss2d(x), before)


def test_counting_beats_other_backend_choices():
    """The counter's scope is the strongest choice: inside another scope (or under a model's
    op_backends) every op is still one node."""
    b, heads, h, w, d = 1, 2, 6, 5, 8
    with use_backends('torch'):
        total, by_op = count(NeighborhoodAttention(heads, 3, True), torch.randn(b, heads, h, w, d))
    assert set(by_op) == {node_name('neighborhood_attention')[len('prim::'):]}


def test_ops_without_a_rule_are_counted_on_their_reference(monkeypatch):
    """On CUDA a fast backend launches a kernel the jit trace cannot see; while counting,
    the ops without a rule of their own run their reference (as on the CPU)."""
    dispatcher = registered_ops()['pointwise_conv2d']
    invisible = Backend(lambda x, weight, *args: x.new_zeros(x.size(0), weight.size(0), *x.shape[2:]),
                        runs_anywhere)  # what the trace records of a Triton launch: an empty
    monkeypatch.setattr(dispatcher, 'backends', {'invisible': invisible, **dispatcher.backends})
    b, c, o, h, w = 2, 8, 16, 5, 6
    total, _ = count(PointwiseConv2d(c, o), torch.randn(b, c, h, w))
    assert total == b * o * c * h * w


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args), '--device', 'cpu'],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_tool_reproduces_paper_segman_t_ade20k():
    """Paper: SegMAN-T, 6.4M parameters, 6.2 GFLOPs at 512x512."""
    result = run_tool(REPO / 'configs/segman/segman-t_4xb4-160k_ade20k-512x512.py', '--shape', 512, 512)
    assert result.returncode == 0, result.stderr[-3000:]
    flops = float(re.search(r'Flops: ([\d.]+)G', result.stdout).group(1))
    params = float(re.search(r'Params: ([\d.]+)M', result.stdout).group(1))
    assert 'Input shape: (512, 512)' in result.stdout
    assert abs(flops - 6.2) / 6.2 < 0.03, result.stdout
    assert abs(params - 6.4) < 0.05, result.stdout


def test_tool_names_a_missing_config(tmp_path):
    result = run_tool(tmp_path / 'nope.py', '--shape', 64)
    assert result.returncode != 0 and 'nope.py does not exist' in result.stderr
