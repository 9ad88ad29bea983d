from .segman_encoder import LASS, SegMANEncoder, SegMANStage

__all__ = ['LASS', 'SegMANEncoder', 'SegMANStage']
