"""Loading a checkpoint builds data only, only while a checkpoint is read, and strips the
config text mmengine would execute; damaged and crafted files get a named error."""
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner import CheckpointLoader

import mmseg_segman  # noqa: F401  (guards mmengine's checkpoint loading)
from mmseg_segman.checkpoint_safety import CheckpointError, load_checkpoint_file

NUMPY_VALUES = {
    'float': np.arange(6.0).reshape(2, 3), 'fortran': np.asfortranarray(np.arange(6).reshape(2, 3)),
    'big_endian': np.arange(3, dtype='>i4'), 'bool': np.array([True, False]),
    'complex': np.array([1 + 2j], dtype=np.complex64), 'uint32': np.arange(4, dtype=np.uint32),
    'zero_d': np.array(2.5), 'empty': np.zeros((0, 3)), 'seed': np.int64(3),
    'score': np.float64(43.25), 'flag': np.bool_(True),
}


def save_raw(path: Path, data_pkl: bytes) -> Path:
    """A torch.save zip whose data.pkl is ``data_pkl`` (a pickle the test writes itself)."""
    torch.save({'x': torch.zeros(1)}, path)  # for the zip layout; data.pkl replaced below
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    files[next(n for n in files if n.endswith('data.pkl'))] = data_pkl
    with zipfile.ZipFile(path, 'w') as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_mmengine_values_load_and_only_while_loading(tmp_path):
    hub = MessageHub.get_instance('checkpoint-safety-test')
    hub.update_scalar('train/loss', 0.5)
    hub.update_scalar('train/loss', np.float64(0.25))
    ckpt = {'meta': {'numpy': NUMPY_VALUES, 'rng': np.random.get_state()},
            'message_hub': hub.state_dict(), 'state_dict': {'w': torch.ones(2)}}
    torch.save(ckpt, tmp_path / 'ckpt.pth')
    admitted = set(torch.serialization.get_safe_globals())
    for loaded in (load_checkpoint_file(tmp_path / 'ckpt.pth'),
                   CheckpointLoader.load_checkpoint(str(tmp_path / 'ckpt.pth'), map_location='cpu')):
        buffer = loaded['message_hub']['log_scalars']['train/loss']
        assert isinstance(buffer, HistoryBuffer) and buffer.mean() == 0.375
        for name, value in NUMPY_VALUES.items():
            got = loaded['meta']['numpy'][name]
            assert type(got) is type(value) and got.dtype == value.dtype, name
            assert np.array_equal(got, value) and np.shape(got) == np.shape(value), name
        assert loaded['meta']['numpy']['fortran'].flags.f_contiguous
        np.random.set_state(loaded['meta']['rng'])  # numpy takes its own state back
    assert set(torch.serialization.get_safe_globals()) == admitted  # nothing admitted process-wide
    with pytest.raises(pickle.UnpicklingError, match='was not an allowed global'):
        torch.load(tmp_path / 'ckpt.pth')  # a plain torch.load is as strict as torch makes it


def test_users_own_safe_globals_win_and_stay(tmp_path):
    """A user's ``builtins.getattr`` entry is the one used inside our scope, and stays after."""
    def users_getattr(obj, name):
        return f'user getattr {name}'

    save_raw(tmp_path / 'getattr.pth', b'\x80\x02cbuiltins\ngetattr\nc'
             b'mmengine.logging.history_buffer\nHistoryBuffer\nX\x04\x00\x00\x00mean\x86R.')
    assert load_checkpoint_file(tmp_path / 'getattr.pth') is HistoryBuffer.mean
    entry = (users_getattr, 'builtins.getattr')
    torch.serialization.add_safe_globals([entry, HistoryBuffer])
    try:
        assert load_checkpoint_file(tmp_path / 'getattr.pth') == 'user getattr mean'
        assert {entry, HistoryBuffer} <= set(torch.serialization.get_safe_globals())
    finally:
        torch.serialization.clear_safe_globals()


class Evil:
    def __reduce__(self):
        return os.system, ('echo pwned',)


class Arbitrary:
    pass


