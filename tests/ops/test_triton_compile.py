"""The Triton kernels compile for the H100 (sm_90) with their default block sizes.

The interpreter tests check what the kernels compute; this checks that Triton's GPU compiler
accepts them (no GPU needed: ``triton.compile`` down to a cubin with the bundled ptxas), which
the interpreter cannot see, e.g. a block too large for the registers or an unsupported op.
"""
import re
from typing import Tuple

import pytest

triton = pytest.importorskip('triton')

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mmseg_segman.ops import triton_batch_norm as tbn  # noqa: E402
from mmseg_segman.ops import triton_cross_entropy as tce  # noqa: E402
from mmseg_segman.ops import triton_cross_selective_scan as cross  # noqa: E402
from mmseg_segman.ops import triton_dense_conv as tdc  # noqa: E402
from mmseg_segman.ops import triton_depthwise_conv as tdw  # noqa: E402
from mmseg_segman.ops import triton_layer_norm as tln  # noqa: E402
from mmseg_segman.ops import triton_neighborhood_attention as tna  # noqa: E402
from mmseg_segman.ops import triton_pointwise_conv as tpw  # noqa: E402
from mmseg_segman.ops import triton_rotary_embedding as trope  # noqa: E402
from mmseg_segman.ops.neighborhood_attention import reads_planes_faster  # noqa: E402
from mmseg_segman.ops.triton_jit import ALIGNMENT  # noqa: E402

H100 = GPUTarget('cuda', 90, 32)
H100_SHARED_MEMORY = 232448  # bytes a block may use (227 KiB); Triton refuses more at launch
SCAN_FLOAT32_POINTERS = {'a_ptr', 'd_ptr', 'bias_ptr', 'y_ptr', 'ckpt_ptr', 'du_ptr', 'ddelta_ptr',
                         'db_ptr', 'dc_ptr', 'da_ptr', 'dd_ptr', 'dbias_ptr', 'ys_ptr'}
NA_FLOAT32_POINTERS = {'rpb_ptr', 'lse_ptr', 'delta_ptr', 'g_ptr'}
DENSE_FLOAT32_POINTERS = {'bias_ptr', 'mean_ptr', 'var_ptr', 'gamma_ptr', 'beta_ptr'}
LN_FLOAT32_POINTERS = {'w_ptr', 'b_ptr', 'mean_ptr', 'rstd_ptr', 'dw_ptr', 'db_ptr',
                       'partial_ptr'}


