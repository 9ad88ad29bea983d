"""2-D neighborhood attention with relative position bias (NATTEN 0.17 rules, dilation 1).

Each query at ``(i, j)`` attends to the ``k x k`` keys of a window that is centred on it
and shifted inward at the borders, so it always holds ``k`` keys per axis. On an axis of
length ``n`` (``r = k // 2``) the window starts at::

    s(i) = max(i - r, 0) + (i + r >= n) * (n - i - r - 1)

and key ``m`` of the axis is biased by ``rpb[..., m - i + k - 1]`` (the NATTEN index
``p(i) + j`` for key ``j`` of the window). Where an axis is shorter than the kernel
(NATTEN refuses such inputs), the window is the whole axis, biased by the same rule.

Backends, in the order they are tried: ``triton`` (our fused kernels, forward and backward,
rpb included: queries tiled in 2-D, each tile visiting only the keys of its windows; see
:mod:`.triton_neighborhood_attention`), ``natten`` (natten's ``na2d`` on CUDA with its fused
kernels, i.e. where natten was installed with libnatten; only without rpb, which natten
0.20+ dropped), ``flex`` (PyTorch FlexAttention on CUDA: these rules as a block mask, the bias
as a score modifier, one fused compiled kernel forward and backward) and ``torch`` (the
pure-PyTorch reference, one window row offset at a time with its own backward, so that its
memory stays a small multiple of the inputs'). FlexAttention's block mask works on blocks of
128 row-major tokens and computes most scores only to mask them, and it compiles anew for
every map size; the Triton kernels take sizes at run time.
"""
from functools import lru_cache
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .dispatch import (TRITON_DTYPES, Backend, OpDispatcher, cast, promote_types, runs_anywhere,
                       tensor_cache, triton_unavailable)


def window_starts(length: int, kernel_size: int, device=None) -> Tensor:
    """``(length,)`` index of the first key of each query's window on one axis (0 on an axis
    no longer than the window: the rule's value there is at most 0)."""
    i = torch.arange(length, device=device)
    r = kernel_size // 2
    return ((i - r).clamp(min=0) + (i + r >= length) * (length - i - r - 1)).clamp(min=0)


def _axis_windows(length: int, kernel_size: int, device):
    """Key indices ``(length, k')`` and bias indices ``(length, k')`` on one axis."""
    span = min(kernel_size, length)
    keys = window_starts(length, kernel_size, device)[:, None] + torch.arange(span, device=device)
    bias = keys - torch.arange(length, device=device)[:, None] + kernel_size - 1
    return keys, bias


TILE = 8  # queries per tile side in the reference


def _axis_tiles(length: int, kernel_size: int, tile: int, device):
    """One axis cut into tiles of ``tile`` queries, each with the run of keys its windows use.

    Window starts never decrease and grow by at most one per query, so the windows of a tile
    lie in ``region = tile + k - 1`` keys from ``max(min(s(first query), length - region), 0)``
    (on an axis shorter than ``region`` the keys past its end are masked out). No size here
    depends on ``length`` but through the number of tiles, so that a traced graph (ONNX export)
    serves every size. Returns, for tiles ``(t, tile)`` of queries (the last tile padded with
    the last query) and keys ``(t, region)``: the query index ``(t, tile)``, the key index
    ``(t, region)`` (clamped into the axis), whether each key is in each query's window
    ``(t, tile, region)`` and its bias index ``(t, tile, region)`` (clamped where it is not in
    the window).
    """
    region = tile + kernel_size - 1
    tiles = (length + tile - 1) // tile  # not -(-a // b): ONNX integer division truncates
    queries = (torch.arange(tiles * tile, device=device).clamp(max=length - 1)).view(tiles, tile)
    starts = window_starts(length, kernel_size, device)[queries]  # (t, tile)
    first = starts[:, 0].clamp(max=length - region).clamp(min=0)
    keys = first[:, None] + torch.arange(region, device=device)  # (t, region)
    offset = keys[:, None, :] - starts[:, :, None]  # key - window start
    # in the window: k keys from its start, fewer where the axis ends first
    inside = (offset >= 0) & (offset < kernel_size) & (keys < length)[:, None, :]
    bias = (keys[:, None, :] - queries[:, :, None] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)
    return queries, keys.clamp(max=length - 1), inside, bias


