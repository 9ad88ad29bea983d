"""The fused Triton neighborhood attention against the PyTorch reference.

Values and gradients (q, k, v, rpb) run in Triton's CPU interpreter, in a subprocess since
``TRITON_INTERPRET=1`` must be set before Triton is imported: odd sizes, maps smaller than
the window, batch 1, strided inputs, batch groups and pairs of the bias gradient. Sizes are
small (the interpreter runs every program in Python) and the tiles too, so that a map spans
several tiles. float16 stands in for the 16-bit types: bfloat16 runs in the GPU check
(``tools/gpu_checks/check_neighborhood_attention.py``), since in Triton 3.8's interpreter our
bfloat16 run overflows in ``exp2`` (not investigated further). That the kernels compile for
the H100 is checked with the scan's in ``test_triton_compile.py``.
"""

import pytest

triton = pytest.importorskip('triton')

import torch  # noqa: E402

# batch, heads, H, W, head dim, kernel, rpb, strided q/k/v (True: all three planes of one qkv
# map; 'mixed': v so, q and k with contiguous head vectors, as the model passes them)
CASES = [
    (2, 2, 9, 11, 8, 5, True, False),    # both axes longer than the window, two tiles each
    (1, 1, 4, 13, 16, 7, True, True),    # rows shorter than the window
    (1, 2, 6, 5, 20, 7, True, False),    # both axes shorter than the window; d not a power of 2
    (2, 1, 7, 9, 8, 3, False, True),     # no rpb
    # rows of planes loaded aligned: the forward's boxes widened to multiples of 4 columns
    (1, 2, 6, 24, 8, 5, True, True),
    (2, 1, 5, 16, 12, 7, True, 'mixed'),
    (1, 1, 13, 18, 8, 11, True, False),  # windows of 11 (4 x 16 tiles, boxes 32 columns a row)
]
WIDE_BOX = (1, 1, 5, 21, 8, 7, True, False)  # boxes 19 columns wide for tiles 16 wide


def reference_and_triton(case, dtype, blocks=None):
    """Output and gradients of the float64 reference and of the Triton kernels in ``dtype``."""
    from mmseg_segman.ops.neighborhood_attention import _neighborhood_attention_torch
    from mmseg_segman.ops.triton_neighborhood_attention import Blocks, neighborhood_attention_triton

    batch, heads, height, width, dim, kernel, use_rpb, strided = case
    g = torch.Generator().manual_seed(sum(case[:6]))
    if strided:  # views of one (B, 3, heads, d, H, W) tensor, as the model's qkv projection
        q, k, v = torch.randn(batch, 3, heads, dim, height, width, generator=g,
                              dtype=torch.float64).permute(1, 0, 2, 4, 5, 3)
        if strided == 'mixed':
            q, k = q.contiguous(), k.contiguous()
    else:
        q, k, v = (torch.randn(batch, heads, height, width, dim, generator=g, dtype=torch.float64)
                   for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g, dtype=torch.float64)
    grad_out = torch.randn(batch, heads, height, width, dim, generator=g, dtype=torch.float64)
    results = []
    for fn, cast in ((_neighborhood_attention_torch, torch.float64), (neighborhood_attention_triton, dtype)):
        leaves = [t.to(cast).detach().requires_grad_() for t in (q, k, v)]
        bias = rpb.float().detach().requires_grad_() if use_rpb else None
        extra = {} if fn is _neighborhood_attention_torch else dict(
            blocks=blocks or (Blocks(8, 8, 32, 4, 1),) * 3)
        out = fn(*leaves, kernel, bias, **extra)
        out.backward(grad_out.to(out.dtype))
        results.append([out] + [t.grad for t in leaves] + ([bias.grad] if use_rpb else []))
    return results


def relative_errors(case, dtype, blocks=None):
    ref, fast = reference_and_triton(case, dtype, blocks)
    return [((x.double() - r.double()).norm() / r.double().norm()).item() for x, r in zip(fast, ref)]


def check_eager_path():
    """Eager calls skip the custom ops (host time) and match them bitwise; torch.compile
    traces the custom ops (see :func:`triton_interpreter.check_eager_calls_skip_custom_ops`)."""
    from triton_interpreter import check_eager_calls_skip_custom_ops

    from mmseg_segman.ops.triton_neighborhood_attention import (Blocks, bias_table,
                                                                neighborhood_attention_triton)
    blocks = (Blocks(4, 4, 16, 4, 1),) * 3
    launch = [n for b in blocks for n in b]
    g = torch.Generator().manual_seed(5)
    q, k, v, grad_out = (torch.randn(1, 2, 5, 6, 8, generator=g) for _ in range(4))
    for rpb in (torch.randn(2, 5, 5, generator=g), None):
        check_eager_calls_skip_custom_ops(
            lambda *t: neighborhood_attention_triton(*t[:3], 3, t[3], blocks),
            lambda *t: torch.ops.mmseg_segman.na2d_forward(
                *t, None if t[3] is None else bias_table(t[3], 3, 4, 16), 3, launch)[0],
            (q, k, v, rpb), grad_out, ('na2d_forward', 'na2d_backward'))
    print('eager path and torch.compile: ok', flush=True)


