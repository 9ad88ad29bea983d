"""Generate the bundled toy segmentation dataset (deterministic) in mmseg's folder layout.

    python tools/make_toy_dataset.py data/toy [--train 64 --val 16 --size 96]

writes ``img_dir/{train,val}/*.png`` (RGB) and ``ann_dir/{train,val}/*.png`` (class indices).
Classes: background (noisy grey texture) and four shapes, each with its own colour family
and outline: disc, square, triangle, and a striped bar. Colour and shape both carry the
class, with enough jitter that a network has to learn them.
"""
import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ('background', 'disc', 'square', 'triangle', 'bar')
PALETTE = [[0, 0, 0], [220, 60, 60], [60, 200, 80], [70, 90, 230], [230, 200, 40]]
BASE_COLOURS = np.array(PALETTE[1:], dtype=np.float32)


def shape_mask(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``(size, size)`` mask of one shape of class ``kind`` (1..4)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    radius = rng.uniform(0.08, 0.2) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    if kind == 1:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    if kind == 2:
        return (np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius)
    if kind == 3:
        top = cy - radius
        rel = (yy - top) / (2 * radius)
        return (rel >= 0) & (rel <= 1) & (np.abs(xx - cx) <= rel * radius)
    vertical = rng.random() < 0.5
    along, across = (yy, xx) if vertical else (xx, yy)
    centre_along, centre_across = (cy, cx) if vertical else (cx, cy)
    return (np.abs(along - centre_along) <= 1.6 * radius) & (np.abs(across - centre_across) <= 0.5 * radius)


def make_sample(size: int, rng: np.random.Generator):
    """One ``(image uint8 (H, W, 3), label uint8 (H, W))`` pair."""
    grey = rng.uniform(60, 190)
    image = grey + rng.normal(0, 18, (size, size, 1)) + rng.normal(0, 6, (size, size, 3))
    label = np.zeros((size, size), np.uint8)
    for kind in rng.integers(1, 5, rng.integers(2, 5)):
        mask = shape_mask(int(kind), size, rng)
        colour = BASE_COLOURS[kind - 1] + rng.normal(0, 20, 3)
        texture = rng.normal(0, 12, (size, size, 1))
        if kind == 4:  # stripes
            texture += 25 * np.sign(np.sin(np.arange(size) * 0.9))[None, :, None]
        image[mask] = (colour + texture)[mask]
        label[mask] = kind
    return np.clip(image, 0, 255).astype(np.uint8), label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', type=Path)
    parser.add_argument('--train', type=int, default=64, help='training images')
    parser.add_argument('--val', type=int, default=16, help='validation images')
    parser.add_argument('--size', type=int, default=96, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()

    settings = dict(train=args.train, val=args.val, size=args.size, seed=args.seed, classes=CLASSES)
    stamp = args.out_dir / 'dataset.json'
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(settings)):
        print(f'toy dataset already at {args.out_dir}')
        return
    rng = np.random.default_rng(args.seed)
    for split, count in (('train', args.train), ('val', args.val)):
        (args.out_dir / 'img_dir' / split).mkdir(parents=True, exist_ok=True)
        (args.out_dir / 'ann_dir' / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label = make_sample(args.size, rng)
            Image.fromarray(image).save(args.out_dir / 'img_dir' / split / f'{i:04d}.png')
            Image.fromarray(label).save(args.out_dir / 'ann_dir' / split / f'{i:04d}.png')
    stamp.write_text(json.dumps(settings))
    print(f'wrote {args.train} train and {args.val} val images of {args.size}x{args.size} '
          f'with classes {CLASSES} to {args.out_dir}')


if __name__ == '__main__':
    main()
