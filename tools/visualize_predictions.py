"""One picture of a segmentor's predictions: input, ground truth and prediction per image.

    python tools/visualize_predictions.py CONFIG CHECKPOINT --out-file OUT.png \
        [--num-images 6] [--tile 256] [--device cpu] [--cfg-options KEY=VALUE ...]

Takes the first ``--num-images`` images of the config's test dataset, predicts them with
``mmseg.apis.inference_model`` and writes one PNG: a column per image, rows input, ground
truth and prediction (each scaled to ``--tile`` pixels with nearest-neighbour, so pixels stay
sharp), the mIoU over those images in the title, and a legend of class names and colours.
Classes and palette are those of the dataset drawn (its ``metainfo``).
"""
import argparse
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import Config, DictAction
from mmengine.registry import init_default_scope
from mmseg.apis import inference_model, init_model
from mmseg.datasets.transforms import LoadAnnotations
from mmseg.evaluation import IoUMetric
from mmseg.registry import DATASETS
from PIL import Image, ImageDraw, ImageFont

import mmseg_segman  # noqa: F401  (registers SegMAN; configs also import it)

IGNORE_COLOUR = (255, 255, 255)
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
ROWS = ('input', 'ground truth', 'prediction')


def colourise(label: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Class indices ``(H, W)`` -> RGB ``(H, W, 3)``; indices without a colour are white."""
    lut = np.full((256, 3), IGNORE_COLOUR, np.uint8)
    lut[:len(palette)] = np.asarray(palette, np.uint8)
    return lut[label.astype(np.int64).clip(0, 255)]


def tile(rgb: np.ndarray, size: int) -> Image.Image:
    """Scale an RGB array so its longer side is ``size`` pixels (nearest neighbour)."""
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    return Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                       Image.NEAREST)


def mean_iou(pairs: List[Tuple[np.ndarray, np.ndarray]], num_classes: int,
             ignore_index: int) -> float:
    """mIoU (percent) as mmseg's ``IoUMetric`` computes it, over the classes present."""
    areas = [IoUMetric.intersect_and_union(torch.from_numpy(pred), torch.from_numpy(gt.astype(np.int64)),
                                           num_classes, ignore_index) for gt, pred in pairs]
    totals = [sum(area[i] for area in areas) for i in range(4)]
    return float(100 * np.nanmean(IoUMetric.total_area_to_metrics(*totals, ['mIoU'])['IoU']))


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def compose(columns: List[List[Image.Image]], classes: Sequence[str],
            palette: Sequence[Sequence[int]], title: str, size: int) -> Image.Image:
    """Rows input / ground truth / prediction, a column per image, title and legend."""
    pad, text_h = 8, max(14, size // 12)
    big = font(text_h)
    probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    label_w = max(int(probe.textlength(name, font=big)) for name in ROWS) + 2 * pad
    items = [(name, tuple(colour)) for name, colour in zip(classes, palette)]
    item_w = [text_h + 6 + int(probe.textlength(name, font=big)) + 3 * pad for name, _ in items]
    width = label_w + len(columns) * (size + pad)
    lines, line, line_w = [], [], pad
    for item, w in zip(items, item_w):
        if line and line_w + w > width:
            lines.append(line)
            line, line_w = [], pad
        line.append((item, w))
        line_w += w
    lines.append(line)
    top = text_h + 2 * pad
    height = top + len(ROWS) * (size + pad) + len(lines) * (text_h + pad) + pad
    canvas = Image.new('RGB', (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill=TEXT, font=big)
    for r, name in enumerate(ROWS):
        y = top + r * (size + pad)
        draw.text((pad, y + size // 2 - text_h // 2), name, fill=TEXT, font=big)
        for c, column in enumerate(columns):
            canvas.paste(column[r], (label_w + c * (size + pad), y))
    y = top + len(ROWS) * (size + pad)
    for line in lines:
        x = pad
        for (name, colour), w in line:
            draw.rectangle([x, y, x + text_h, y + text_h], fill=colour, outline=TEXT)
            draw.text((x + text_h + 6, y), name, fill=TEXT, font=big)
            x += w
        y += text_h + pad
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out-file', type=Path, required=True)
    parser.add_argument('--num-images', type=int, default=6)
    parser.add_argument('--tile', type=int, default=256, help='side of each tile in pixels')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    args = parser.parse_args()
    for path in (Path(args.config), Path(args.checkpoint)):
        if not path.is_file():
            parser.error(f'no such file: {path}')
    if args.num_images < 1 or args.tile < 16:
        parser.error('--num-images must be >= 1 and --tile >= 16')

    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    model = init_model(cfg, args.checkpoint, device=args.device)
    classes, palette = dataset.metainfo['classes'], dataset.metainfo['palette']
    num_classes = model.decode_head.num_classes
    if len(palette) < num_classes:
        parser.error(f'{len(palette)} colours for {num_classes} classes')

    columns, pairs = [], []
    for index in range(min(args.num_images, len(dataset))):
        info = dataset.get_data_info(index)
        gt = LoadAnnotations(reduce_zero_label=info.get('reduce_zero_label', False))(
            dict(info, seg_fields=[]))['gt_seg_map']
        pred = inference_model(model, info['img_path']).pred_sem_seg.data[0].cpu().numpy()
        image = np.asarray(Image.open(info['img_path']).convert('RGB'))
        columns.append([tile(image, args.tile), tile(colourise(gt, palette), args.tile),
                     tile(colourise(pred, palette), args.tile)])
        pairs.append((gt, pred))
    miou = mean_iou(pairs, num_classes, dataset.ignore_index)
    title = f'{Path(args.checkpoint).name}: mIoU {miou:.1f} on these {len(columns)} images'
    args.out_file.parent.mkdir(parents=True, exist_ok=True)
    compose(columns, classes, palette, title, args.tile).save(args.out_file)
    print(f'wrote {args.out_file} ({len(columns)} images, mIoU {miou:.2f})')


if __name__ == '__main__':
    main()
