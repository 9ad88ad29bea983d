"""SegMAN ops: a pure-PyTorch reference and faster backends behind one dispatch point each
(see :mod:`.dispatch` for how backends are chosen)."""
from .attention import biased_attention
from .batch_norm import batch_norm_2d
from .cross_entropy import cross_entropy_2d
from .cross_scan import both_orders, cross_merge, cross_scan, direction_order, flip_reversed
from .dense_conv import dense_conv2d
from .depthwise_conv import depthwise_conv2d
from .dispatch import use_backends
from .layer_norm import layer_norm_2d
from .neighborhood_attention import neighborhood_attention_2d
from .pointwise_conv import pointwise_conv2d
from .resize import resize_bilinear
from .rotary_embedding import rotary_embedding_2d
from .selective_scan import cross_selective_scan, selective_scan

__all__ = [
    'batch_norm_2d', 'biased_attention', 'both_orders', 'cross_entropy_2d', 'cross_merge',
    'cross_scan', 'cross_selective_scan', 'dense_conv2d', 'depthwise_conv2d', 'direction_order',
    'flip_reversed', 'layer_norm_2d', 'neighborhood_attention_2d', 'pointwise_conv2d',
    'resize_bilinear', 'rotary_embedding_2d', 'selective_scan', 'use_backends'
]
