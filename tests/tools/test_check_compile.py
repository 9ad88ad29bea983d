"""tools/gpu_checks/check_compile.py: how compiled gradients are compared with eager ones
(the runs themselves need a GPU)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'tools' / 'gpu_checks'))
from check_compile import gradient_differences  # noqa: E402


def test_vanishing_gradients_are_left_out_of_the_per_parameter_differences():
    eager = {'weight': torch.tensor([2.0, -4.0]), 'scale': torch.tensor([0.5, 0.1]),
             'bias_before_norm': torch.tensor([1e-9, 0.0])}
    compiled = {'weight': torch.tensor([2.0, -4.04]), 'scale': torch.tensor([0.5, 0.14]),
                'bias_before_norm': torch.tensor([-5e-9, 0.0])}
    got = gradient_differences(compiled, eager, named=2)
    assert abs(got['grad_diff_vs_largest'] - 0.04 / 4) < 1e-6  # scale's 0.04 against 4.0
    # scale is 0.08 of its own largest; the bias (6x its own) is below 1e-3 of the largest
    assert got['grad_worst'] == 'scale' and abs(got['grad_rel_diff_max'] - 0.08) < 1e-6
    assert got['grads_skipped'] == 1
    assert list(got['grad_largest_diffs']) == ['weight', 'scale']
    assert got['grad_largest_diffs']['scale'] == [0.01, 0.125]


def test_a_gradient_in_one_run_only_is_named():
    eager = {'a': torch.ones(2), 'b': torch.ones(2)}
    assert gradient_differences({'a': torch.ones(2)}, eager) == {'grads_only_in_one_run': ['b']}
