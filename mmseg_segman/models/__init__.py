from .backbones import SegMANEncoder
from .decode_heads import SegMANHead

__all__ = ['SegMANEncoder', 'SegMANHead']