def interpreter_checks():
    """Run in the interpreter subprocess; prints one line per check, then 'all checks passed'."""
    from mmseg_segman.ops import neighborhood_attention as na
    from mmseg_segman.ops import triton_neighborhood_attention as tna

    for case in CASES:
        errors = relative_errors(case, torch.float32)
        print(case, ['%.1e' % e for e in errors], flush=True)
        assert max(errors) < 1e-5, (case, errors)
    # rows of the box wider than the columns a step of the backward: each row in two steps
    # (the forward takes whole rows a step, and refuses a part of one; CASES' 8 x 8 tiles
    # with 32 keys a step take two rows of 16 a step at windows up to 9)
    narrow = tna.Blocks(4, 16, 16, 4, 1)
    errors = relative_errors(WIDE_BOX, torch.float32, (tna.Blocks(4, 16, 32, 4, 1), narrow, narrow))
    print('two steps a row', ['%.1e' % e for e in errors], flush=True)
    assert max(errors) < 1e-5, errors
    try:
        relative_errors(WIDE_BOX, torch.float32, (narrow,) * 3)
    except ValueError as e:
        assert 'must be a multiple of 32' in str(e), e
    else:
        raise AssertionError('the forward took 16 columns a step for boxes 22 wide')
    errors = relative_errors(CASES[0], torch.float16)
    print('float16', ['%.1e' % e for e in errors], flush=True)
    assert max(errors) < 5e-3, errors
    # the bias gradient over batch groups and pairs (G's budget in elements; CASES[0]'s G
    # takes 4950 a group): 3 elements as two groups of a pair, the second pair's second
    # element missing; 5 as one group (pairs added to G, the last one's second missing); 4
    # as two groups of a pair
    budget = tna.G_BUDGET
    for batch, g_budget in ((3, budget), (5, 1), (4, 2 * 4950)):
        tna.G_BUDGET = g_budget
        try:
            grouped = relative_errors((batch, ) + CASES[0][1:], torch.float32)
        finally:
            tna.G_BUDGET = budget
        print(f'batch {batch}, G budget {g_budget}', ['%.1e' % e for e in grouped], flush=True)
        assert max(grouped) < 1e-5, grouped
    # the dispatcher picks the Triton backend for these inputs under the interpreter
    q = torch.randn(1, 1, 5, 5, 16)
    assert na._neighborhood_attention.select(q, q, q, 3, None) == 'triton'
    # the torch.library op: schema, fake (meta) shapes, autograd, dynamic shapes
    q, k, v = (torch.randn(1, 2, 5, 4, 8, requires_grad=True) for _ in range(3))
    blocks = [n for b in (tna.Blocks(8, 8, 32, 4, 1),) * 3 for n in b]
    for rpb in (torch.randn(2, 5, 5, requires_grad=True), None):
        table = None if rpb is None else tna.bias_table(rpb, 3, 8, 16)
        torch.library.opcheck(torch.ops.mmseg_segman.na2d_forward,
                              (q, k, v, rpb, table, 3, blocks))
    rpb = torch.randn(2, 5, 5)
    for table in (tna.bias_table(rpb, 3, 8, 32), None):  # a table for other rows, or none
        try:
            torch.ops.mmseg_segman.na2d_forward(q, k, v, rpb, table, 3, blocks)
        except ValueError as e:
            assert 'must be bias_table(rpb, 3, 8, 16)' in str(e), e
        else:
            raise AssertionError(f'the forward took the bias table {table} for rows of 16')
    print('custom op: ok')
    check_eager_path()
    print('all checks passed')


def test_triton_neighborhood_attention_in_interpreter():
    # imported here, not at the top: this file also runs as a script in the interpreter
    from .triton_interpreter import assert_checks_pass_in_interpreter
    assert_checks_pass_in_interpreter(__file__, timeout=600)


def test_not_chosen_on_cpu_without_interpreter(monkeypatch):
    from mmseg_segman.ops import neighborhood_attention as na
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    q = torch.randn(1, 1, 5, 5, 16)
    reason = na._neighborhood_attention.backends['triton'].unavailable(q, q, q, 3, None)
    assert 'needs CUDA tensors' in reason
    assert na._neighborhood_attention.select(q, q, q, 3, None) == 'torch'


