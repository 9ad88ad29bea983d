"""2 iterations + resume + 2 equal 4 uninterrupted iterations bit for bit (toy config, CPU,
head dropout on, validation and checkpoints every 2 iterations).

The runs go through mmengine's runner in a subprocess, which leaves this process's default
scope and registries as they were for the other tests.
"""
import json
from pathlib import Path

import pytest

from ..toy_tools import REPO, TOY_CONFIG, data_root_options, make_toy_data, run


@pytest.fixture(scope='module')
def toy_data(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp('toy'))


def train(work_dir: Path, max_iters: int, data: Path, resume: bool = False) -> dict:
    """``tools/train.py`` as mmseg runs it, with the short schedule; the last checkpoint."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from mmseg_segman.checkpoint_safety import load_checkpoint_file
    cfg = Config.fromfile(str(TOY_CONFIG))
    cfg.merge_from_dict({'train_dataloader.batch_size': 2, 'train_cfg.max_iters': max_iters,
                         'train_cfg.val_interval': 2, 'default_hooks.checkpoint.interval': 2,
                         'default_hooks.logger.interval': 1, 'model.data_preprocessor.size': (64, 64),
                         **dict(option.split('=') for option in data_root_options(data))})
    cfg.work_dir, cfg.resume = str(work_dir), resume
    cfg.experiment_name = f'{work_dir.name}-{max_iters}'
    assert cfg.model.decode_head.dropout_ratio > 0
    Runner.from_cfg(cfg).train()
    return load_checkpoint_file(work_dir / f'iter_{max_iters}.pth')


def compare_straight_and_resumed(root: str, data: str) -> None:
    """Prints the saved random states' names and the tensors that differ, as JSON.

    One CPU thread: with several, PyTorch's CPU kernels are not bit-reproducible by
    themselves (two uninterrupted runs of this schedule differed in 2 to 359 tensors on 2
    threads, in one thread they are identical)."""
    import torch
    torch.set_num_threads(1)
    root, data = Path(root), Path(data)
    straight = train(root / 'straight', 4, data)
    train(root / 'resumed', 2, data)
    resumed = train(root / 'resumed', 4, data, resume=True)
    differ = [k for k, v in straight['state_dict'].items()
              if not torch.equal(v, resumed['state_dict'].get(k, torch.empty(0)))]
    print(json.dumps(dict(rng_states=sorted(straight['rng_states']), differ=differ)))


def test_resumed_training_equals_uninterrupted_training(tmp_path, toy_data):
    code, out = run('-c', 'import sys; from tests.engine.test_rng_state_hook import *; '
                    'compare_straight_and_resumed(*sys.argv[1:])', tmp_path, toy_data, cwd=REPO)
    assert code == 0, out[-3000:]
    result = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith('{"rng')))
    assert set(result['rng_states']) >= {'torch', 'numpy', 'random'}
    assert result['differ'] == []


def test_random_states_restore_from_tensors_moved_to_another_device():
    """mmengine's resume maps a checkpoint's tensors onto the GPU, and torch takes a random
    state only as a CPU byte tensor: every resume on a GPU failed at its first batch ('RNG
    state must be a torch.ByteTensor', eighteenth session). The states are converted back; an
    int16 copy stands for the GPU copy on this CPU-only machine (torch refuses both alike)."""
    import torch

    from mmseg_segman.engine.rng_state_hook import get_rng_states, set_rng_states
    states = get_rng_states()
    expected = torch.rand(3)
    with pytest.raises(TypeError, match='ByteTensor'):
        torch.set_rng_state(states['torch'].to(torch.int16))
    set_rng_states({**states, 'torch': states['torch'].to(torch.int16)})
    assert torch.equal(torch.rand(3), expected)
