"""tools/gpu_checks/check_block_kernels.py: splitting a trace's GPU events into steps (the
timings are measurements, not tested)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'tools' / 'gpu_checks'))
from check_block_kernels import STEP, step_kernels  # noqa: E402


def kernel(name, ts, dur, cat='kernel'):
    return dict(ph='X', cat=cat, name=name, ts=ts, dur=dur)


def test_kernels_are_listed_in_launch_order_and_averaged_over_the_steps():
    events = [dict(ph='X', cat='gpu_user_annotation', name=STEP, ts=0, dur=50),
              dict(ph='X', cat='gpu_user_annotation', name=STEP, ts=100, dur=50),
              kernel('b', 20, 4), kernel('a', 10, 2), kernel('a', 110, 4),
              kernel('fill', 130, 6, cat='gpu_memset'), kernel('b', 120, 8),
              kernel('fill', 25, 2, cat='gpu_memset'), kernel('cpu op', 12, 99, cat='cpu_op')]
    assert step_kernels(events, 2) == [dict(name='a', us=3.0), dict(name='b', us=6.0),
                                       dict(name='fill', us=4.0)]


def test_steps_that_launch_different_kernels_are_refused():
    events = [dict(ph='X', cat='gpu_user_annotation', name=STEP, ts=0, dur=50),
              dict(ph='X', cat='gpu_user_annotation', name=STEP, ts=100, dur=50),
              kernel('a', 10, 2), kernel('a', 110, 4), kernel('b', 120, 1)]
    with pytest.raises(RuntimeError, match='different numbers'):
        step_kernels(events, 2)