def _tiles(t: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``(B, heads, H, W, d)`` -> ``(B, heads, rt, ct, r * c, d)``: the entries at ``rows``
    ``(rt, r)`` by ``cols`` ``(ct, c)``."""
    batch, heads, _, _, dim = t.shape
    picked = t.index_select(2, rows.reshape(-1)).index_select(3, cols.reshape(-1))
    picked = picked.view(batch, heads, *rows.shape, *cols.shape, dim).transpose(3, 4)
    return picked.reshape(batch, heads, rows.size(0), cols.size(0), -1, dim)


def _grid(row_table: Tensor, col_table: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-axis tables ``(rt, r, rr)`` and ``(ct, c, cc)`` broadcast to ``(rt, ct, r, c, rr, cc)``."""
    return row_table[:, None, :, None, :, None], col_table[None, :, None, :, None, :]


def _neighborhood_attention_torch(q: Tensor, k: Tensor, v: Tensor, kernel_size: int,
                                  rpb: Optional[Tensor]) -> Tensor:
    """Tiles of ``TILE x TILE`` queries attend to the keys their windows span (a region of at
    most ``(TILE + k - 1)**2`` keys), keys outside each query's window masked out: dense
    matrix products on copies of about ``((TILE + k - 1) / TILE)**2`` times k and v, instead of
    gathering the ``k * k`` neighbours of every query."""
    batch, heads, height, width, dim = q.shape
    q_rows, k_rows, in_rows, bias_rows = _axis_tiles(height, kernel_size, TILE, q.device)
    q_cols, k_cols, in_cols, bias_cols = _axis_tiles(width, kernel_size, TILE, q.device)
    logits = _tiles(q, q_rows, q_cols) @ _tiles(k, k_rows, k_cols).transpose(-1, -2)
    shape = logits.shape[2:]  # (rt, ct, queries per tile, keys per region)
    if rpb is not None:
        rows, cols = _grid(bias_rows, bias_cols)
        logits = logits + rpb[:, rows, cols].reshape(heads, *shape).to(logits.dtype)
    rows, cols = _grid(in_rows, in_cols)
    logits = logits.masked_fill(~(rows & cols).reshape(shape), float('-inf'))
    attn = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
    out = attn @ _tiles(v, k_rows, k_cols)  # (B, heads, rt, ct, TILE * TILE, d)
    out = out.view(batch, heads, *shape[:2], TILE, TILE, dim).transpose(3, 4)
    return out.reshape(batch, heads, shape[0] * TILE, shape[1] * TILE, dim)[:, :, :height, :width]


def _flex_attention_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_FLEX_BLOCK_SIZE = 128


@lru_cache(maxsize=None)
def _compiled_flex_attention() -> Callable:
    """FlexAttention compiled once per process; eager FlexAttention is the unfused math path.

    Map sizes, head dims and dtypes recompile the same function (sizes that change become
    dynamic after the first recompile), so the dynamo cache limit is raised to hold a model's
    stages at several input sizes.
    """
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 1024)
    return torch.compile(flex_attention)


def _window_mask_mod(height: int, width: int, kernel_size: int, device) -> Callable:
    """FlexAttention ``mask_mod`` on row-major tokens: is key ``kv`` in the window of ``q``?"""
    row_starts = window_starts(height, kernel_size, device)
    col_starts = window_starts(width, kernel_size, device)
    row_span, col_span = min(kernel_size, height), min(kernel_size, width)

    def mask_mod(b, h, q_idx, kv_idx):
        row, col = kv_idx // width - row_starts[q_idx // width], kv_idx % width - col_starts[q_idx % width]
        return (row >= 0) & (row < row_span) & (col >= 0) & (col < col_span)

    return mask_mod


