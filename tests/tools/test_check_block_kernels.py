"""tools/gpu_checks/check_block_kernels.py: splitting a trace's GPU events into steps, reading
ncu's CSV (the timings are measurements, not tested)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'tools' / 'gpu_checks'))
from check_block_kernels import NCU_METRICS, STEP, ncu_kernels, step_kernels  # noqa: E402


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


def ncu_log(tmp_path, rows, units=('ns', 'byte', 'Kbyte', '%', '%', '%', 'register/thread')):
    """An ``ncu --csv --page raw`` log: ncu's messages, the metrics' names, units, then rows."""
    header = ['ID', 'Process ID', 'Kernel Name'] + list(NCU_METRICS.values())
    lines = ['==PROF== Connected to process 1 (python3)',
             ','.join(f'"{h}"' for h in header),
             ','.join(f'"{u}"' for u in ['', '', ''] + list(units))]
    lines += [','.join(f'"{v}"' for v in row) for row in rows]
    path = tmp_path / 'kernels.csv'
    path.write_text('\n'.join(lines) + '\n==PROF== Disconnected from process 1\n')
    return str(path)


def test_ncu_kernels_are_read_in_launch_order_in_us_and_bytes(tmp_path):
    path = ncu_log(tmp_path, [[0, 1, '_na_fwd_kernel', '2,500', 1000, 3, 10.5, 80, 50, 128],
                              [1, 1, 'void at::native::fill', 500, 20, 0, 1, 2, 90, 16]])
    kernels = ncu_kernels(path)
    assert [k['name'] for k in kernels] == ['_na_fwd_kernel', 'void at::native::fill']
    assert kernels[0] == dict(name='_na_fwd_kernel', us=2.5, read=1000.0, write=3000.0,
                              memory_pct=10.5, sm_pct=80.0, occupancy_pct=50.0, registers=128.0)
    assert kernels[1]['us'] == 0.5


def test_ncu_logs_without_the_metrics_or_kernels_are_refused(tmp_path):
    with pytest.raises(RuntimeError, match='unknown unit'):
        ncu_kernels(ncu_log(tmp_path, [[0, 1, 'k', 1, 1, 1, 1, 1, 1, 1]],
                            units=('cycle', 'byte', 'byte', '%', '%', '%', 'register/thread')))
    path = tmp_path / 'short.csv'
    path.write_text('"ID","Kernel Name","gpu__time_duration.sum"\n"","","nsecond"\n"0","k","1"\n')
    with pytest.raises(RuntimeError, match='not in the log'):
        ncu_kernels(str(path))
    path.write_text('==PROF== No kernels were profiled.\n')
    with pytest.raises(RuntimeError, match='no kernel'):
        ncu_kernels(str(path))
