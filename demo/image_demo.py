"""Segment one image with a SegMAN config and checkpoint; write a coloured overlay PNG.

    python demo/image_demo.py IMG CONFIG CHECKPOINT --out-file OUT.png \
        [--dataset ade20k|cityscapes|coco-stuff] [--device cpu] [--opacity 0.5]

Classes and palette come from the checkpoint's ``dataset_meta`` (what mmseg 1.x training
writes and ``tools/convert_official_checkpoint.py`` keeps), else from ``--dataset``.
"""
import argparse
from pathlib import Path

from mmseg.apis import inference_model, init_model, show_result_pyplot
from mmseg.utils import get_classes, get_palette

import mmseg_segman  # noqa: F401  (registers SegMAN; configs also import it)

DATASETS = {'ade20k': 'ade20k', 'cityscapes': 'cityscapes', 'coco-stuff': 'coco_stuff164k'}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('img', type=Path)
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out-file', type=Path, required=True)
    parser.add_argument('--dataset', choices=sorted(DATASETS),
                        help='take classes and palette from this dataset')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--opacity', type=float, default=0.5, help='overlay opacity in (0, 1]')
    args = parser.parse_args()
    for path in (args.img, Path(args.config), Path(args.checkpoint)):
        if not path.is_file():
            parser.error(f'no such file: {path}')
    if not 0 < args.opacity <= 1:
        parser.error(f'--opacity must be in (0, 1], got {args.opacity}')

    model = init_model(args.config, args.checkpoint, device=args.device)
    if args.dataset:
        name = DATASETS[args.dataset]
        model.dataset_meta = dict(classes=get_classes(name), palette=get_palette(name))
    num_classes = model.decode_head.num_classes
    if len(model.dataset_meta['palette']) < num_classes:
        parser.error(f'the palette has {len(model.dataset_meta["palette"])} colours for '
                     f'{num_classes} classes: pass --dataset')
    result = inference_model(model, str(args.img))
    args.out_file.parent.mkdir(parents=True, exist_ok=True)
    show_result_pyplot(model, str(args.img), result, opacity=args.opacity, show=False,
                       draw_gt=False, with_labels=False, out_file=str(args.out_file))
    print(f'wrote {args.out_file}')


if __name__ == '__main__':
    main()
