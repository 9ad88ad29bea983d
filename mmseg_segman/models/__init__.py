from .backbones import SegMANEncoder
from .decode_heads import SegMANHead
from .segmentors import SegMANEncoderDecoder

__all__ = ['SegMANEncoder', 'SegMANEncoderDecoder', 'SegMANHead']