def compile_for_h100(kernel, activation: str, float32_pointers, num_warps: int,
                     num_stages: int = 3, asm: str = 'cubin', pointer_types=None,
                     **constexprs) -> bytes:
    """Compile ``kernel`` with the pointers in ``float32_pointers`` to float32, those in
    ``pointer_types`` (name -> element type) to theirs and the other pointers (activations)
    to ``activation``, all 16-byte aligned (as Triton specialises them for PyTorch's
    allocations); returns the ``asm`` (cubin, or e.g. ptx)."""
    pointer_types = pointer_types or {}
    names = kernel.arg_names
    signature, attributes = {}, {}
    for index, name in enumerate(names):
        if name in constexprs:
            signature[name] = 'constexpr'
        elif name in ('eps', 'scale'):
            signature[name] = 'fp32'
        elif name.endswith('_ptr'):
            element = pointer_types.get(name, 'fp32' if name in float32_pointers else activation)
            signature[name] = f'*{element}'
            attributes[(index,)] = [['tt.divisibility', 16]]
        else:
            signature[name] = 'i32'
    source = ASTSource(fn=kernel, signature=signature, attrs=attributes,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    options = {'num_warps': num_warps, 'num_stages': num_stages}
    compiled = triton.compile(source, target=H100, options=options)
    assert compiled.metadata.shared <= H100_SHARED_MEMORY, \
        f'{kernel.fn.__name__} needs {compiled.metadata.shared} bytes of shared memory'
    return compiled.asm[asm]


def vector_accesses(ptx: str) -> Tuple[int, int]:
    """Global loads and stores of several elements a thread, and of one (``ld.global.v4`` and
    the like against plain ``ld.global``)."""
    accesses = re.findall(r'\b(?:ld|st)\.global\S*', ptx)
    vector = sum('.v' in a for a in accesses)
    return vector, len(accesses) - vector


def test_aligned_sizes_give_16_byte_accesses():
    """With ``ALIGN = 8`` (sizes and strides multiples of 8: :func:`triton_jit.alignment`) the
    memory-bound kernels move 16 bytes a thread and access along their rows; with 1, one
    element (PTX: more vector and fewer one-element loads and stores)."""
    kernels = [(tln._ln2d_fwd_kernel, dict(ADDENDS=2, STATS=True, **ln_tile(432))),
               (tln._ln2d_fwd_kernel, dict(ADDENDS=2, STATS=True, **ln_tile(640))),
               (cross._merge_kernel, dict(BLOCK_H=32, BLOCK_W=32)),
               (tpw._pw_fwd_kernel, dict(HAS_BIAS=True, HAS_NORM=False, GELU=True,
                                         GELU_GRAD=False, RELU=False,
                                         HAS_SHORTCUT=False, HAS_SCALE=False, HAS_SHIFT=False,
                                         HAS_SAMPLE=False, SCALE_K=False, DOT_PRECISION='tf32',
                                         BLOCK_O=128, BLOCK_P=256, BLOCK_K=64)),
               (trope._rope_kernel, dict(HEAD_DIM=36, BLOCK_D=64, BLOCK_P=trope.BLOCK_P,
                                         NEGATE_SIN=False, PLANAR=True, PLANAR_OUT=False)),
               (trope._rope_kernel, dict(HEAD_DIM=36, BLOCK_D=64, BLOCK_P=trope.BLOCK_P,
                                         NEGATE_SIN=True, PLANAR=True, PLANAR_OUT=True)),
               (cross._cross_scan_fwd_kernel, dict(STORE_CKPT=False, CKPT=256, BLOCK_D=2,
                                                   BLOCK_L=256)),
               (tbn._bn_fwd_kernel, dict(ACTIVATION='silu', CHUNK=tbn.CHUNK, BLOCK=tbn.BLOCK,
                                         PARTIALS_STEP=tbn.PARTIALS_STEP)),
               (tbn._bn_bwd_dx_kernel, dict(ACTIVATION='silu', CHUNK=tbn.CHUNK, BLOCK=tbn.BLOCK,
                                            PARTIALS_STEP=tbn.PARTIALS_STEP))]
    float32 = LN_FLOAT32_POINTERS | SCAN_FLOAT32_POINTERS | {
        'sin_ptr', 'cos_ptr', 'w_ptr', 'scale_ptr', 'shift_ptr', 'sample_ptr', 'partial_ptr',
        'stats_ptr', 'dwb_ptr'}
    for kernel, constexprs in kernels:
        aligned, unaligned = (vector_accesses(compile_for_h100(kernel, 'bf16', float32, 4, asm='ptx',
                                                               ALIGN=align, **constexprs))
                              for align in (ALIGNMENT, 1))
        assert aligned[0] > unaligned[0] and aligned[1] < unaligned[1], \
            (kernel.fn.__name__, aligned, unaligned)


@pytest.mark.parametrize('activation', ['bf16', 'fp32'])
@pytest.mark.parametrize('length', [128 * 128, 16 * 16])  # SegMAN's stage 1 and decoder at 512x512
@pytest.mark.parametrize('align', [1, ALIGNMENT])  # sizes and strides of any kind; multiples of 8
def test_cross_scan_kernels_compile(activation, length, align):
    block_d, block_l, warps = cross.block_sizes(length)
    bwd_d, bwd_l, bwd_warps = cross.block_sizes(length, backward=True)
    for store_ckpt in (True, False):
        assert compile_for_h100(cross._cross_scan_fwd_kernel, activation, SCAN_FLOAT32_POINTERS,
                                warps, STORE_CKPT=store_ckpt, CKPT=bwd_l, BLOCK_D=block_d,
                                BLOCK_L=block_l, ALIGN=align)
    for atomic_bc in (True, False):
        assert compile_for_h100(cross._cross_scan_bwd_kernel, activation, SCAN_FLOAT32_POINTERS,
                                bwd_warps, BLOCK_D=bwd_d, BLOCK_L=bwd_l, ALIGN=align,
                                ATOMIC_BC=atomic_bc)
    block_h, block_w = cross.MERGE_TILE
    for layout in (cross._merge_kernel, cross._both_orders_kernel):
        assert compile_for_h100(layout, activation, SCAN_FLOAT32_POINTERS, 4,
                                BLOCK_H=block_h, BLOCK_W=block_w, ALIGN=align)
    for inverse in (False, True):
        assert compile_for_h100(cross._direction_order_kernel, activation, set(), 4,
                                INVERSE=inverse, BLOCK_H=block_h, BLOCK_W=block_w, ALIGN=align)
    block_c, block_l = cross.PROJECTION_TILE
    for rank in (6, 40):  # SegMAN-L's stage 1 and 4
        assert compile_for_h100(cross._project_steps_kernel, activation, set(), 4,
                                BLOCK_C=block_c, BLOCK_L=block_l,
                                BLOCK_R=cross.rank_block(rank),
                                DOT_PRECISION='tf32x3' if activation == 'fp32' else 'tf32',
                                ALIGN=align)
        block_r = cross.rank_block(rank)
        block_c, block_l, warps, _ = cross.projection_backward_launch(block_r)
        assert compile_for_h100(cross._project_steps_bwd_kernel, activation,
                                {'dd_ptr', 'w_ptr', 'part_ptr'}, warps, BLOCK_C=block_c,
                                BLOCK_L=block_l, BLOCK_R=block_r,
                                DOT_PRECISION='tf32x3' if activation == 'fp32' else 'tf32',
                                ALIGN=align)


# other blocks of tools/gpu_checks/check_cross_selective_scan.py --sweep: the reversed scans of a
# (BLOCK_D, BLOCK_L) tile, the forward's checkpoints every CKPT steps across its tiles
@pytest.mark.parametrize('block_d,block_l,warps', [(1, 128, 4), (4, 256, 8), (8, 16, 4)])
def test_cross_scan_kernels_compile_at_other_blocks(block_d, block_l, warps):
    assert compile_for_h100(cross._cross_scan_bwd_kernel, 'bf16', SCAN_FLOAT32_POINTERS, warps,
                            BLOCK_D=block_d, BLOCK_L=block_l, ALIGN=ALIGNMENT, ATOMIC_BC=True)
    assert compile_for_h100(cross._cross_scan_fwd_kernel, 'bf16', SCAN_FLOAT32_POINTERS, warps,
                            STORE_CKPT=True, CKPT=512 // block_l, BLOCK_D=block_d,
                            BLOCK_L=block_l, ALIGN=ALIGNMENT)


# SegMAN-B stage 1 and S stage 3; float32 (three TF32 products a dot) compiles slowly: one shape
@pytest.mark.parametrize('activation,head_dim,kernel_size', [('bf16', 24, 11), ('bf16', 36, 7),
                                                             ('fp32', 24, 11)])
def test_neighborhood_attention_kernels_compile(activation, head_dim, kernel_size):
    fwd, dq, dkdv = tna.block_sizes(head_dim, kernel_size)
    common = dict(HEAD_DIM=head_dim, KERNEL=kernel_size, HAS_RPB=True, BLOCK_D=tna._head_block(head_dim),
                  DOT_PRECISION='tf32x3' if activation == 'fp32' else 'tf32',
                  **na_layouts(kernel_size, 4))
    assert compile_for_h100(tna._na_fwd_kernel, activation, NA_FLOAT32_POINTERS,
                            fwd.num_warps, fwd.num_stages,
                            TILE_H=fwd.tile_h, TILE_W=fwd.tile_w,
                            BIAS_SHIFT=tna.bias_shift(fwd.tile_w),
                            **tna.forward_step(fwd, kernel_size), **common)
    assert compile_for_h100(tna._na_bwd_dq_kernel, activation, NA_FLOAT32_POINTERS,
                            dq.num_warps, dq.num_stages, LAYOUT_DO=tna.PLANES,
                            STORE_G=True, PAIRS=True, TILE_H=dq.tile_h, TILE_W=dq.tile_w,
                            BLOCK_N=dq.columns, **common)
    assert compile_for_h100(tna._na_bwd_dkdv_kernel, activation, NA_FLOAT32_POINTERS,
                            dkdv.num_warps, dkdv.num_stages, LAYOUT_DO=tna.PLANES,
                            TILE_H=dkdv.tile_h, TILE_W=dkdv.tile_w, BLOCK_M=dkdv.columns, **common)


def na_layouts(kernel_size: int, align: int) -> dict:
    """The attention kernels' layout constexprs as SegMAN passes its tensors: q and k as the
    rotary embedding writes them for this window, v and the outputs as planes of a map."""
    queries = tna.PLANES if reads_planes_faster(kernel_size) else tna.HEAD_VECTORS
    return dict(LAYOUT_Q=queries, LAYOUT_K=queries, LAYOUT_V=tna.PLANES, LAYOUT_O=tna.PLANES,
                ALIGN=align, WIDTH_ALIGN=align, BOX_ALIGN=align)


def test_aligned_attention_loads_are_pipelined():
    """With aligned strides (``ALIGN``, :func:`triton_neighborhood_attention.load_alignment`)
    the attention's kernels load their keys and values (forward, ``dq``) or queries and output
    gradients (``dk``/``dv``) 8 bytes or more a thread, the loads feeding the products by
    ``cp.async``, which Triton pipelines; with 1, one element (2 bytes) a load, and those not
    by ``cp.async`` (SegMAN-L's forward at stage 3: 159 -> 94 us on an H200,
    docs/benchmarks.md)."""
    for kernel, extra in ((tna._na_fwd_kernel, dict(ROWS=1, COLS=16, BIAS_SHIFT=14)),
                          (tna._na_bwd_dq_kernel, dict(STORE_G=True, PAIRS=True, BLOCK_N=16,
                                                       LAYOUT_DO=tna.PLANES)),
                          (tna._na_bwd_dkdv_kernel, dict(BLOCK_M=16, LAYOUT_DO=tna.PLANES))):
        ptx = {align: compile_for_h100(
            kernel, 'bf16', NA_FLOAT32_POINTERS, 4, 2, asm='ptx', HEAD_DIM=36, KERNEL=7,
            HAS_RPB=True, BLOCK_D=64, DOT_PRECISION='tf32', TILE_H=8, TILE_W=8,
            **na_layouts(7, align), **extra) for align in (4, 1)}
        assert ptx[4].count('cp.async.c') > ptx[1].count('cp.async.c'), kernel.fn.__name__
        assert re.search(r'ld\.global\.b16', ptx[1]) and not re.search(r'ld\.global\.b16', ptx[4]), \
            kernel.fn.__name__


@pytest.mark.parametrize('kernel_size,head_dim', [(7, 36), (11, 24)])
@pytest.mark.parametrize('kind', ['fwd', 'dq'])
def test_attention_kernels_load_their_bias_16_bytes_a_load(kind, kernel_size, head_dim):
    """The attention's forward and ``dq`` read their bias from
    :func:`triton_neighborhood_attention.bias_table`, a row of contiguous values a (query,
    box row) pair: float32 in 16-byte loads without masks (they gathered one 4-byte value a
    pair from ``rpb``: the forward 8 loads a thread a step at windows of 7 where it now takes
    2). ``dq`` also loads ``G``, the log-sum-exp and ``delta`` 4 bytes at a time."""
    blocks = dict(zip(('fwd', 'dq'), tna.block_sizes(head_dim, kernel_size)))[kind]
    kernel, extra = {
        'fwd': (tna._na_fwd_kernel, dict(BIAS_SHIFT=tna.bias_shift(blocks.tile_w),
                                         **tna.forward_step(blocks, kernel_size))),
        'dq': (tna._na_bwd_dq_kernel, dict(
            STORE_G=True, PAIRS=True, BLOCK_N=blocks.columns, LAYOUT_DO=tna.PLANES,
            BIAS_SHIFT=tna.bias_shift(blocks.tile_w), BIAS_COLS=blocks.columns)),
    }[kind]
    ptx = compile_for_h100(
        kernel, 'bf16', NA_FLOAT32_POINTERS, blocks.num_warps, blocks.num_stages, asm='ptx',
        HEAD_DIM=head_dim, KERNEL=kernel_size, HAS_RPB=True, BLOCK_D=tna._head_block(head_dim),
        DOT_PRECISION='tf32', TILE_H=blocks.tile_h, TILE_W=blocks.tile_w,
        **na_layouts(kernel_size, 4), **extra)
    assert 'ld.global.v4.b32' in ptx
    assert kind == 'dq' or not re.search(r'ld\.global(\.nc)?\.b32', ptx)


# SegMAN-L's stem convolutions (with their norms and GELUs, writing channels-last for the next
# one), its decoder's 5x5 stride-4 one (compiled in 68 s on this machine while the kernel was
# unrolled over the taps, in 0.2 s as one loop: twenty-second session) with its norm and ReLU,
# and a downsampling one (NCHW out)
@pytest.mark.parametrize('activation', ['bf16', 'fp32'])
@pytest.mark.parametrize('channels,out_channels,kernel,stride,padding,out_channels_last,act', [
    (3, 48, 3, 2, 1, True, 'gelu'), (48, 48, 3, 1, 1, True, 'gelu'),
    (224, 896, 5, 4, 1, False, 'relu'), (432, 640, 3, 2, 1, False, None)])
def test_dense_conv_kernel_compiles(activation, channels, out_channels, kernel, stride, padding,
                                    out_channels_last, act):
    config = tdc.launch_config(channels, out_channels, 4 if activation == 'fp32' else 2)
    assert compile_for_h100(
        tdc._dense_conv_kernel, activation, DENSE_FLOAT32_POINTERS, config.num_warps,
        config.num_stages, CHANNELS=channels, OUT_CHANNELS=out_channels, KERNEL_H=kernel,
        KERNEL_W=kernel, STRIDE_H=stride, STRIDE_W=stride, PAD_H=padding, PAD_W=padding,
        OUT_CHANNELS_LAST=out_channels_last, HAS_BIAS=False, HAS_NORM=True, ACTIVATION=act,
        DOT_PRECISION='tf32', BLOCK_P=config.block_p, BLOCK_O=config.block_o,
        BLOCK_K=config.block_k, ALIGN=ALIGNMENT)


def ln_tile(channels: int) -> dict:
    """The layer norm forward's constexprs for a channel count (:func:`tln.tiling`)."""
    return tln.tile_constexprs(tln.tiling(channels))


@pytest.mark.parametrize('activation', ['bf16', 'fp32'])
@pytest.mark.parametrize('align', [1, ALIGNMENT])
@pytest.mark.parametrize('channels', [96, 432, 640])  # SegMAN-L's stages 1, 3 (in registers), 4
def test_layer_norm_forward_compiles(activation, align, channels):
    for addends in (0, 2):  # the blocks' norms; LASS's norm with its two sums
        assert compile_for_h100(tln._ln2d_fwd_kernel, activation, LN_FLOAT32_POINTERS,
                                tln.tiling(channels).num_warps, ADDENDS=addends, ALIGN=align,
                                **ln_tile(channels))


@pytest.mark.parametrize('activation', ['bf16', 'fp32'])
@pytest.mark.parametrize('align', [1, ALIGNMENT])
def test_layer_norm_backward_compiles(activation, align):
    chunks = tln.CHUNKS  # the backward's, at every channel count
    for atomic in (True, False):  # partial sums added into shared rows, or stored
        assert compile_for_h100(tln._ln2d_bwd_kernel, activation, LN_FLOAT32_POINTERS,
                                chunks.num_warps, BLOCK_C=chunks.block_c, BLOCK_P=chunks.block_p,
                                ALIGN=align, ATOMIC=atomic)


# the activations at bf16 with aligned sizes (the model's case); float32 and unaligned with two
@pytest.mark.parametrize('dtype,align,activations', [
    ('bf16', ALIGNMENT, (None, 'silu', 'gelu', 'relu')), ('bf16', 1, ('silu', 'gelu')),
    ('fp32', ALIGNMENT, ('silu', 'relu')), ('fp32', 1, (None, 'gelu'))])
def test_batch_norm_kernels_compile(dtype, align, activations):
    float32 = {'w_ptr', 'b_ptr', 'partial_ptr', 'stats_ptr', 'dwb_ptr'}
    blocks = dict(CHUNK=tbn.CHUNK, BLOCK=tbn.BLOCK, ALIGN=align)
    assert compile_for_h100(tbn._bn_stats_kernel, dtype, float32, tbn.NUM_WARPS, **blocks)
    for activation in activations:
        assert compile_for_h100(tbn._bn_fwd_kernel, dtype, float32, tbn.NUM_WARPS,
                                ACTIVATION=activation, PARTIALS_STEP=tbn.PARTIALS_STEP, **blocks)
        assert compile_for_h100(tbn._bn_bwd_sums_kernel, dtype, float32, tbn.NUM_WARPS,
                                ACTIVATION=activation, **blocks)
        assert compile_for_h100(tbn._bn_bwd_dx_kernel, dtype, float32, tbn.NUM_WARPS,
                                ACTIVATION=activation, PARTIALS_STEP=tbn.PARTIALS_STEP, **blocks)


@pytest.mark.parametrize('dtype', ['bf16', 'fp32'])
@pytest.mark.parametrize('align', [1, ALIGNMENT])
def test_cross_entropy_kernels_compile(dtype, align):
    float32 = {'loss_ptr', 'lse_ptr', 'dloss_ptr'}
    blocks = dict(BLOCK_K=tce.BLOCK_K, BLOCK_P=tce.BLOCK_P, ALIGN=align)
    for kernel in (tce._ce_fwd_kernel, tce._ce_bwd_kernel):
        # label_ptr, pred_ptr: int64; the logits and their gradient in dtype
        pointers = {name: 'i64' for name in ('label_ptr', 'pred_ptr')}
        assert compile_for_h100(kernel, dtype, float32, tce.NUM_WARPS, pointer_types=pointers,
                                **blocks)


@pytest.mark.parametrize('activation', ['bf16', 'fp32'])
@pytest.mark.parametrize('kernel', [3, 5])
def test_depthwise_conv_kernels_compile(activation, kernel):
    float32 = {'w_ptr', 'b_ptr', 'partial_ptr'}
    norm_pointers = {'mean_ptr', 'var_ptr', 'gamma_ptr', 'beta_ptr'}
    for width in (128, 32):  # SegMAN-B's stage 1 and 3 at 512x512: both tile shapes
        batches, block_w = tdw.tile_shape(width, tdw.CONVOLUTION_TILE.elements, 16)
        # the forward, the input gradient, LASS's convolution with its norm and SiLU
        for flip, norm in ((False, False), (True, False), (False, True)):
            assert compile_for_h100(tdw._dw_fwd_kernel, activation, float32 | norm_pointers,
                                    tdw.NUM_WARPS, KERNEL=kernel, HAS_BIAS=not flip, FLIP=flip,
                                    RESIDUAL=not norm, HAS_NORM=norm, SILU=norm, NB=batches,
                                    BLOCK_W=block_w, UNROLL=tdw.CONVOLUTION_TILE.unroll)
        elements, unroll = tdw.WEIGHT_GRADIENT_TILES[kernel]
        batches, block_w = tdw.tile_shape(width, elements, 8)
        for atomic in (True, False):  # partial sums added into shared rows, or stored
            assert compile_for_h100(tdw._dw_bwd_weight_kernel, activation, float32,
                                    tdw.NUM_WARPS, KERNEL=kernel, NB=batches, BLOCK_W=block_w,
                                    UNROLL=unroll, SLOTS=tdw.next_power_of_2(kernel * kernel + 1),
                                    ATOMIC=atomic)


@pytest.mark.parametrize('activation', ['bf16', 'fp32'])
@pytest.mark.parametrize('out_channels', [32, 384])  # both output tiles (64 and 128 channels)
@pytest.mark.parametrize('channels', [96, 1536])  # resident programs in 16 bits, or not
def test_pointwise_conv_kernels_compile(activation, out_channels, channels):
    float32 = {'w_ptr', 'bias_ptr', 'scale_ptr', 'shift_ptr', 'sample_ptr', 'mean_ptr',
               'var_ptr', 'gamma_ptr', 'beta_ptr'}
    element_size = 4 if activation == 'fp32' else 2
    precision = 'tf32x3' if activation == 'fp32' else 'tf32'
    config = tpw.launch_config(channels, out_channels, 64 * 64, element_size)
    assert config.resident == (element_size == 2 and channels == 96)
    common = dict(DOT_PRECISION=precision, BLOCK_O=config.block_o, BLOCK_P=config.block_p,
                  BLOCK_K=config.block_k, RESIDENT=bool(config.resident), ALIGN=ALIGNMENT)
    # the FFN's first convolution, a block's last one, the gradient before the GELU, dx
    # and a decode head's ConvModule at inference (its norm and ReLU)
    for gelu, residual, gelu_grad, transposed, norm in ((True, False, False, False, False),
                                                        (False, True, False, False, False),
                                                        (False, False, True, False, False),
                                                        (False, False, False, True, False),
                                                        (False, False, False, False, True)):
        assert compile_for_h100(tpw._pw_fwd_kernel, activation, float32, config.num_warps,
                                config.num_stages, HAS_BIAS=not transposed, HAS_NORM=norm,
                                GELU=gelu, GELU_GRAD=gelu_grad, RELU=norm, HAS_SHORTCUT=residual,
                                HAS_SCALE=residual or gelu_grad, HAS_SHIFT=residual,
                                HAS_SAMPLE=residual or gelu_grad or transposed,
                                SCALE_K=transposed, **common)
    # the per-sample products and sums are float32 whatever the activations' dtype
    gradients = {'g_ptr', 's_ptr', 'dw_ptr', 'dbias_ptr', 'dscale_ptr', 'dshift_ptr'}
    assert compile_for_h100(tpw._pw_param_grad_kernel, activation, float32 | gradients, 4,
                            HAS_SAMPLE=True, HAS_BIAS=True, HAS_SCALE=True,
                            BLOCK_O=tpw.PARAM_BLOCK_O, BLOCK_C=tpw.PARAM_BLOCK_C)


@pytest.mark.parametrize('activation', ['bf16', 'fp32'])
@pytest.mark.parametrize('head_dim', [24, 36])  # SegMAN-B's stage 1 and SegMAN-T's stage 3
def test_rotary_embedding_kernel_compiles(activation, head_dim):
    # the forward on views of the qkv map (planar, aligned), the backward on the attention's
    # gradients (planar) into qkv's layout, and on contiguous gradients, unaligned
    for inverse, planar, align in ((False, True, ALIGNMENT), (True, True, ALIGNMENT),
                                   (True, False, 1)):
        assert compile_for_h100(trope._rope_kernel, activation, {'sin_ptr', 'cos_ptr'},
                                trope.NUM_WARPS, HEAD_DIM=head_dim,
                                BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_P=trope.BLOCK_P,
                                NEGATE_SIN=inverse, PLANAR=planar, PLANAR_OUT=inverse and planar,
                                ALIGN=align)
