"""2 iterations + resume + 2 equal 4 uninterrupted iterations bit for bit (toy config, CPU,
head dropout on, validation and checkpoints every 2 iterations)."""
import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from mmseg_segman.checkpoint_safety import load_checkpoint_file

from ..toy_tools import TOY_CONFIG, data_root_options, make_toy_data


@pytest.fixture(scope='module')
def toy_data(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp('toy'))


def train(work_dir, max_iters, data, resume=False):
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


def test_resumed_training_equals_uninterrupted_training(tmp_path, toy_data):
    straight = train(tmp_path / 'straight', 4, toy_data)
    train(tmp_path / 'resumed', 2, toy_data)
    resumed = train(tmp_path / 'resumed', 4, toy_data, resume=True)
    assert set(straight['rng_states']) >= {'torch', 'numpy', 'random'}
    assert straight['state_dict'].keys() == resumed['state_dict'].keys()
    for key, value in straight['state_dict'].items():
        assert torch.equal(value, resumed['state_dict'][key]), key
