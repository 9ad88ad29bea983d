"""The configs travel inside the package: ``mmseg_segman::`` inheritance, a non-editable
install, and OpenMMLab's ``mim``."""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from mmengine.config import Config

import mmseg_segman

from .toy_tools import REPO, TOOLS, TOY_CONFIG, data_root_options, make_toy_data, run

SEGMAN_CONFIGS = sorted(f'segman-{size}_{dataset}.py' for size in 'tsbl' for dataset in (
    '4xb4-160k_ade20k-512x512', '4xb2-160k_cityscapes-1024x1024', '4xb4-160k_coco-stuff164k-512x512'))
MIM = [sys.executable, '-m', 'mim']


@pytest.fixture(scope='module')
def toy_data(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp('toy'))


def downstream_config(path: Path, data_root: Path) -> Path:
    """A user's config elsewhere: SegMAN-T of ADE20K by package scope, on the toy data."""
    path.write_text(textwrap.dedent(f"""
        _base_ = ['mmseg_segman::segman/segman-t_4xb4-160k_ade20k-512x512.py']
        pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                    dict(type='PackSegInputs')]
        dataset = dict(_delete_=True, type='BaseSegDataset', data_root='{data_root}',
                       img_suffix='.png', seg_map_suffix='.png', pipeline=pipeline,
                       metainfo=dict(classes=('background', 'disc', 'square', 'triangle', 'bar')))
        train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                                dataset=dict(**dataset, data_prefix=dict(
                                    img_path='img_dir/train', seg_map_path='ann_dir/train')))
        val_dataloader = dict(num_workers=0, persistent_workers=False,
                              dataset=dict(**dataset, data_prefix=dict(
                                  img_path='img_dir/val', seg_map_path='ann_dir/val')))
        test_dataloader = val_dataloader
        model = dict(data_preprocessor=dict(size=(64, 64)),
                     backbone=dict(init_cfg=None), decode_head=dict(num_classes=5))
        train_cfg = dict(max_iters=3, val_interval=3)
        default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=3))
        """))
    return path


def test_package_scope_resolves_to_the_package(tmp_path):
    cfg = Config.fromfile(downstream_config(tmp_path / 'mine.py', tmp_path))
    assert cfg.model.backbone.type == 'SegMANEncoder' and cfg.model.decode_head.num_classes == 5
    assert cfg.optim_wrapper.optimizer.lr == 6e-5  # the rest is SegMAN's recipe
    path, scope = Config._get_cfg_path('mmseg_segman::segman/segman-t_4xb4-160k_ade20k-512x512.py', '')
    mim_configs = Path(mmseg_segman.__file__).parent / '.mim' / 'configs'
    assert scope == 'mmseg_segman' and Path(path) == mim_configs / 'segman' / 'segman-t_4xb4-160k_ade20k-512x512.py'


def test_downstream_config_trains_through_mmseg_tools(tmp_path, toy_data):
    config = downstream_config(tmp_path / 'mine.py', toy_data)
    code, out = run(TOOLS / 'train.py', config, '--work-dir', tmp_path / 'work', cwd=tmp_path)
    assert code == 0, out[-3000:]
    assert 'Iter(train) [3/3]' in out and re.search(r'mIoU: \d', out), out[-3000:]
    assert (tmp_path / 'work' / 'iter_3.pth').is_file()
    assert 'Failed to' not in out and 'is not installed' not in out  # the scope's registries


def test_non_editable_install_carries_the_configs(tmp_path):
    src = tmp_path / 'src'  # a clean copy of the sources: the build writes next to them
    src.mkdir()
    for name in ('setup.py', 'model-index.yml', 'mmseg_segman_scope.py', 'mmseg_segman_scope.pth'):
        shutil.copy(REPO / name, src / name)
    skip = shutil.ignore_patterns('.mim', '__pycache__', '*.egg-info')
    for name in ('configs', 'mmseg_segman'):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--disable-pip-version-check',
                    '--no-deps', '--no-build-isolation', '--target', str(target), str(src)],
                   check=True, capture_output=True)
    mim = target / 'mmseg_segman' / '.mim'
    for name in SEGMAN_CONFIGS + ['metafile.yaml']:
        assert (mim / 'configs' / 'segman' / name).is_file() and not (mim / 'configs' / 'segman' / name).is_symlink()
    for base in ('models/segman.py', 'schedules/segman_adamw_160k.py', 'datasets/segman_ade20k.py'):
        assert (mim / 'configs' / '_base_' / base).is_file()
    assert (mim / 'model-index.yml').is_file() and (target / 'mmseg_segman_scope.pth').is_file()

    # That copy, first on the path, serves both the package scope and mim's model index.
    downstream_config(tmp_path / 'mine.py', tmp_path)
    code, out = run('-c', 'from mmengine.config import Config; '
                    'print(Config.fromfile("mine.py").model.decode_head.num_classes); '
                    'import mmseg_segman; print(mmseg_segman.__file__)',
                    cwd=tmp_path, env={'PYTHONPATH': str(target)})
    assert code == 0 and out.split()[-2:] == ['5', str(target / 'mmseg_segman' / '__init__.py')], out
    assert_mim_lists_the_models(cwd=tmp_path, env={'PYTHONPATH': str(target)})


def assert_mim_lists_the_models(cwd, env=None):
    """``mim search mmseg_segman`` (offline: the installed model index) lists all 12."""
    result = subprocess.run([*MIM, 'search', 'mmseg_segman'], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, 'COLUMNS': '250', **(env or {})})
    assert result.returncode == 0, result.stdout + result.stderr
    listed = re.findall(r'config id: (\S+)', result.stdout)
    assert sorted(listed) == [name[:-3] for name in SEGMAN_CONFIGS], result.stdout
    assert re.search(r'ade20k/miou\s+43\.0', result.stdout), result.stdout


def test_mim_search_in_the_checkout():
    # mim finds a package through its distribution's location; for this editable install
    # that is the checkout's egg-info, on the path when run from the repository root.
    assert_mim_lists_the_models(cwd=REPO)


def test_metafile_lists_every_config_with_the_paper_results():
    index = yaml.safe_load((REPO / 'model-index.yml').read_text())
    assert index['Import'] == ['configs/segman/metafile.yaml']
    models = yaml.safe_load((REPO / 'configs' / 'segman' / 'metafile.yaml').read_text())['Models']
    assert sorted(Path(m['Config']).name for m in models) == SEGMAN_CONFIGS
    for model in models:
        assert (REPO / model['Config']).is_file() and model['Name'] == Path(model['Config']).stem
    by_name = {m['Name']: m for m in models}
    assert by_name['segman-b_4xb4-160k_ade20k-512x512']['Results']['Metrics']['mIoU'] == 52.6
    assert by_name['segman-l_4xb2-160k_cityscapes-1024x1024']['Metadata']['FLOPs (G)'] == 769.0


def test_mim_train_runs_a_segman_config(tmp_path, toy_data):
    result = subprocess.run(
        [*MIM, 'train', 'mmsegmentation', str(TOY_CONFIG), '--gpus', '0', '--work-dir', str(tmp_path),
         '--cfg-options', 'train_cfg.max_iters=2',
         'train_dataloader.batch_size=2', 'default_hooks.logger.interval=1',
         'model.data_preprocessor.size=[64,64]',
         *data_root_options(toy_data)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert 'Iter(train) [2/2]' in out and (tmp_path / 'iter_2.pth').is_file(), out[-3000:]