@pytest.mark.parametrize('payload,match', [(Evil(), 'system'), (Arbitrary(), 'Arbitrary')])
def test_code_and_foreign_classes_are_refused(tmp_path, payload, match):
    torch.save({'x': payload}, tmp_path / 'bad.pth')
    with pytest.raises(pickle.UnpicklingError, match=match):
        load_checkpoint_file(tmp_path / 'bad.pth')


@pytest.mark.parametrize('target,name', [
    ('mmengine.logging.history_buffer HistoryBuffer', '__init__'),
    ('mmengine.logging.history_buffer HistoryBuffer', 'register_statistics'),
    ('numpy ndarray', 'tofile'),
    ('collections OrderedDict', '__class__'),
])
def test_getattr_beyond_history_buffer_statistics_is_refused(tmp_path, target, name):
    module, qualname = target.split()
    # protocol 2: GLOBAL builtins getattr, GLOBAL target, name, TUPLE2, REDUCE, STOP
    save_raw(tmp_path / 'getattr.pth', b'\x80\x02cbuiltins\ngetattr\nc' + f'{module}\n{qualname}\n'.encode()
             + b'X' + len(name).to_bytes(4, 'little') + name.encode() + b'\x86R.')
    with pytest.raises(pickle.UnpicklingError, match='only the statistics methods'):
        load_checkpoint_file(tmp_path / 'getattr.pth')


class Reduced:
    """Pickles as ``func(*args)`` followed by BUILD with ``state``: crafted numpy pickles."""

    def __init__(self, func, args, state=None):
        self.reduced = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.reduced


def crafted_numpy_files(root: Path) -> dict:
    """Files that would build object arrays (or worse) through numpy's pickle helpers."""
    from numpy._core.multiarray import _reconstruct, scalar
    object_fields = (3, '|', None, ('a',), {'a': (np.dtype('O'), 0)}, 8, 1, 0)  # fields, no flags
    object_flags = (3, '|', None, None, None, 8, 8, 63)  # a float64 that claims to hold objects
    raw_pointers = b'\x41' * 16
    files = {
        'object_array': np.array([1, 'x'], dtype=object),
        'object_dtype_raw_bytes': Reduced(_reconstruct, (np.ndarray, (0,), b'b'),
                                          (1, (2,), np.dtype('O'), False, raw_pointers)),
        'dtype_state_with_object_fields': Reduced(_reconstruct, (np.ndarray, (0,), b'b'), (
            1, (2,), Reduced(np.dtype, ('f8', False, True), object_fields), False, raw_pointers)),
        'crafted_dtype_state': Reduced(_reconstruct, (np.ndarray, (0,), b'b'), (
            1, (2,), Reduced(np.dtype, ('f8', False, True), object_flags), False, raw_pointers)),
        'object_scalar': Reduced(scalar, (np.dtype('O'), 'x')),
        'structured_dtype': np.zeros(2, dtype='i4,f8'),
        'short_data': Reduced(_reconstruct, (np.ndarray, (0,), b'b'),
                              (1, (1000,), np.dtype('f8'), False, b'\x00' * 8)),
        'matrix': np.asmatrix(np.eye(2)),
    }
    paths = {}
    for name, value in files.items():
        torch.save({'meta': {'seed': value}, 'state_dict': {}}, root / f'{name}.pth')
        paths[name] = str(root / f'{name}.pth')
    paths['ndarray_newobj'] = str(save_raw(root / 'newobj.pth', b'\x80\x02cnumpy\nndarray\nK\x02\x85\x81.'))
    return paths


LOAD_IN_SUBPROCESS = '''
import json, sys
from mmengine.runner import CheckpointLoader
from mmseg_segman.checkpoint_safety import load_checkpoint_file
loaders = {'plugin': load_checkpoint_file,
           'mmengine': lambda p: CheckpointLoader.load_checkpoint(p, map_location='cpu')}
results = {}
for name, path in json.loads(sys.argv[1]).items():
    for loader, load in loaders.items():
        try:
            load(path)
            results[f'{name} {loader}'] = 'loaded'
        except Exception as error:
            results[f'{name} {loader}'] = f'{type(error).__name__}: {error}'
print(json.dumps(results))
'''


