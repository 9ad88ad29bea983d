"""The segman configs' loops refuse a dataset without samples before the first iteration,
naming the dataloader, the dataset, where it looked and what to set.

The runs go through mmengine's runner in a subprocess, which leaves this process's default
scope as it was.
"""
import json
from operator import attrgetter, methodcaller
from pathlib import Path

import pytest

from ..toy_tools import REPO, TOY_CONFIG, data_root_options, make_toy_data, run


@pytest.fixture(scope='module')
def toy_data(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp('toy'))


def refusals(toy: str, work_dir: str) -> None:
    """Trains and tests the toy config with empty datasets in four ways; prints the
    ``EmptyDatasetError`` messages as JSON. (The last only builds the train loop: without
    the check, training would hang.)"""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from mmseg_segman.engine import EmptyDatasetError
    empty = Path(work_dir) / 'empty'
    for split in ('train', 'val'):
        (empty / 'img_dir' / split).mkdir(parents=True)
    (empty / 'names.txt').write_text('')
    cases = {
        'train': (methodcaller('train'), {'train_dataloader.dataset.data_root': str(empty)}),
        'val': (methodcaller('train'), {'val_dataloader.dataset.ann_file': str(empty / 'names.txt')}),
        'test': (methodcaller('test'), {'test_dataloader.dataset.data_root': str(empty)}),
        # not serialised, the empty dataset builds: an InfiniteSampler of it would never yield
        'unserialised': (attrgetter('train_loop'), {'train_dataloader.dataset': dict(
            _delete_=True, type='ConcatDataset', datasets=[dict(
                type='BaseSegDataset', data_root=str(empty), serialize_data=False,
                data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train'))])}),
    }
    messages = {}
    for name, (start, options) in cases.items():
        cfg = Config.fromfile(str(TOY_CONFIG))
        cfg.merge_from_dict({**dict(option.split('=') for option in data_root_options(toy)), **options})
        cfg.work_dir, cfg.experiment_name = work_dir, name
        try:
            start(Runner.from_cfg(cfg))
        except EmptyDatasetError as error:
            messages[name] = str(error)
    print(json.dumps(messages))


def test_empty_datasets_are_refused_by_name(tmp_path, toy_data):
    code, out = run('-c', 'import sys; from tests.engine.test_loops import *; refusals(*sys.argv[1:])',
                    toy_data, tmp_path, cwd=REPO, timeout=300)
    assert code == 0, out[-3000:]
    messages = json.loads(out.splitlines()[-1])
    empty, hint = tmp_path / 'empty', 'dataset at the data: its data_root, data_prefix, img_suffix'
    assert messages['train'] == (
        f"train_dataloader: the BaseSegDataset (images ending in '.png' under {empty}/img_dir/train, "
        f"annotations ending in '.png' in {empty}/ann_dir/train) found no samples. Point "
        'train_dataloader.dataset at the data: its data_root, data_prefix, img_suffix, '
        'seg_map_suffix, ann_file.')
    assert messages['val'].startswith(
        f"val_dataloader: the BaseSegDataset (images ending in '.png' listed in {empty}/names.txt "
        f'under {toy_data}/img_dir/val') and hint in messages['val']
    assert messages['test'].startswith(f"test_dataloader: the BaseSegDataset (images ending in '.png' "
                                       f'under {empty}/img_dir/val') and hint in messages['test']
    assert messages['unserialised'].startswith('train_dataloader: the ConcatDataset found no samples')
    assert 'Iter(train)' not in out  # refused before the first iteration
