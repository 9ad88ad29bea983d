"""The toy config trained under DDP in two CPU processes over gloo, through mmengine's Runner
(tests/ddp_worker.py is one rank): gradients synchronised, one checkpoint, resume."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from .toy_tools import REPO, TOY_CONFIG, make_toy_data

WORKER = REPO / 'tests' / 'ddp_worker.py'
WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def train_on_ranks(tmp_path: Path, data_root: Path, max_iters: int, mode: str,
                   timeout: float = 120) -> List[Dict]:
    """Runs the worker on every rank; a rank that fails, or ranks that outlive ``timeout``,
    fail the test with each rank's output (the others are killed). Returns each rank's record."""
    port, procs, logs = free_port(), [], []
    for rank in range(WORLD_SIZE):
        env = {**os.environ, 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'RANK': str(rank),
               'WORLD_SIZE': str(WORLD_SIZE), 'LOCAL_RANK': str(rank), 'OMP_NUM_THREADS': '1',
               'PYTHONWARNINGS': 'ignore'}
        logs.append(tmp_path / f'{mode}_rank{rank}.log')
        with logs[-1].open('w') as log:
            procs.append(subprocess.Popen(
                [sys.executable, WORKER, TOY_CONFIG, data_root, tmp_path / 'work', str(max_iters), mode,
                 tmp_path / f'{mode}_rank{rank}.pt'], stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and not any(p.returncode for p in procs):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        pytest.fail(f'{mode} training on {WORLD_SIZE} ranks failed or ran past {timeout} s:\n' + '\n'.join(
            f'--- rank {rank}, exit code {p.returncode}:\n{log.read_text()[-4000:]}'
            for rank, (p, log) in enumerate(zip(procs, logs))), pytrace=False)
    return [torch.load(tmp_path / f'{mode}_rank{rank}.pt', weights_only=True) for rank in range(WORLD_SIZE)]


def differing(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], names: List[str]) -> List[str]:
    return [name for name in names if not torch.equal(a[name], b[name])]


def check_synchronised_run(records: List[Dict], first_iter: int, last_iter: int) -> None:
    """Ranks trained ``first_iter``..``last_iter`` on different images, ended with the same
    parameters, moved from where they started; only rank 0 saved, at the last iteration."""
    rank0, rank1 = records
    params = rank0['params']
    for record in records:
        assert (record['iter_start'], record['iter_end']) == (first_iter, last_iter)
        assert len(record['images']) == last_iter - first_iter
        assert differing(record['start'], record['end'], params), 'training did not change the weights'
    assert all(set(a).isdisjoint(b) for a, b in zip(rank0['images'], rank1['images'])), \
        'the ranks trained on the same images: DistributedSampler not in use'
    assert differing(rank0['start'], rank1['start'], params) == []
    assert differing(rank0['end'], rank1['end'], params) == [], 'gradients were not synchronised'
    assert (rank0['saved'], rank1['saved']) == ([last_iter], [])


def test_ddp_trains_synchronised_saves_once_and_resumes(tmp_path):
    data_root = make_toy_data(tmp_path / 'toy')
    first = train_on_ranks(tmp_path, data_root, max_iters=2, mode='fresh')
    check_synchronised_run(first, 0, 2)
    assert sorted(p.name for p in (tmp_path / 'work').glob('*.pth')) == ['iter_2.pth']

    resumed = train_on_ranks(tmp_path, data_root, max_iters=4, mode='resume')
    check_synchronised_run(resumed, 2, 4)
    saved = first[0]['end']  # rank 0's model at iteration 2, BN statistics included
    for record in resumed:
        assert differing(record['start'], saved, list(saved)) == [], 'resume did not load iter_2.pth'
    assert sorted(p.name for p in (tmp_path / 'work').glob('*.pth')) == ['iter_2.pth', 'iter_4.pth']
