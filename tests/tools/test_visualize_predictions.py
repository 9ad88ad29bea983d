"""``visualize_predictions``: input, ground truth and prediction of a test set in one picture."""
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from ..release_files import REPO, build_segmentor
from ..toy_tools import TOY_CONFIG, data_root_options, make_toy_data, run

TOOL = REPO / 'tools' / 'visualize_predictions.py'
spec = importlib.util.spec_from_file_location('visualize_predictions', TOOL)
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
PALETTE = [[0, 0, 0], [220, 60, 60], [60, 200, 80], [70, 90, 230], [230, 200, 40]]


def test_colourise_and_nearest_neighbour_tiles():
    label = np.array([[0, 1], [4, 255]], np.uint8)
    rgb = tool.colourise(label, PALETTE)
    assert rgb[0, 1].tolist() == PALETTE[1] and rgb[1, 0].tolist() == PALETTE[4]
    assert rgb[1, 1].tolist() == list(tool.IGNORE_COLOUR)
    tile = np.asarray(tool.tile(rgb, 64))
    assert tile.shape == (64, 64, 3) and set(map(tuple, tile.reshape(-1, 3))) == set(map(tuple, rgb.reshape(-1, 3)))
    assert (tile[:32, 32:] == PALETTE[1]).all()  # each pixel a 32x32 block


def test_mean_iou_as_mmseg_counts_it():
    gt = np.array([[0, 0, 1, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 1]])
    # background 1/2, class 1 2/3; ignored pixels do not count
    assert tool.mean_iou([(gt, pred)], 5, 255) == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert tool.mean_iou([(np.array([[255, 1]], np.uint8), np.array([[0, 1]]))], 5, 255) == 100


def test_picture_of_the_toy_set(tmp_path):
    data = make_toy_data(tmp_path / 'toy')
    checkpoint = tmp_path / 'random.pth'
    torch.save({'meta': {}, 'state_dict': build_segmentor(TOY_CONFIG).state_dict()}, checkpoint)
    out = tmp_path / 'picture.png'
    code, log = run(TOOL, TOY_CONFIG, checkpoint, '--out-file', out, '--num-images', '3', '--tile', '64',
                    '--cfg-options', *data_root_options(data)[2:], cwd=REPO)
    assert code == 0, log[-3000:]
    assert f'wrote {out} (3 images, mIoU' in log
    picture = np.asarray(Image.open(out).convert('RGB'))
    height, width, _ = picture.shape
    assert 3 * 64 < height < 3 * 64 + 120 and 3 * 64 < width < 3 * 64 + 250, picture.shape
    # the ground-truth tile of the first image is its label map, colourised and scaled 4x
    gt = np.asarray(Image.open(sorted((data / 'ann_dir' / 'val').glob('*.png'))[0]))
    expected = np.asarray(tool.tile(tool.colourise(gt, PALETTE), 64))
    found = [(y, x) for y in range(height - 63) for x in range(min(width - 63, 300))
             if (picture[y, x] == expected[0, 0]).all() and (picture[y:y + 64, x:x + 64] == expected).all()]
    assert found, 'the first ground-truth tile is not in the picture'
    # every legend colour appears
    for colour in PALETTE:
        assert (picture.reshape(-1, 3) == colour).all(axis=1).any(), colour


def test_missing_checkpoint_is_named(tmp_path):
    code, log = run(TOOL, TOY_CONFIG, tmp_path / 'none.pth', '--out-file', tmp_path / 'x.png', cwd=REPO)
    assert code != 0 and 'no such file' in log and 'none.pth' in log
