"""The README's downstream config, taken from README.md as written, trains on the toy data."""
import re
import shutil

import pytest

from .release_files import write_release_encoder
from .toy_tools import REPO, TOOLS, make_toy_data, run

README = REPO / 'README.md'


def readme_block(first_line: str) -> str:
    """The fenced code block of README.md whose first line is ``first_line``."""
    blocks = re.findall(r'```\w*\n(.*?)```', README.read_text(), re.S)
    found = [b for b in blocks if b.splitlines()[0] == first_line]
    assert len(found) == 1, f'README.md has {len(found)} code blocks starting with {first_line!r}'
    return found[0]


@pytest.fixture(scope='module')
def user_dir(tmp_path_factory):
    """A directory with the toy data where the README's config expects the user's data."""
    root = tmp_path_factory.mktemp('user')
    make_toy_data(root / 'data' / 'my_dataset')
    for image in (root / 'data' / 'my_dataset' / 'img_dir').rglob('*.png'):
        shutil.move(image, image.with_suffix('.jpg'))  # the README's layout: .jpg images
    return root


def test_downstream_config_as_written_trains(user_dir):
    config = readme_block('# my_config.py')
    (user_dir / 'my_config.py').write_text(config)
    # The README's commands: the released encoder (here a release-format file of a random
    # encoder) into pretrained/, then mmseg's train.py; short schedule on the command line.
    commands = readme_block('mim run mmseg_segman get_release_checkpoint segman-encoder-t '
                            '--file SegMAN_Encoder_t.pth.tar  # -> pretrained/')
    assert 'train.py my_config.py' in commands
    write_release_encoder(user_dir / 'SegMAN_Encoder_t.pth.tar')
    code, out = run(REPO / 'tools' / 'get_release_checkpoint.py', 'segman-encoder-t',
                    '--file', 'SegMAN_Encoder_t.pth.tar', cwd=user_dir)
    assert code == 0, out
    # Runtime options only: a short schedule on 64x64 crops (512x512 takes minutes on a CPU).
    code, out = run(TOOLS / 'train.py', 'my_config.py', '--work-dir', 'work', '--cfg-options',
                    'model.data_preprocessor.size=[64,64]', 'train_dataloader.dataset.pipeline.2.scale=(256,64)',
                    'train_dataloader.dataset.pipeline.3.crop_size=(64,64)',
                    'val_dataloader.dataset.pipeline.1.scale=(256,64)',
                    'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
                    'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
                    'train_dataloader.batch_size=1', 'train_dataloader.num_workers=0',
                    'train_dataloader.persistent_workers=False', 'val_dataloader.num_workers=0',
                    'val_dataloader.persistent_workers=False', cwd=user_dir)
    assert code == 0, out[-3000:]
    assert 'Loads checkpoint by local backend from path: pretrained/SegMAN_Encoder_t.pth.tar' in out, out[-3000:]
    assert 'Iter(train) [2/2]' in out and re.search(r'mIoU: \d', out), out[-3000:]
    assert 'disc' in out  # the config's classes reach the evaluation table
