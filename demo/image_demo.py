"""Segment one image with a SegMAN config and checkpoint; write a coloured overlay PNG.

    python demo/image_demo.py IMG CONFIG CHECKPOINT --out-file OUT.png \
        [--dataset ade20k|cityscapes|coco-stuff] [--device cpu] [--opacity 0.5]

Classes and palette, first found: ``--dataset``; the checkpoint's ``dataset_meta`` (what mmseg
1.x training writes and ``tools/convert_official_checkpoint.py`` keeps) or mmseg 0.x
``CLASSES``/``PALETTE``; the config's test dataset (its ``metainfo`` or its class's ``METAINFO``).
"""
import argparse
import pickle
from pathlib import Path
from typing import Optional

from mmengine.config import Config
from mmengine.runner import load_checkpoint
from mmseg.apis import inference_model, init_model, show_result_pyplot
from mmseg.registry import DATASETS
from mmseg.utils import get_classes, get_palette

import mmseg_segman  # noqa: F401  (registers SegMAN; configs also import it)
from mmseg_segman.models.strict_loading import WeightsMismatchError

DATASET_NAMES = {'ade20k': 'ade20k', 'cityscapes': 'cityscapes', 'coco-stuff': 'coco_stuff164k'}


def config_dataset_meta(cfg: Config) -> Optional[dict]:
    """Classes and palette of the config's test dataset, if it names them."""
    dataset = cfg.get('test_dataloader', {}).get('dataset', {})
    meta = dataset.get('metainfo') or getattr(DATASETS.get(dataset.get('type', '')), 'METAINFO', None)
    if meta and 'classes' in meta and 'palette' in meta:
        return dict(classes=tuple(meta['classes']), palette=[list(c) for c in meta['palette']])
    return None


def find_dataset_meta(dataset: Optional[str], ckpt_meta: dict, cfg: Config) -> Optional[dict]:
    if dataset:
        name = DATASET_NAMES[dataset]
        return dict(classes=get_classes(name), palette=get_palette(name))
    if 'dataset_meta' in ckpt_meta:
        return ckpt_meta['dataset_meta']
    if 'CLASSES' in ckpt_meta and 'PALETTE' in ckpt_meta:
        return dict(classes=ckpt_meta['CLASSES'], palette=ckpt_meta['PALETTE'])
    return config_dataset_meta(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('img', type=Path)
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out-file', type=Path, required=True)
    parser.add_argument('--dataset', choices=sorted(DATASET_NAMES),
                        help='take classes and palette from this dataset')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--opacity', type=float, default=0.5, help='overlay opacity in (0, 1]')
    args = parser.parse_args()
    for path in (args.img, Path(args.config), Path(args.checkpoint)):
        if not path.is_file():
            parser.error(f'no such file: {path}')
    if not 0 < args.opacity <= 1:
        parser.error(f'--opacity must be in (0, 1], got {args.opacity}')

    model = init_model(args.config, None, device=args.device)
    try:  # refuses unsafe, damaged or mismatching checkpoints (mmseg_segman.checkpoint_safety)
        checkpoint = load_checkpoint(model, args.checkpoint, map_location='cpu')
    except (pickle.UnpicklingError, WeightsMismatchError) as error:
        raise SystemExit(f'cannot use {args.checkpoint}: {error}')
    meta = find_dataset_meta(args.dataset, checkpoint.get('meta') or {}, model.cfg)
    num_classes = model.decode_head.num_classes
    if meta is None or len(meta['palette']) < num_classes:
        colours = 'no palette' if meta is None else f'a palette of {len(meta["palette"])} colours'
        parser.error(f'checkpoint and config give {colours} for {num_classes} classes: pass --dataset')
    model.dataset_meta = meta
    result = inference_model(model, str(args.img))
    args.out_file.parent.mkdir(parents=True, exist_ok=True)
    show_result_pyplot(model, str(args.img), result, opacity=args.opacity, show=False,
                       draw_gt=False, with_labels=False, out_file=str(args.out_file))
    print(f'wrote {args.out_file}')


if __name__ == '__main__':
    main()
