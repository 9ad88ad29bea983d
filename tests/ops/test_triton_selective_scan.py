"""The Triton selective scan against the PyTorch reference, run by Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so the checks run in a
subprocess executing this file.
"""
import os
import subprocess
import sys

import pytest


def test_triton_scan_in_interpreter():
    pytest.importorskip('triton')
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600,
                            env={**os.environ, 'TRITON_INTERPRET': '1'})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'all checks passed' in result.stdout


def check(batch, groups, channels, length, dtype, atol):
    import torch

    from mmseg_segman.ops.selective_scan import _selective_scan_torch
    from mmseg_segman.ops.triton_selective_scan import selective_scan_triton

    g = torch.Generator().manual_seed(length)
    gd = groups * channels
    inputs = [torch.randn(batch, gd, length, generator=g), torch.randn(batch, gd, length, generator=g),
              -torch.rand(gd, 1, generator=g) * 2, torch.randn(batch, groups, 1, length, generator=g),
              torch.randn(batch, groups, 1, length, generator=g), torch.randn(gd, generator=g),
              torch.randn(gd, generator=g)]
    inputs = [t.to(dtype) if i in (0, 1, 3, 4) else t for i, t in enumerate(inputs)]
    dy = torch.randn(batch, gd, length, generator=g)
    results = []
    for fn in (selective_scan_triton, _selective_scan_torch):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(dy)
        results.append([out] + [t.grad for t in leaves])
    names = ['y', 'du', 'ddelta', 'dA', 'dB', 'dC', 'dD', 'ddelta_bias']
    if length == 1:  # h_{-1} = 0, so A gets no gradient at all (a relative error cannot see noise)
        assert torch.count_nonzero(results[0][3]) == 0, results[0][3]
    for name, got, want in zip(names, *results):
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        scale = want.float().abs().max().item() + 1e-6
        err = (got.float() - want.float()).abs().max().item() / scale
        print(f'{dtype} B={batch} G={groups} D={channels} L={length} {name}: rel err {err:.2e}')
        assert err <= atol, (name, err)


if __name__ == '__main__':
    import torch
    for shape in [(1, 4, 3, 5), (2, 4, 5, 64), (1, 2, 17, 150), (2, 4, 2, 1)]:
        check(*shape, torch.float32, 1e-5)
    check(2, 4, 5, 70, torch.bfloat16, 1e-5)
    print('all checks passed')
