"""A SegMAN encoder and its ADE20K decode head in eval mode on CUDA: the fast path (the
default backends) against the reference path (``torch`` backends), float32 and bfloat16
autocast.

    python3 tools/gpu_checks/check_eval_parity.py [--arch l] [--size 256 320] [--batch 2]

Random weights with non-trivial batch-norm running statistics and affine parameters (the
eval-mode norms run inside the convolution ops on the fast path: the depthwise, dense and
1x1 ones). Prints the relative error ``||fast - ref|| / ||ref||`` of each stage's output and
of the head's logits per dtype; exits 1 if one is above the
tolerance (1e-3 float32, 5e-3 float32 with TF32's convolutions, 5e-2 bfloat16) or not
finite. Float32 runs twice: as PyTorch's switches stand (cuDNN's convolutions in TF32 by
default, and so the fast path's, which follows ``torch.backends.cudnn.allow_tf32``: each
path rounds its convolutions' inputs to TF32's 10-bit mantissa in its own way, about 3e-4 at
the stem, 1.2e-3 after SegMAN-L's 40 blocks, twenty-second session), then with TF32 off
for both paths.
"""
import argparse
import sys

import torch
from torch import nn

from mmseg_segman.models import SegMANEncoder, SegMANHead
from mmseg_segman.models.variants import head_widths
from mmseg_segman.ops import use_backends

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
TF32_TOLERANCE = 5e-3  # float32 with TF32's convolutions: TF32's unit roundoff is 4.9e-4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', default='l', choices=sorted(SegMANEncoder.arch_zoo))
    parser.add_argument('--size', type=int, nargs=2, default=(256, 320), metavar=('H', 'W'))
    parser.add_argument('--batch', type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder = SegMANEncoder(arch=args.arch).cuda().eval()
    head = SegMANHead(**head_widths(args.arch, 'ade20k'), num_classes=150).cuda().eval()
    for module in (*encoder.modules(), *head.modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2)
            nn.init.normal_(module.weight, 1, 0.2)
            nn.init.normal_(module.bias, 0, 0.2)
    x = torch.randn(args.batch, 3, *args.size, device='cuda')
    failed = False
    allow_tf32 = torch.backends.cudnn.allow_tf32
    for dtype, tf32 in ((torch.float32, allow_tf32), (torch.float32, False), (torch.bfloat16, allow_tf32)):
        torch.backends.cudnn.allow_tf32 = tf32
        with torch.no_grad(), torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
            fast = encoder(x)
            fast = (*fast, head(fast))
            with use_backends('torch'):
                reference = encoder(x)
                reference = (*reference, head(reference))
        torch.backends.cudnn.allow_tf32 = allow_tf32
        errors = [((a.float() - b.float()).norm() / b.float().norm()).item()
                  for a, b in zip(fast, reference)]
        tolerance = TF32_TOLERANCE if dtype == torch.float32 and tf32 else TOLERANCE[dtype]
        ok = all(e < tolerance for e in errors)  # False for NaN too
        failed |= not ok
        print(f"{'PASS' if ok else 'FAIL'} SegMAN-{args.arch.upper()} eval {str(dtype)[6:]}"
              f"{'' if tf32 or dtype != torch.float32 else ' without TF32'}, "
              f"fast vs reference, relative error per stage: "
              f"{' '.join(f'{e:.1e}' for e in errors[:-1])}, head's logits {errors[-1]:.1e}",
              flush=True)
    return int(failed)


if __name__ == '__main__':
    sys.exit(main())
