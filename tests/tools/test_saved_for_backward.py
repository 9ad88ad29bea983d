"""tools/analysis_tools/saved_for_backward.py: the meta device and fake CUDA tensors count what
real tensors keep."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / 'tools' / 'analysis_tools'))
from saved_for_backward import saved_bytes, saved_bytes_by_module  # noqa: E402


def test_meta_count_equals_the_cpu_count_of_the_reference_path():
    on_cpu = saved_bytes('t', 1, 64, 96, 'cpu')
    on_meta = saved_bytes('t', 1, 64, 96, 'meta')
    assert on_cpu > 0 and abs(on_meta - on_cpu) <= 1e-3 * on_cpu  # within a few KiB of 40 MB
    # activations grow about linearly with the batch
    two, three = (saved_bytes('t', batch, 64, 96, 'meta') for batch in (2, 3))
    assert two > on_meta and abs((three - two) - (two - on_meta)) <= 0.03 * (two - on_meta)


def test_fake_cuda_counts_what_real_tensors_keep():
    """Fake CUDA tensors (the fast path's device) count the reference path as the CPU does:
    the storages of views, casts and reshapes are told apart as on real tensors. (The fast
    path itself, Triton kernels run in the CPU interpreter, matched its fake-CUDA count to
    704 of 9.9 million bytes for SegMAN-T at 64x96, docs/benchmarks.md: 19 minutes, too slow
    for the suite.)"""
    pytest.importorskip('triton')
    on_cpu, cpu_types = saved_bytes_by_module('t', 1, 64, 96, 'ref', device='cpu')
    faked, fake_types = saved_bytes_by_module('t', 1, 64, 96, 'ref', device='fake-cuda')
    assert abs(faked - on_cpu) <= 1e-3 * on_cpu, (faked, on_cpu)
    assert fake_types.keys() == cpu_types.keys() and sum(fake_types.values()) == faked


def test_fast_path_under_amp():
    pytest.importorskip('triton')
    fp32, types = saved_bytes_by_module('t', 2, 128, 128, 'fast')
    bf16, _ = saved_bytes_by_module('t', 2, 128, 128, 'fast', amp=True)
    assert sum(types.values()) == fp32 and 'SS2D' in types
    # activations in bf16; the scan's states in float32 and the weights' bf16 copies on top
    assert 0.5 * fp32 < bf16 < 0.75 * fp32
    with pytest.raises(ValueError, match='autocast for CUDA'):
        saved_bytes_by_module('s', 1, 64, 64, 'ref', amp=True)


def test_command_prints_one_json_line():
    result = subprocess.run([sys.executable, 'tools/analysis_tools/saved_for_backward.py', '--arch', 's',
                             '--batch', '2', '--size', '128', '128', '--path', 'fast', '--amp'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line['device'] == 'fake-cuda' and line['saved_gib'] > 0 and 'SS2D' in line['by_module_type']
    refused = subprocess.run([sys.executable, 'tools/analysis_tools/saved_for_backward.py', '--amp'],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and 'autocast for CUDA' in refused.stderr


def test_graphed_counts_the_recomputed_maps_out():
    """``--graphed``: as the training graphs capture the step, the blocks' cheap maps are
    recomputed rather than kept (models/layers/recompute.py)."""
    pytest.importorskip('triton')
    eager, _ = saved_bytes_by_module('t', 2, 64, 96, 'fast')
    graphed, _ = saved_bytes_by_module('t', 2, 64, 96, 'fast', graphed=True)
    assert graphed < 0.85 * eager
