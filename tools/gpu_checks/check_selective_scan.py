"""GPU check of the selective-scan backends against the PyTorch reference (float64 on CUDA).

    python tools/gpu_checks/check_selective_scan.py

For each backend other than ``torch`` that can run here: outputs and all gradients in
float32 and bfloat16 at odd and model sizes (PASS/FAIL), then forward+backward time against
the ``torch`` backend.
"""
import torch

from mmseg_segman.ops.selective_scan import _selective_scan

# (batch, groups, channels per group, length): odd sizes, encoder stage 1 of B at 512x512
# (L = 128*128), the decoder's MMSCopE of B (3*180 channels on 16x16)
SHAPES = [(1, 4, 3, 7), (2, 4, 33, 1000), (8, 4, 96, 128 * 128), (16, 4, 540, 256)]


def make_inputs(batch, groups, channels, length, dtype):
    g = torch.Generator(device='cuda').manual_seed(0)
    gd = groups * channels
    def rand(*shape):
        return torch.randn(*shape, generator=g, device='cuda')
    return [rand(batch, gd, length).to(dtype), rand(batch, gd, length).to(dtype),
            -torch.rand(gd, 1, generator=g, device='cuda') * 2, rand(batch, groups, 1, length).to(dtype),
            rand(batch, groups, 1, length).to(dtype), rand(gd), rand(gd)]


def run(backend, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = _selective_scan.backends[backend].fn(*leaves)
    out.backward(dy)
    return [out.detach()] + [t.grad for t in leaves]


def timed(backend, inputs, dy, iters=10):
    run(backend, inputs, dy)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        run(backend, inputs, dy)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    names = ['y', 'du', 'ddelta', 'dA', 'dB', 'dC', 'dD', 'ddelta_bias']
    failures = 0
    for backend in [b for b in _selective_scan.backends if b != 'torch']:
        for shape in SHAPES:
            if not _selective_scan.backends[backend].available(*make_inputs(*shape, torch.float32)):
                print(f'{backend}: not available here')
                break
            for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
                inputs = make_inputs(*shape, dtype)
                dy = torch.randn_like(inputs[0], dtype=torch.float32)
                want = run('torch', [t.double() for t in inputs], dy.double())
                got = run(backend, inputs, dy)
                errs = {n: ((a.double() - b).abs().max() / (b.abs().max() + 1e-12)).item()
                        for n, a, b in zip(names, got, want)}
                ok = max(errs.values()) <= tol
                failures += not ok
                worst = max(errs, key=errs.get)
                print(f'{"PASS" if ok else "FAIL"} {backend} {shape} {dtype}: worst rel err '
                      f'{errs[worst]:.1e} ({worst})')
            ms = {b: timed(b, make_inputs(*shape, torch.bfloat16), torch.randn(
                shape[0], shape[1] * shape[2], shape[3], device='cuda')) for b in (backend, 'torch')}
            print(f'time fwd+bwd {shape} bf16: {backend} {ms[backend]:.2f} ms, torch {ms["torch"]:.2f} ms '
                  f'({ms["torch"] / ms[backend]:.1f}x)')
    print(f'{failures} failures')


if __name__ == '__main__':
    main()