def test_crafted_numpy_pickles_are_refused_without_crashing(tmp_path):
    """In a subprocess: a segmentation fault fails this test instead of ending pytest."""
    paths = crafted_numpy_files(tmp_path)
    result = subprocess.run([sys.executable, '-c', LOAD_IN_SUBPROCESS, json.dumps(paths)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.splitlines()[-1])
    assert len(outcomes) == 2 * len(paths)
    for case, outcome in outcomes.items():
        assert outcome.startswith('UnpicklingError'), (case, outcome)
    assert 'only numeric dtypes' in outcomes['object_array plugin']
    assert 'plain state of a numeric dtype' in outcomes['crafted_dtype_state mmengine']
    assert 'as the data of 1000 numpy float64 values' in outcomes['short_data plugin']
    assert 'builds a numpy.ndarray directly' in outcomes['ndarray_newobj mmengine']


def flip_tensor_bytes(path: Path) -> None:
    """Change 16 bytes inside the first tensor's data, as a disk or a transfer might."""
    with zipfile.ZipFile(path) as z:
        offset = next(i for i in z.infolist() if '/data/' in i.filename).header_offset
    data = bytearray(path.read_bytes())
    name_length, extra_length = (int.from_bytes(data[offset + i:offset + i + 2], 'little') for i in (26, 28))
    start = offset + 30 + name_length + extra_length  # after the local file header
    data[start:start + 16] = bytes(255 - b for b in data[start:start + 16])
    path.write_bytes(bytes(data))


def test_damaged_and_truncated_files_are_named(tmp_path):
    torch.save({'state_dict': {'w': torch.ones(64)}}, tmp_path / 'damaged.pth')
    flip_tensor_bytes(tmp_path / 'damaged.pth')
    with pytest.raises(CheckpointError, match=r'damaged: the CRC-32 checksum of .*/data/0'):
        CheckpointLoader.load_checkpoint(str(tmp_path / 'damaged.pth'))
    torch.save({'state_dict': {'w': torch.ones(64)}}, tmp_path / 'cut.pth')
    data = (tmp_path / 'cut.pth').read_bytes()
    (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='damaged checkpoint archive'):
        load_checkpoint_file(tmp_path / 'cut.pth')


def tiny_runner(work_dir, max_iters):
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class TinyModel(BaseModel):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 1)

        def forward(self, inputs, mode='loss'):
            return {'loss': self.linear(inputs).pow(2).mean()}

    return Runner(
        model=TinyModel(), work_dir=str(work_dir), experiment_name=f'safety-{max_iters}-{os.getpid()}',
        train_dataloader=dict(dataset=[dict(inputs=torch.ones(2))] * 4, batch_size=2,
                              collate_fn=dict(type='default_collate'),
                              sampler=dict(type='DefaultSampler', shuffle=False)),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        param_scheduler=dict(type='LinearLR', by_epoch=False, begin=0, end=4),
        train_cfg=dict(by_epoch=False, max_iters=max_iters), default_scope='mmengine',
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)))


def test_resume_and_inferencer_do_not_execute_the_checkpoint_config(tmp_path):
    tiny_runner(tmp_path, 2).train()
    path = tmp_path / 'iter_2.pth'
    ckpt = torch.load(path, weights_only=False)  # the test's own file
    assert 'cfg' in ckpt['meta'] and 'cfg' in ckpt['message_hub']['runtime_info']
    marker = tmp_path / 'executed'
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nmodel = dict(type='X')\n"
    ckpt['meta']['config'] = ckpt['meta']['cfg'] = payload
    ckpt['message_hub']['runtime_info']['cfg'] = payload
    torch.save(ckpt, path)

    resumed = tiny_runner(tmp_path, 4)
    resumed.resume(str(path))
    assert resumed.iter == 2 and not marker.exists()

    from mmseg.apis import MMSegInferencer
    with pytest.raises(ValueError, match='Cannot find the config in the checkpoint'):
        MMSegInferencer(model=None, weights=str(path), device='cpu')
    assert not marker.exists()
