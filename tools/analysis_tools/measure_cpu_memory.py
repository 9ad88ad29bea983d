"""Peak memory (RSS) and time of training steps or whole-image inference on the CPU.

Each measurement runs in a fresh Python process, so its peak resident set size
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) is that model's and nothing else's:
imports, the model, its optimizer state and the peak of the step(s).

    # two training steps at the config's crop size and per-GPU batch size
    python tools/analysis_tools/measure_cpu_memory.py train configs/segman/segman-t_4xb4-160k_ade20k-512x512.py
    # one SegNeXt-T step of mmseg's own config at another batch size
    python tools/analysis_tools/measure_cpu_memory.py train \\
        mmseg::segnext/segnext_mscan-t_1xb16-adamw-160k_ade20k-512x512.py --batch 2
    # whole-image inference (encoder, head, logits resized to the image), 1024x2048
    python tools/analysis_tools/measure_cpu_memory.py infer \\
        configs/segman/segman-t_4xb2-160k_cityscapes-1024x1024.py --size 1024 2048
    # a peer with as many classes (19, Cityscapes) as the model it is compared with
    python tools/analysis_tools/measure_cpu_memory.py infer \\
        mmseg::segnext/segnext_mscan-t_1xb16-adamw-160k_ade20k-512x512.py --size 1024 2048 --classes 19

Random images and labels; models built from ``cfg.model`` without pretrained weights and
without the data preprocessor (images are fed normalised), SyncBN reverted to BN; training
steps are ``model.loss``, backward and AdamW. Prints one JSON line: peak GiB and the seconds
of the last step. SegMAN runs whatever backend its ops choose (on the CPU: the ``torch``
references, and PyTorch's SDPA for the stage-4 attention).
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def resolve_config(config: str) -> str:
    """A path, or ``mmseg::REL`` for a config shipped inside the installed mmseg."""
    if config.startswith('mmseg::'):
        import mmseg
        return str(Path(mmseg.__file__).parent / '.mim' / 'configs' / config[len('mmseg::'):])
    if not Path(config).is_file():
        raise SystemExit(f'config {config} does not exist')
    return config


def build(config: str, classes=None):
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import mmseg_segman  # noqa: F401

    register_all_modules()
    cfg = Config.fromfile(resolve_config(config))
    model_cfg = cfg.model.to_dict()
    model_cfg.pop('data_preprocessor', None)
    model_cfg.pop('pretrained', None)
    model_cfg['backbone'].pop('init_cfg', None)
    if classes is not None:
        model_cfg['decode_head']['num_classes'] = classes
    return cfg, revert_sync_batchnorm(MODELS.build(model_cfg))


def samples(batch: int, height: int, width: int, classes: int):
    import torch
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    out = []
    for _ in range(batch):
        sample = SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, classes, (1, height, width))))
        sample.set_metainfo(dict(img_shape=(height, width), ori_shape=(height, width),
                                 pad_shape=(height, width)))
        out.append(sample)
    return out


def child(args) -> None:
    """Run the measurement in this process and print the seconds of its last step."""
    import torch

    cfg, model = build(args.config, args.classes)
    torch.manual_seed(0)
    if args.mode == 'train':
        height, width = args.size or cfg.get('crop_size', (512, 512))
        batch = args.batch or cfg.train_dataloader.batch_size
        model.train()
        images = torch.randn(batch, 3, height, width)
        data = samples(batch, height, width, model.decode_head.num_classes)
        optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)
        for _ in range(args.iters):
            start = time.perf_counter()
            losses = model.loss(images, data)
            sum(v for k, v in losses.items() if 'loss' in k).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
    else:
        height, width = args.size or (1024, 2048)
        batch = args.batch or 1
        model.eval()
        images = torch.randn(batch, 3, height, width)
        metas = [dict(img_shape=(height, width), ori_shape=(height, width),
                      pad_shape=(height, width))] * batch
        with torch.no_grad():
            for _ in range(args.iters):
                start = time.perf_counter()
                model.encode_decode(images, metas)
                seconds = time.perf_counter() - start
    print(json.dumps(dict(batch=batch, size=[height, width], last_step_s=round(seconds, 2))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('mode', choices=['train', 'infer'])
    parser.add_argument('config', help='config path or mmseg::REL_PATH')
    parser.add_argument('--batch', type=int, help='default: the config\'s train batch size / 1')
    parser.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'),
                        help='default: the config\'s crop_size / 1024 2048')
    parser.add_argument('--classes', type=int, help='default: the config\'s decode_head.num_classes')
    parser.add_argument('--iters', type=int, default=2, help='steps (the last one is timed)')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    run = subprocess.run([sys.executable, __file__, '--child', *sys.argv[1:]], capture_output=True,
                         text=True)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20  # KiB on Linux
    if run.returncode != 0:
        print(run.stderr[-3000:], file=sys.stderr)
        status = 'killed (out of memory?)' if run.returncode < 0 else f'failed (exit {run.returncode})'
        print(json.dumps(dict(mode=args.mode, config=args.config, status=status,
                              peak_gib=round(peak_gib, 2))))
        sys.exit(1)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(dict(mode=args.mode, config=args.config, status='ok', **result,
                          peak_gib=round(peak_gib, 2))))


if __name__ == '__main__':
    main()