@tensor_cache(maxsize=64)
def _window_block_mask(height: int, width: int, kernel_size: int, device: torch.device):
    """Block mask of the windows for ``height * width`` row-major tokens, cached per size.

    Built from the window rules rather than by evaluating the mask on every (query, key)
    pair: window starts never decrease along an axis, so the keys of a block of queries lie
    between the first query's first window row and the last query's last window row.
    """
    from torch.nn.attention.flex_attention import BlockMask

    block = _FLEX_BLOCK_SIZE
    tokens = height * width
    num_blocks = -(-tokens // block)
    row_starts = window_starts(height, kernel_size, device)
    first_query = torch.arange(num_blocks, device=device) * block
    last_query = (first_query + block - 1).clamp(max=tokens - 1)
    first_key = row_starts[first_query // width] * width
    last_key = (row_starts[last_query // width] + min(kernel_size, height)) * width - 1
    first_block, last_block = first_key // block, last_key // block
    kv_num_blocks = (last_block - first_block + 1).to(torch.int32)
    kv_indices = (first_block[:, None] + torch.arange(num_blocks, device=device)).clamp(max=num_blocks - 1)
    return BlockMask.from_kv_blocks(kv_num_blocks[None, None], kv_indices[None, None].to(torch.int32),
                                    BLOCK_SIZE=block,
                                    mask_mod=_window_mask_mod(height, width, kernel_size, device),
                                    seq_lengths=(tokens, tokens))


def _bias_score_mod(rpb: Tensor, width: int, kernel_size: int) -> Callable:
    """FlexAttention ``score_mod`` adding ``rpb[h, key row - query row + k - 1, same for cols]``.

    ``rpb`` is ``(heads, 2k-1, 2k-1)``, or ``(B, heads, H, 2k-1, 2k-1)``: one copy per batch
    element and query row (see :func:`_neighborhood_attention_flex`). Indices are clamped so
    that scores outside the window (masked afterwards) read in bounds.
    """
    last = 2 * kernel_size - 2
    per_row = rpb.dim() == 5

    def score_mod(score, b, h, q_idx, kv_idx):
        q_row = q_idx // width
        row = (kv_idx // width - q_row + kernel_size - 1).clamp(0, last)
        col = (kv_idx % width - q_idx % width + kernel_size - 1).clamp(0, last)
        return score + (rpb[b, h, q_row, row, col] if per_row else rpb[h, row, col])

    return score_mod


def _neighborhood_attention_flex(q: Tensor, k: Tensor, v: Tensor, kernel_size: int,
                                 rpb: Optional[Tensor]) -> Tensor:
    """FlexAttention over ``(B, heads, H*W, d)`` tokens with the window block mask.

    On CUDA it runs the compiled kernel (forward and backward); elsewhere FlexAttention's eager
    math path, which materialises all ``(H*W)**2`` scores and has no backward on CPU: for tests.
    Under autocast q, k, v run in the autocast dtype, as the reference's einsums do.
    """
    from torch.nn.attention.flex_attention import flex_attention

    batch, heads, height, width, dim = q.shape
    device_type = q.device.type
    dtype = _compute_dtype(q, k, v)
    q, k, v = (t.reshape(batch, heads, height * width, dim).to(dtype).contiguous() for t in (q, k, v))
    block_mask = _window_block_mask(height, width, kernel_size, q.device)
    if rpb is not None and rpb.requires_grad and torch.is_grad_enabled():
        # FlexAttention's backward adds every score's gradient into the captured bias with
        # atomics; into one (heads, 2k-1, 2k-1) table they all collide. One copy per batch
        # element and query row spreads them out; autograd sums the copies back into rpb.
        rpb = rpb[None, :, None].expand(batch, -1, height, -1, -1).contiguous()
    score_mod = None if rpb is None else _bias_score_mod(rpb, width, kernel_size)
    attend = _compiled_flex_attention() if q.is_cuda else flex_attention
    with torch.autocast(device_type, enabled=False):
        out = attend(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)
    return out.view(batch, heads, height, width, dim)


def _compute_dtype(q: Tensor, k: Tensor, v: Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on (as the reference's einsums run), else the
    promoted dtype of q, k, v."""
    device_type = 'cuda' if q.is_cuda else q.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return promote_types(promote_types(q.dtype, k.dtype), v.dtype)


_TRITON_MAX_HEAD_DIM = 128


def _triton_unavailable(q, k, v, kernel_size, rpb) -> Optional[str]:
    """Runs tensors where Triton runs (:func:`triton_unavailable`) of float32, bfloat16 or
    float16 with a head dim up to 128."""
    reason = triton_unavailable(q)
    if reason is not None:
        return reason
    if q.shape[-1] > _TRITON_MAX_HEAD_DIM:
        return f'head dim {q.shape[-1]} is over {_TRITON_MAX_HEAD_DIM}'
    dtype = _compute_dtype(q, k, v)
    if dtype not in TRITON_DTYPES:
        return f'computes in {dtype}, not float32, bfloat16 or float16'
    return None


def _neighborhood_attention_triton(q, k, v, kernel_size, rpb):
    from .triton_neighborhood_attention import neighborhood_attention_triton

    dtype = _compute_dtype(q, k, v)
    return neighborhood_attention_triton(cast(q, dtype), cast(k, dtype), cast(v, dtype), kernel_size, rpb)


def _flex_unavailable(q, k, v, kernel_size, rpb) -> Optional[str]:
    if not q.is_cuda:
        return 'needs CUDA tensors'
    if not _flex_attention_available():
        return f'torch {torch.__version__} has no torch.nn.attention.flex_attention'
    return None


def _natten_unavailable(q, k, v, kernel_size, rpb) -> Optional[str]:
    """natten runs maps without rpb, at least a window wide, on CUDA with its fused kernels
    (without libnatten its ``na2d`` falls back to uncompiled FlexAttention, which scores every
    pair of tokens)."""
    if rpb is not None:
        return 'natten 0.20+ has no relative position bias (rpb)'
    if q.shape[2] < kernel_size or q.shape[3] < kernel_size:
        return f'the {q.shape[2]}x{q.shape[3]} map is smaller than the {kernel_size}x{kernel_size} window'
    if not q.is_cuda:
        return 'needs CUDA tensors'
    try:
        import natten
    except ImportError:
        return 'natten is not installed'
    if not natten.HAS_LIBNATTEN:
        return 'natten has no libnatten (its fused CUDA kernels)'
    return None


def _neighborhood_attention_natten(q, k, v, kernel_size, rpb):
    from natten.functional import na2d

    # natten takes (B, H, W, heads, d) and scales by itself: q here is already scaled
    out = na2d(*(t.permute(0, 2, 3, 1, 4) for t in (q, k, v)), kernel_size=kernel_size, scale=1.0)
    return out.permute(0, 3, 1, 2, 4)


_neighborhood_attention = OpDispatcher('neighborhood_attention', {
    'triton': Backend(_neighborhood_attention_triton, _triton_unavailable),
    'natten': Backend(_neighborhood_attention_natten, _natten_unavailable),
    'flex': Backend(_neighborhood_attention_flex, _flex_unavailable),
    'torch': Backend(_neighborhood_attention_torch, runs_anywhere),
})


def reads_planes_faster(kernel_size: int) -> bool:
    """Whether the ``triton`` backend reads ``q`` and ``k`` faster laid out as ``(B, heads,
    d, H, W)`` planes than with contiguous head vectors (the layouts
    :func:`~.rotary_embedding.rotary_embedding_2d` writes): for windows of 11 and more, whose
    query tiles are 4 x 16 and whose keys are loaded in rows of 32 pixels. SegMAN-L's
    attention forward at batch 16 (bf16, an H200, us a call, its bias read from a table):
    windows of 11 522.3 against 589.5; of 9 the other way, 210.8 against 198.4, of 7 98.5
    against 99.3 and 33.3 against 30.6 (docs/benchmarks.md)."""
    return kernel_size > 9


def neighborhood_attention_2d(q: Tensor, k: Tensor, v: Tensor, kernel_size: int,
                              rpb: Optional[Tensor] = None) -> Tensor:
    """Neighborhood attention on a 2-D map.

    Args:
        q, k, v: ``(B, heads, H, W, d)``; ``q`` already multiplied by its scale.
        kernel_size: odd window size ``k``.
        rpb: ``(heads, 2k-1, 2k-1)`` relative position bias, or None.

    Returns:
        ``(B, heads, H, W, d)``.
    """
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f'q, k, v must share one (B, heads, H, W, d) shape, got '
                         f'{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f'kernel_size must be odd and positive, got {kernel_size}')
    span = 2 * kernel_size - 1
    if rpb is not None and rpb.shape != (q.shape[1], span, span):
        raise ValueError(f'rpb must be ({q.shape[1]}, {span}, {span}), got {tuple(rpb.shape)}')
    return _neighborhood_attention(q, k, v, kernel_size, rpb)
