"""Compile the Triton kernels of SegMAN models into Triton's on-disk cache, several processes
at once, before a GPU call measures anything.

    python3 tools/gpu_checks/warm_triton_cache.py --models segman-t segman-l [--modes infer train]
        [--dtypes bf16] [--jobs 8] [--seconds 240]

A cold machine compiles each kernel at its first call, one after another, in the process that
meets it; the twenty-first session's three calls spent most of their 30 minutes so, and timed
out (docs/benchmarks.md). Here one process a (model, mode, dtype) runs the model as
``tools/benchmark.py`` and the checks run it: inference at batch 16 of 512x512 and at batch 1
of 512 x (512, 640, 768, 896) (the depthwise kernel's tiles follow the width), or one eager
training step at batch 8 of 512x512 (the CUDA graphs replay the same kernels). ``--jobs``
processes run at once; what one compiles the others and every later process find in the cache
(``TRITON_CACHE_DIR``). Each job's seconds and exit code are printed; a job still running after
``--seconds`` is stopped.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from itertools import product
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark import DTYPES, MODELS, build_model, data_samples, training_optimizer, training_phases  # noqa: E402,E501

INFERENCE_SIZES = [(16, 512, 512)] + [(1, 512, width) for width in (512, 640, 768, 896)]


def run_job(name: str, mode: str, dtype: torch.dtype) -> None:
    """One model's steps of ``mode``, as the checks run them."""
    model = build_model(name)
    if mode == 'infer':
        model.eval()
        for batch, height, width in INFERENCE_SIZES:
            images = torch.randn(batch, 3, height, width, device='cuda')
            with torch.inference_mode(), torch.autocast('cuda', dtype=dtype,
                                                        enabled=dtype != torch.float32):
                model(images, mode='tensor')
    else:
        model.train()
        images = torch.randn(8, 3, 512, 512, device='cuda')
        for _ in training_phases(model, images, data_samples(8, 512, 512),
                                 training_optimizer(model), dtype):
            pass
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', choices=[m for m in MODELS if m.startswith('segman')],
                        default=['segman-t', 'segman-s', 'segman-b', 'segman-l'])
    parser.add_argument('--modes', nargs='+', choices=['infer', 'train'], default=['infer', 'train'])
    parser.add_argument('--dtypes', nargs='+', choices=sorted(DTYPES), default=['bf16'])
    parser.add_argument('--jobs', type=int, default=8, help='processes at once')
    parser.add_argument('--seconds', type=float, default=240, help='stop the jobs after this')
    parser.add_argument('--job', help=argparse.SUPPRESS)  # MODEL:MODE:DTYPE, run in this process
    args = parser.parse_args()
    if args.job:
        name, mode, dtype = args.job.split(':')
        run_job(name, mode, DTYPES[dtype])
        return
    deadline = time.perf_counter() + args.seconds
    waiting = [':'.join(job) for job in product(args.models, args.modes, args.dtypes)]
    running = {}
    while waiting or running:
        while waiting and len(running) < args.jobs and time.perf_counter() < deadline:
            job = waiting.pop(0)
            log = tempfile.TemporaryFile('w+')
            running[job] = (subprocess.Popen([sys.executable, __file__, '--job', job],
                                             stdout=subprocess.DEVNULL, stderr=log),
                            log, time.perf_counter())
        for job, (process, log, started) in list(running.items()):
            if process.poll() is None and time.perf_counter() < deadline:
                continue
            if process.poll() is None:
                process.kill()
                process.wait()
            log.seek(0)
            error = log.read().strip().splitlines()
            print(f'{job}: rc {process.returncode}, {time.perf_counter() - started:.0f} s'
                  + (f' ({error[-1]})' if process.returncode and error else ''), flush=True)
            del running[job]
        if waiting and time.perf_counter() >= deadline:
            print(f'not started ({args.seconds:.0f} s over): {" ".join(waiting)}', flush=True)
            waiting = []
        time.sleep(0.5)


if __name__ == '__main__':
    main()
