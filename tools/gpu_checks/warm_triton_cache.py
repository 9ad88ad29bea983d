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
(``TRITON_CACHE_DIR``). Each job's seconds and exit code are printed; a job still running
``--seconds`` after this process started (its imports included) is stopped, and a job dies with
this process (killed by a ``timeout``, say) rather than compiling on beside what runs next.
"""
import time

STARTED = time.monotonic()  # before the imports, which take seconds

import argparse  # noqa: E402
import ctypes  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from itertools import product  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark import DTYPES, MODELS, build_model, data_samples, training_optimizer, training_phases  # noqa: E402,E501

INFERENCE_SIZES = [(16, 512, 512)] + [(1, 512, width) for width in (512, 640, 768, 896)]


def die_with_parent() -> None:
    """Have Linux kill this process when its parent exits (``PR_SET_PDEATHSIG``); elsewhere
    nothing."""
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


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
        die_with_parent()
        name, mode, dtype = args.job.split(':')
        run_job(name, mode, DTYPES[dtype])
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f'stopped by SIGTERM after '
                                                      f'{time.monotonic() - STARTED:.0f} s'))
    deadline = STARTED + args.seconds
    waiting = [':'.join(job) for job in product(args.models, args.modes, args.dtypes)]
    running = {}
    while waiting or running:
        while waiting and len(running) < args.jobs and time.monotonic() < deadline:
            job = waiting.pop(0)
            log = tempfile.TemporaryFile('w+')
            running[job] = (subprocess.Popen([sys.executable, __file__, '--job', job],
                                             stdout=subprocess.DEVNULL, stderr=log),
                            log, time.monotonic())
        for job, (process, log, started) in list(running.items()):
            if process.poll() is None and time.monotonic() < deadline:
                continue
            if process.poll() is None:
                process.kill()
                process.wait()
            log.seek(0)
            error = log.read().strip().splitlines()
            print(f'{job}: rc {process.returncode}, {time.monotonic() - started:.0f} s'
                  + (f' ({error[-1]})' if process.returncode and error else ''), flush=True)
            del running[job]
        if waiting and time.monotonic() >= deadline:
            print(f'not started ({args.seconds:.0f} s over): {" ".join(waiting)}', flush=True)
            waiting = []
        time.sleep(0.5)


if __name__ == '__main__':
    main()
