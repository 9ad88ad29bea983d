"""Generate the bundled toy classification dataset (deterministic) in mmpretrain's layout.

    python tools/make_toy_cls_dataset.py data/toy_cls [--train 64 --val 32 --size 64]

writes ``{train,val}/<class>/NNNN.png`` (RGB), the folder layout mmpretrain's
``CustomDataset`` reads (classes are the folder names, sorted). Four classes, one shape
per image on a noisy grey background, balanced: the shapes and colour families of the toy
segmentation set (tools/make_toy_dataset.py): disc, square, triangle and striped bar,
each with random size, position and colour jitter.
"""
import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from make_toy_dataset import BASE_COLOURS, CLASSES, shape_mask

SHAPES = CLASSES[1:]  # disc, square, triangle, bar: segmentation class k is shape k - 1 here


def make_image(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 image showing a shape of ``SHAPES[kind]``."""
    image = rng.uniform(60, 190) + rng.normal(0, 18, (size, size, 1)) \
        + rng.normal(0, 6, (size, size, 3))
    mask = shape_mask(kind + 1, size, rng)
    texture = rng.normal(0, 12, (size, size, 1))
    if SHAPES[kind] == 'bar':  # stripes
        texture += 25 * np.sign(np.sin(np.arange(size) * 0.9))[None, :, None]
    image[mask] = (BASE_COLOURS[kind] + rng.normal(0, 20, 3) + texture)[mask]
    return np.clip(image, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', type=Path)
    parser.add_argument('--train', type=int, default=64, help='training images (all classes)')
    parser.add_argument('--val', type=int, default=32, help='validation images (all classes)')
    parser.add_argument('--size', type=int, default=64, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    for name in ('train', 'val'):
        if getattr(args, name) <= 0 or getattr(args, name) % len(SHAPES):
            parser.error(f'--{name} must be a positive multiple of {len(SHAPES)} '
                         '(balanced classes)')

    settings = dict(train=args.train, val=args.val, size=args.size, seed=args.seed, classes=SHAPES)
    stamp = args.out_dir / 'dataset.json'
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(settings)):
        print(f'toy classification dataset already at {args.out_dir}')
        return
    rng = np.random.default_rng(args.seed)
    for split in ('train', 'val'):
        count = getattr(args, split)
        for name in SHAPES:
            (args.out_dir / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            kind = i % len(SHAPES)
            Image.fromarray(make_image(kind, args.size, rng)).save(
                args.out_dir / split / SHAPES[kind] / f'{i:04d}.png')
    stamp.write_text(json.dumps(settings))
    print(f'wrote {args.train} train and {args.val} val images of {args.size}x{args.size} '
          f'with classes {SHAPES} to {args.out_dir}')


if __name__ == '__main__':
    main()
