from .segman_encoder_decoder import SegMANEncoderDecoder

__all__ = ['SegMANEncoderDecoder']
