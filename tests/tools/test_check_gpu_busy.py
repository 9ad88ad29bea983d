"""tools/gpu_checks/check_gpu_busy.py: the GPU's busy time and phases from a profiler trace
(the measurement itself needs a GPU)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'tools' / 'gpu_checks'))
from check_gpu_busy import interleaved_timings, merged, summarize_trace  # noqa: E402


def event(cat, name, ts, dur):
    return dict(ph='X', cat=cat, name=name, ts=ts, dur=dur)


def test_busy_time_is_the_union_of_the_intervals():
    # two overlapping kernels, one inside another, one after a gap
    assert merged([(50, 60), (10, 30), (20, 40), (25, 35)]) == [(10, 40), (50, 60)]


def test_trace_summary_per_step_and_phase():
    events = []
    for step in range(2):  # two steps of 10 ms (trace times are microseconds)
        t = step * 10_000
        events += [event('user_annotation', 'phase:forward', t, 3_000),
                   event('user_annotation', 'phase:backward', t + 3_000, 6_000),
                   event('user_annotation', 'phase:optimizer', t + 9_000, 1_000),
                   event('kernel', 'a', t + 1_000, 1_000), event('kernel', 'b', t + 1_500, 1_000),
                   event('gpu_memcpy', 'c', t + 4_000, 2_000),
                   event('kernel', 'd', t + 9_500, 400),
                   event('cpu_op', 'aten::add', t, 9_999)]  # host ops are not GPU time
    row = summarize_trace(events, steps=2)
    assert row['gpu_busy_ms'] == pytest.approx(3.9)  # 1.5 + 2 + 0.4 a step
    assert row['profiled_wall_ms'] == pytest.approx(10.0)
    assert row['busy_share'] == pytest.approx(0.39)
    # idle: 1 ms before a (not over 1 ms), 1.5 after b, 3.5 after c, 1.1 from d to the next
    # step's a: five gaps over 1 ms in two steps
    assert row['gpu_intervals'] == 4 and row['idle_gaps_over_1ms'] == 2.5
    assert (row['forward_host_span_ms'], row['forward_gpu_busy_ms']) == (3.0, 1.5)  # a and b overlap
    assert (row['backward_host_span_ms'], row['backward_gpu_busy_ms']) == (6.0, 2.0)
    assert row['optimizer_gpu_busy_ms'] == pytest.approx(0.4)


def test_a_trace_without_gpu_activity_is_refused():
    with pytest.raises(RuntimeError, match='no GPU activity'):
        summarize_trace([event('user_annotation', 'phase:forward', 0, 10)], steps=1)


def test_models_are_timed_in_turn_the_order_reversed_every_other_round(monkeypatch):
    import check_gpu_busy

    order = []
    monkeypatch.setattr(check_gpu_busy, 'timed_step', lambda step: step())
    steps = {name: (lambda name=name: order.append(name) or name) for name in 'abc'}
    timings = interleaved_timings(steps, rounds=3)
    assert order == list('abccbaabc')
    assert timings == {name: [name] * 3 for name in 'abc'}
