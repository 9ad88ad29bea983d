"""tools/gpu_checks/check_compile.py: how compiled gradients are compared with eager ones
(the runs themselves need a GPU)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'tools' / 'gpu_checks'))
from check_compile import compiled_part, gradient_differences, gradients  # noqa: E402


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


def test_a_compiled_part_keeps_the_parameters_plain_names():
    """``--parts``: only the named submodule is compiled, and the gradients keep the names of
    the uncompiled model (``torch.compile``'s wrapper adds ``_orig_mod.``), so that they
    compare with the eager run's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    x = torch.randn(5, 3)
    model(x).sum().backward()
    eager = gradients(model)
    assert compiled_part(model, '1.0', fullgraph=True) is model
    assert type(model[1][0]).__name__ == 'OptimizedModule' and type(model[0]) is torch.nn.Linear
    model(x).sum().backward()
    got = gradients(model)
    assert got.keys() == eager.keys() == {'0.weight', '0.bias', '1.0.weight', '1.0.bias'}
    assert gradient_differences(got, eager)['grad_diff_vs_largest'] < 1e-6
