"""The Triton kernels compile for the H100 (sm_90) with their default block sizes.

The interpreter tests check what the kernels compute; this checks that Triton's GPU compiler
accepts them (no GPU needed: ``triton.compile`` down to a cubin with the bundled ptxas), which
the interpreter cannot see, e.g. a block too large for the registers or an unsupported op.
"""
import pytest

triton = pytest.importorskip('triton')

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mmseg_segman.ops import triton_cross_selective_scan as cross  # noqa: E402

H100 = GPUTarget('cuda', 90, 32)
FLOAT32_POINTERS = {'a_ptr', 'd_ptr', 'bias_ptr', 'y_ptr', 'h_ptr', 'dy_ptr', 'du_ptr',
                    'ddelta_ptr', 'db_ptr', 'dc_ptr', 'da_ptr', 'dd_ptr', 'dbias_ptr'}


def compile_for_h100(kernel, activation: str, num_warps: int, **constexprs) -> bytes:
    """Compile ``kernel`` with activations (x/u, delta, B, C) of type ``activation``."""
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = 'constexpr'
        elif name.endswith('_ptr'):
            signature[name] = '*fp32' if name in FLOAT32_POINTERS else f'*{activation}'
        else:
            signature[name] = 'i32'
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=H100, options={'num_warps': num_warps}).asm['cubin']


# SegMAN's stage-1 (96 channels, 128x128) and decoder (384 channels, 16x16) sizes at 512x512
SIZES = [(96, 128 * 128), (384, 16 * 16)]


@pytest.mark.parametrize('activation', ['bf16', 'fp32'])
@pytest.mark.parametrize('channels,length', SIZES)
def test_cross_scan_kernels_compile(activation, channels, length):
    block_d, block_l, warps = cross.block_sizes(channels, length)
    for store_h in (True, False):
        assert compile_for_h100(cross._cross_scan_fwd_kernel, activation, warps, STORE_H=store_h,
                                BLOCK_D=block_d, BLOCK_L=block_l)
    block_d, block_l, warps = cross.block_sizes(channels, length, backward=True)
    assert compile_for_h100(cross._cross_scan_bwd_kernel, activation, warps,
                            BLOCK_D=block_d, BLOCK_L=block_l)

