"""``import mmseg_segman`` lets weights-only loading read mmengine checkpoints, nothing more."""
import os
import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub

import mmseg_segman  # noqa: F401  (installs the allow-list)
from mmseg_segman.checkpoint_safety import allow_mmengine_checkpoints


def save_raw(obj_pickler, path):
    """A torch.save-style zip whose data.pkl is written by our own pickler."""
    torch.save({'x': torch.zeros(1)}, path)  # for the zip layout; replaced below
    import zipfile
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        files = {n: z.read(n) for n in names}
    pkl = next(n for n in names if n.endswith('data.pkl'))
    files[pkl] = obj_pickler()
    with zipfile.ZipFile(path, 'w') as z:
        for n, data in files.items():
            z.writestr(n, data)


def test_mmengine_checkpoint_loads_weights_only(tmp_path):
    hub = MessageHub.get_instance('checkpoint-safety-test')
    hub.update_scalar('train/loss', 0.5)
    hub.update_scalar('train/loss', np.float64(0.25))
    hub.update_info('iter', 10)
    ckpt = {'meta': {'seed': np.int64(3), 'message_hub': hub.state_dict(), 'arr': np.arange(3.0)},
            'state_dict': {'w': torch.ones(2)}}
    torch.save(ckpt, tmp_path / 'ckpt.pth')
    admitted = torch.serialization.get_safe_globals()
    allow_mmengine_checkpoints()  # idempotent
    assert len(torch.serialization.get_safe_globals()) == len(admitted)
    loaded = torch.load(tmp_path / 'ckpt.pth')  # weights_only=True by default
    buffer = loaded['meta']['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer) and buffer.mean() == 0.375
    assert loaded['meta']['seed'] == 3 and loaded['meta']['arr'].tolist() == [0.0, 1.0, 2.0]


class Evil:
    def __reduce__(self):
        return os.system, ('echo pwned',)


class Arbitrary:
    pass


def test_os_system_is_refused(tmp_path):
    torch.save({'x': Evil()}, tmp_path / 'evil.pth')
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / 'evil.pth')


def test_arbitrary_class_is_refused(tmp_path):
    torch.save({'x': Arbitrary()}, tmp_path / 'arbitrary.pth')
    with pytest.raises(pickle.UnpicklingError, match='Arbitrary'):
        torch.load(tmp_path / 'arbitrary.pth')


@pytest.mark.parametrize('target,name', [
    ('mmengine.logging.history_buffer HistoryBuffer', '__init__'),
    ('mmengine.logging.history_buffer HistoryBuffer', 'register_statistics'),
    ('numpy ndarray', 'tofile'),
    ('argparse Namespace', '__class__'),
])
def test_getattr_beyond_history_buffer_statistics_is_refused(tmp_path, target, name):
    module, qualname = target.split()

    def dump():
        # protocol 2: GLOBAL builtins getattr, GLOBAL target, name, TUPLE2, REDUCE, STOP
        return (b'\x80\x02cbuiltins\ngetattr\nc' + f'{module}\n{qualname}\n'.encode()
                + b'X' + len(name).to_bytes(4, 'little') + name.encode() + b'\x86R.')
    save_raw(dump, tmp_path / 'getattr.pth')
    with pytest.raises(pickle.UnpicklingError, match='only the statistics methods'):
        torch.load(tmp_path / 'getattr.pth')


def test_getattr_of_a_dict_method_is_refused(tmp_path):
    def dump():  # getattr({}, 'update'): GLOBAL builtins getattr, EMPTY_DICT, name, TUPLE2, REDUCE
        return b'\x80\x02cbuiltins\ngetattr\n}X\x06\x00\x00\x00update\x86R.'
    save_raw(dump, tmp_path / 'dict_getattr.pth')
    with pytest.raises(pickle.UnpicklingError, match='only the statistics methods'):
        torch.load(tmp_path / 'dict_getattr.pth')


def test_history_buffer_statistics_method_is_allowed(tmp_path):
    def dump():
        return (b'\x80\x02cbuiltins\ngetattr\ncmmengine.logging.history_buffer\nHistoryBuffer\n'
                b'X\x04\x00\x00\x00mean\x86R.')
    save_raw(dump, tmp_path / 'mean.pth')
    assert torch.load(tmp_path / 'mean.pth') is HistoryBuffer.mean


def test_runner_checkpoint_round_trip(tmp_path):
    """What a real mmengine Runner writes loads back through CheckpointLoader and resume."""
    from mmengine.model import BaseModel
    from mmengine.runner import CheckpointLoader, Runner

    class Tiny(BaseModel):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 1)

        def forward(self, inputs, mode='loss'):
            return {'loss': self.linear(inputs).pow(2).mean()}

    def runner(max_iters):
        return Runner(
            model=Tiny(), work_dir=str(tmp_path), experiment_name=f'safety-{max_iters}',
            train_dataloader=dict(dataset=[dict(inputs=torch.ones(2))] * 4, batch_size=2,
                                  collate_fn=dict(type='default_collate'),
                                  sampler=dict(type='DefaultSampler', shuffle=False)),
            optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
            param_scheduler=dict(type='LinearLR', by_epoch=False, begin=0, end=4),
            train_cfg=dict(by_epoch=False, max_iters=max_iters), default_scope='mmengine',
            default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)))

    runner(2).train()
    path = str(tmp_path / 'iter_2.pth')
    ckpt = CheckpointLoader.load_checkpoint(path, map_location='cpu')  # weights_only default
    assert isinstance(ckpt['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
    resumed = runner(4)
    resumed.resume(path)
    assert resumed.iter == 2
