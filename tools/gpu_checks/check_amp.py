"""Mixed-precision training of SegMAN through mmengine's ``AmpOptimWrapper``, on CUDA.

    python tools/gpu_checks/check_amp.py [--arch t] [--iters 60]

Trains a SegMAN (ADE20K head) from scratch on a fixed synthetic set (coloured rectangles
on noise, labelled by colour, so the loss can fall) through the path mmengine's runner
takes: ``model.train_step(data, optim_wrapper)`` with mmseg's ``SegDataPreProcessor``.
Variants: float32 (``OptimWrapper``), fp16 and bf16 (``AmpOptimWrapper``, dynamic loss
scale), bf16 with ``with_cp``. A variant passes when every loss is finite, the mean loss of
the last 10 steps is below that of the first 10, and (fp16) the loss scale stays >= 1.
"""
import argparse
import math
import sys
from typing import Dict, List

import torch

NUM_CLASSES = 8
VARIANTS = {'fp32': None, 'fp16': 'float16', 'bf16': 'bfloat16', 'bf16+with_cp': 'bfloat16'}


def synthetic_batches(count: int, batch: int, size: int, seed: int = 0) -> List[Dict]:
    """``count`` batches of mmseg ``train_step`` data: uint8 images and label maps."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(seed)
    palette = torch.randint(0, 256, (NUM_CLASSES, 3), generator=g)
    batches = []
    for _ in range(count):
        inputs, samples = [], []
        for _ in range(batch):
            labels = torch.zeros(size, size, dtype=torch.long)
            for _ in range(6):
                y, x = torch.randint(0, size - 16, (2,), generator=g).tolist()
                h, w = torch.randint(16, size // 2, (2,), generator=g).tolist()
                labels[y:y + h, x:x + w] = torch.randint(1, NUM_CLASSES, (1,), generator=g)
            noise = torch.randint(-40, 40, (3, size, size), generator=g)
            inputs.append((palette[labels].permute(2, 0, 1) + noise).clamp(0, 255).to(torch.uint8))
            sample = SegDataSample()
            sample.gt_sem_seg = PixelData(data=labels[None])
            sample.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size)))
            samples.append(sample)
        batches.append(dict(inputs=inputs, data_samples=samples))
    return batches


def build(arch: str, with_cp: bool, size: int):
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import mmseg_segman  # noqa: F401
    from mmseg_segman.models.variants import head_widths

    register_all_modules()
    model = MODELS.build(dict(
        type='SegMANEncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=255, size=(size, size)),
        backbone=dict(type='SegMANEncoder', arch=arch, with_cp=with_cp, drop_path_rate=0.1),
        decode_head=dict(type='SegMANHead', **head_widths(arch, 'ade20k'), num_classes=NUM_CLASSES,
                         dropout_ratio=0.1,
                         loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
        train_cfg=dict(), test_cfg=dict(mode='whole')))
    return model.cuda()


def train(variant: str, args) -> bool:
    from mmengine.optim import build_optim_wrapper

    dtype = VARIANTS[variant]
    torch.manual_seed(args.seed)
    model = build(args.arch, variant.endswith('with_cp'), args.size)
    optim = dict(type='AdamW', lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01)
    paramwise = dict(custom_keys={'head': dict(lr_mult=10.0), 'norm': dict(decay_mult=0.0)})
    wrapper_cfg = (dict(type='OptimWrapper', optimizer=optim, paramwise_cfg=paramwise) if dtype is None
                   else dict(type='AmpOptimWrapper', dtype=dtype, loss_scale='dynamic',
                             optimizer=optim, paramwise_cfg=paramwise))
    wrapper = build_optim_wrapper(model, wrapper_cfg)
    model.train()
    losses, scales = [], []
    for data in synthetic_batches(args.iters, args.batch, args.size, args.seed):
        log = model.train_step(data, wrapper)
        losses.append(log['loss'].item())
        if dtype is not None:
            scales.append(wrapper.loss_scaler.get_scale())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    finite = all(math.isfinite(x) for x in losses)
    scale_ok = dtype != 'float16' or min(scales) >= 1.0
    ok = finite and last < first and scale_ok
    scale_text = f', loss scale min {min(scales):g} last {scales[-1]:g}' if scales else ''
    print(f'{"PASS" if ok else "FAIL"} SegMAN-{args.arch.upper()} {variant:13s} {args.iters} steps of '
          f'{args.batch}x{args.size}x{args.size}: loss {first:.3f} -> {last:.3f}, '
          f'{"all finite" if finite else "NON-FINITE"}{scale_text}, '
          f'peak {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB', flush=True)
    torch.cuda.reset_peak_memory_stats()
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', default='t', choices=['t', 's', 'b', 'l'])
    parser.add_argument('--iters', type=int, default=60)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--lr', type=float, default=2e-4)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--variants', nargs='+', choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()
    results = [train(v, args) for v in args.variants]
    print(f'{results.count(True)} PASS, {results.count(False)} FAIL')
    return 0 if all(results) else 1


if __name__ == '__main__':
    sys.exit(main())
