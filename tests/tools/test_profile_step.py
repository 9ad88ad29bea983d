"""tools/gpu_checks/profile_step.py: kernels by category and operators by shape from a
profile (the profile itself needs a GPU)."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'tools' / 'gpu_checks'))
from profile_step import category, kernel_times, operator_rows  # noqa: E402


def test_categories_of_kernel_names():
    assert category('_na_bwd_dq_kernel') == 'attention dq'
    assert category('_na_bwd_dkdv_kernel') == 'attention dk dv'
    assert category('_pw_param_grad_kernel') == '1x1 conv'
    assert category('_merge_kernel') == 'scan glue'
    assert category('nvjet_sm90_tss_144x128_64x6_1x1_h_bz_TNN') == 'cuBLAS'
    assert category('void cudnn::engines_precompiled::nchwToNhwcKernel<bf16>') == 'dense conv'
    assert category('void at::native::reduce_kernel<128, 4, ReduceOp<float>>') == 'reduction'
    assert category('void at::native::vectorized_elementwise_kernel<8, '
                    'at::native::CUDAFunctor_add<c10::BFloat16>>') == 'elementwise'
    assert category('Memset (Device)') == 'fill, memset'
    assert category('some_new_kernel') == 'other'


def test_kernel_times_a_step_by_name_and_category():
    def event(cat, name, dur):
        return dict(ph='X', cat=cat, name=name, ts=0, dur=dur)
    events = [event('kernel', '_pw_fwd_kernel', 300), event('kernel', '_pw_fwd_kernel', 100),
              event('kernel', '_pw_param_grad_kernel', 200), event('gpu_memset', 'Memset (Device)', 40),
              event('kernel', '_na_fwd_kernel', 1000),
              event('cpu_op', 'aten::add', 5000)]  # the host's: not GPU time
    times = kernel_times(events, steps=2)
    assert times['total_ms'] == pytest.approx(0.82)
    assert times['categories'] == pytest.approx({'1x1 conv': 0.3, 'attention forward': 0.5,
                                                 'fill, memset': 0.02})
    assert list(times['categories']) == ['attention forward', '1x1 conv', 'fill, memset']
    assert times['kernels']['_pw_fwd_kernel'] == pytest.approx([0.2, 1.0])
    assert list(times['kernels'])[0] == '_na_fwd_kernel'


def test_kernel_times_by_launch_grid():
    # one kernel launched at two stages: apart by grid, together by name; an event without a
    # grid (a memset) keeps its name
    def event(name, dur, grid=None):
        return dict(ph='X', cat='kernel', name=name, ts=0, dur=dur,
                    args={} if grid is None else dict(grid=grid, block=[128, 1, 1]))
    events = [event('_na_fwd_kernel', 800, [1024, 64, 1]),
              event('_na_fwd_kernel', 200, [16, 192, 1]),
              event('_na_fwd_kernel', 700, [1024, 64, 1]), event('Memset (Device)', 40)]
    times = kernel_times(events, steps=1, by_grid=True)
    assert times['kernels'] == pytest.approx({'_na_fwd_kernel grid=(1024, 64, 1)': [1.5, 2.0],
                                              '_na_fwd_kernel grid=(16, 192, 1)': [0.2, 1.0],
                                              'Memset (Device)': [0.04, 1.0]})
    assert times['categories'] == pytest.approx({'attention forward': 1.7, 'fill, memset': 0.04})
    assert kernel_times(events, steps=1)['kernels'] == pytest.approx(
        {'_na_fwd_kernel': [1.7, 3.0], 'Memset (Device)': [0.04, 1.0]})


def test_operator_rows_keep_those_with_gpu_time():
    averages = [SimpleNamespace(key='aten::sum', input_shapes=[[8, 96, 16384]],
                                self_device_time_total=4000.0, count=4),
                SimpleNamespace(key='aten::view', input_shapes=[[8, 96]], self_device_time_total=0.0,
                                count=10),
                SimpleNamespace(key='aten::bmm', input_shapes=[[8, 96, 16], [8, 16, 96]],
                                self_device_time_total=9000.0, count=2)]
    rows = operator_rows(averages, steps=2)
    assert [r['op'] for r in rows] == ['aten::bmm', 'aten::sum']
    assert rows[1] == dict(op='aten::sum', shapes='[[8, 96, 16384]]', ms=2.0, calls=2.0)
