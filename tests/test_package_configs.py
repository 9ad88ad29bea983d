"""The configs travel inside the package: ``mmseg_segman::`` inheritance, a non-editable
install, and OpenMMLab's ``mim``."""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mmseg
import pytest
import yaml
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS

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


SHIPPED_TOOLS = ('convert_official_checkpoint.py', 'get_release_checkpoint.py', 'image_demo.py',
                 'analysis_tools/get_flops.py', 'make_toy_dataset.py', 'visualize_predictions.py',
                 'deployment/export_onnx.py')


def source_copy(tmp_path: Path) -> Path:
    """A clean copy of the sources to install from: the build writes next to them."""
    src = tmp_path / 'src'
    src.mkdir()
    for name in ('setup.py', 'model-index.yml', 'mmseg_segman_scope.py', 'mmseg_segman_scope.pth'):
        shutil.copy(REPO / name, src / name)
    skip = shutil.ignore_patterns('.mim', '__pycache__', '*.egg-info')
    for name in ('configs', 'mmseg_segman', 'tools', 'demo'):
        shutil.copytree(REPO / name, src / name, ignore=skip, symlinks=True)
    return src


def test_non_editable_install_carries_configs_and_tools(tmp_path):
    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--disable-pip-version-check',
                    '--no-deps', '--no-build-isolation', '--target', str(target), str(source_copy(tmp_path))],
                   check=True, capture_output=True)
    mim = target / 'mmseg_segman' / '.mim'
    for name in SEGMAN_CONFIGS + ['metafile.yaml']:
        assert (mim / 'configs' / 'segman' / name).is_file() and not (mim / 'configs' / 'segman' / name).is_symlink()
    for base in ('models/segman.py', 'schedules/segman_adamw_160k.py', 'datasets/segman_ade20k.py'):
        assert (mim / 'configs' / '_base_' / base).is_file()
    for tool in SHIPPED_TOOLS:
        assert (mim / 'tools' / tool).is_file() and not (mim / 'tools' / tool).is_symlink(), tool
    assert (mim / 'model-index.yml').is_file() and (target / 'mmseg_segman_scope.pth').is_file()

    # That copy, first on the path, serves the package scope, mim's model index and mim run.
    downstream_config(tmp_path / 'mine.py', tmp_path)
    env = {'PYTHONPATH': str(target)}
    code, out = run('-c', 'from mmengine.config import Config; '
                    'print(Config.fromfile("mine.py").model.decode_head.num_classes); '
                    'import mmseg_segman; print(mmseg_segman.__file__)', cwd=tmp_path, env=env)
    assert code == 0 and out.split()[-2:] == ['5', str(target / 'mmseg_segman' / '__init__.py')], out
    assert_mim_lists_the_models(cwd=tmp_path, env=env)
    code, out = run('-m', 'mim', 'run', 'mmseg_segman', 'make_toy_dataset', 'toy', '--train', '1',
                    '--val', '1', '--size', '32', cwd=tmp_path, env=env)
    assert code == 0 and str(mim / 'tools' / 'make_toy_dataset.py') in out, out
    assert len(list((tmp_path / 'toy').rglob('*.png'))) == 4


@pytest.mark.parametrize('editable', [False, True], ids=['mim install .', 'mim install -e .'])
def test_mim_install_into_an_environment_with_the_stack(tmp_path, editable):
    """A fresh venv that sees this environment's packages (torch, mmcv, mmseg, mim) through a
    .pth: ``mim install`` installs the plugin alone (its requirements are satisfied, nothing
    is fetched: --no-index), and its tools run with ``mim run``."""
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    python = venv / 'bin' / 'python'
    site_dir = Path(subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                                   check=True, capture_output=True, text=True).stdout.strip())
    stack = Path(mmseg.__file__).parents[1]  # this environment's site-packages
    (site_dir / 'stack.pth').write_text(f'{stack}\n')
    src = source_copy(tmp_path)
    result = subprocess.run([python, '-m', 'mim', 'install', '--no-index', '--no-build-isolation',
                             *(['-e'] if editable else []), str(src)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert 'Successfully installed mmseg-segman-0.1.0' in out, out[-3000:]
    assert not re.search(r'Successfully installed .*(torch|mmcv|mmseg)(?!-segman)', out), out[-3000:]
    downstream_config(tmp_path / 'mine.py', tmp_path)
    code = ('import mmseg_segman, os; print(os.path.realpath(mmseg_segman.__file__)); '
            'from mmengine.config import Config; print(Config.fromfile("mine.py").model.backbone.type)')
    result = subprocess.run([python, '-c', code], cwd=tmp_path, capture_output=True, text=True)
    expected = (src if editable else site_dir) / 'mmseg_segman' / '__init__.py'
    assert result.stdout.split() == [str(expected.resolve()), 'SegMANEncoder'], result.stdout + result.stderr
    # mim finds a package through its distribution: for an editable install, the checkout's
    # egg-info, on the path when run from the checkout's root.
    result = subprocess.run([python, '-m', 'mim', 'run', 'mmseg_segman', 'get_release_checkpoint', 'nothing'],
                            cwd=src if editable else tmp_path, capture_output=True, text=True)
    assert result.returncode != 0 and "unknown model 'nothing'" in result.stderr, result.stdout + result.stderr


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
    # FLOPs as tools/analysis_tools/get_flops.py counts them (docs/flops.md), not the paper's 769.0
    assert by_name['segman-l_4xb2-160k_cityscapes-1024x1024']['Metadata']['FLOPs (G)'] == 795.9


@pytest.mark.parametrize('name', [name[:-3] for name in SEGMAN_CONFIGS if name.startswith('segman-t')])
def test_metafile_parameters_are_those_of_the_config(name):
    # T only, to stay fast; docs/flops.md has the counts of all sizes.
    model = yaml.safe_load((REPO / 'configs' / 'segman' / 'metafile.yaml').read_text())['Models']
    listed = {m['Name']: m['Metadata']['Parameters (M)'] for m in model}[name]
    cfg = Config.fromfile(str(REPO / 'configs' / 'segman' / f'{name}.py'))
    cfg.model.backbone.init_cfg = None
    init_default_scope('mmseg')
    segmentor = MODELS.build(cfg.model)
    assert round(sum(p.numel() for p in segmentor.parameters()) / 1e6, 1) == listed


def test_mim_train_and_test_run_a_segman_config(tmp_path, toy_data):
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
    result = subprocess.run(
        [*MIM, 'test', 'mmsegmentation', str(TOY_CONFIG), '--checkpoint', str(tmp_path / 'iter_2.pth'),
         '--work-dir', str(tmp_path / 'test'), '--cfg-options', *data_root_options(toy_data)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and re.search(r'mIoU: \d', out), out[-3000:]