def test_load_alignment():
    """The loads are aligned where every stride and the map's width allow it and, for rows of
    keys (or of queries, in the ``dk``/``dv`` kernel) held as planes, where no box widened to
    the alignment takes more steps: SegMAN-L's stages at 512x512 (windows 11, 9, 7, 7) as the
    model lays them out; none on an odd width. The other variant that the first launch
    compiles is the one other sizes launch: two variants a launch shape over all sizes."""
    from mmseg_segman.ops import triton_neighborhood_attention as tna

    def alignment(channels, heads, size, kernel, with_others=False):
        qkv = torch.empty(2, 3 * channels, size, size)
        dim = channels // heads
        q, k, v = (t.view(2, heads, dim, size, size).permute(0, 1, 3, 4, 2)
                   for t in qkv.split(channels, 1))
        out = tna.empty_channels_first(q)
        fwd, dq, dkdv = tna.block_sizes(dim, kernel)
        found, others = set(), set()
        for queries in (q, q.contiguous()):
            launches = [
                tna.load_alignment(dict(Q=queries, K=queries, V=v, O=out), 'KV', kernel,
                                   fwd.tile_w, tna.box_columns(fwd.tile_w, kernel)),
                tna.load_alignment(dict(Q=queries, K=queries, V=v, O=out, DO=out), 'KV', kernel,
                                   dq.tile_w, dq.columns),
                tna.load_alignment(dict(Q=queries, K=queries, V=v, O=out, DO=out), ('Q', 'DO'),
                                   kernel, dkdv.tile_w, dkdv.columns, inverse=True)]
            for constexprs, other in launches:
                assert constexprs['LAYOUT_V'] == constexprs['LAYOUT_O'] == tna.PLANES
                assert constexprs['LAYOUT_Q'] == (tna.PLANES if queries is q else tna.HEAD_VECTORS)
                found.add(tuple(constexprs[key] for key in ('ALIGN', 'WIDTH_ALIGN', 'BOX_ALIGN')))
                others.add(tuple(other[key] for key in ('ALIGN', 'WIDTH_ALIGN', 'BOX_ALIGN')))
        return (found, others) if with_others else found

    # windows of 9 and 7 on 8 x 8 tiles: boxes from x0 - 4 to x0 + 12 and from x0 - 3 to x0 +
    # 11 (of queries: x0 - 4 to x0 + 12 and x0 - 3 to x0 + 11), 24 wide at 8-aligned ends
    assert [alignment(*stage) for stage in ((96, 4, 128, 11), (192, 8, 64, 9), (432, 12, 32, 7),
                                            (640, 20, 16, 7), (432, 12, 33, 7))] == \
        [{(8, 8, 8)}, {(4, 4, 4)}, {(4, 4, 4)}, {(4, 4, 4)}, {(1, 1, 1)}]
    # one alignment a launch shape or none: each kernel compiles at most twice over map sizes,
    # both at its first launch (the other variant is the one the other sizes launch)
    for channels, heads, kernel in ((96, 4, 11), (192, 8, 9), (432, 12, 7)):
        variants = [alignment(channels, heads, size, kernel, with_others=True)
                    for size in range(kernel, 80)]
        launched = set().union(*(found for found, _ in variants))
        assert len(launched) == 2
        for found, others in variants:
            assert found | others == launched
    contiguous = torch.empty(2, 3, 33, 33, 36)  # head vectors 36 long: 8-byte aligned rows
    constexprs, _ = tna.load_alignment(dict(Q=contiguous, K=contiguous), 'K', 7, 8, 16)
    assert (constexprs['ALIGN'], constexprs['WIDTH_ALIGN'], constexprs['BOX_ALIGN']) == (4, 1, 1)


def test_window_class_of_every_query():
    """The bias-gradient fold groups queries by the bias row of their window's first key."""
    from mmseg_segman.ops.neighborhood_attention import _axis_windows
    from mmseg_segman.ops.triton_neighborhood_attention import _window_class_one_hot
    for length, kernel in [(20, 7), (7, 7), (4, 7), (9, 3), (1, 5)]:
        _, bias_rows = _axis_windows(length, kernel, None)
        classes = _window_class_one_hot(length, kernel, torch.device('cpu')).argmax(1)
        assert torch.equal(classes, bias_rows[:, 0]), (length, kernel)


def test_sizes_and_strides_are_not_specialised():
    """Every int argument that changes with the input size is a runtime value, so a new
    input size reuses the compiled kernels (on the H100, before this: 3.5 s of compilation
    at each of three new map sizes). The attention's column strides (``s*_x``) are
    specialised: they follow the layout and the head dim, never the map's size."""
    from mmseg_segman.ops import triton_cross_selective_scan as scan
    from mmseg_segman.ops import triton_neighborhood_attention as tna
    for kernel, sizes in ((tna._na_fwd_kernel, {'height', 'width'}),
                          (tna._na_bwd_dq_kernel, {'height', 'width'}),
                          (tna._na_bwd_dkdv_kernel, {'height', 'width'}),
                          (scan._cross_scan_fwd_kernel, {'length'}),
                          (scan._cross_scan_bwd_kernel, {'length'}),
                          (scan._merge_kernel, {'height', 'width'})):
        ints = [n for n in kernel.arg_names if not n.endswith('_ptr') and not n.isupper()
                and not (kernel.fn.__name__.startswith('_na_') and n.endswith('_x'))]
        runtime = {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
        assert sizes <= runtime, kernel.fn.__name__
        assert set(ints) <= runtime, kernel.fn.__name__


if __name__ == '__main__':
    interpreter_checks()
