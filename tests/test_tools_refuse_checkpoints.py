"""test.py, the inferencer and the demo refuse checkpoints that do not fit SegMAN-T."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import official_keys
from .toy_tools import REPO, TOOLS, TOY_CONFIG, data_root_options, make_toy_data, run


@pytest.fixture(scope='module')
def wrong_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp('wrong')
    torch.save({'state_dict': {k: torch.zeros(s) for k, s in official_keys('s').items()}},
               root / 'segman_s.pth')
    torch.save({'foo': torch.zeros(3)}, root / 'foo.pth')
    return root / 'segman_s.pth', root / 'foo.pth'


def test_test_py_refuses_another_size(tmp_path, wrong_checkpoints):
    data = make_toy_data(tmp_path / 'toy')
    code, out = run(TOOLS / 'test.py', TOY_CONFIG, wrong_checkpoints[0], '--work-dir', tmp_path / 'work',
                    '--cfg-options', *data_root_options(data), cwd=REPO)
    assert code != 0 and not re.search(r'mIoU: \d', out)
    assert 'WeightsMismatchError' in out and 'does not fit SegMANEncoder' in out, out[-3000:]


def test_inferencer_refuses_another_size(wrong_checkpoints):
    from mmseg.apis import MMSegInferencer

    from mmseg_segman.models.strict_loading import WeightsMismatchError
    with pytest.raises(WeightsMismatchError, match='backbone.patch_embed.0.weight: checkpoint'):
        MMSegInferencer(model=str(TOY_CONFIG), weights=str(wrong_checkpoints[0]), device='cpu')


def test_demo_refuses_a_file_without_segman_weights(tmp_path, wrong_checkpoints):
    image = tmp_path / 'image.png'
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    code, out = run(REPO / 'demo' / 'image_demo.py', image, TOY_CONFIG, wrong_checkpoints[1],
                    '--out-file', tmp_path / 'overlay.png', cwd=REPO)
    assert code != 0 and not (tmp_path / 'overlay.png').exists()
    assert 'no SegMANEncoder weights' in out, out[-3000:]
