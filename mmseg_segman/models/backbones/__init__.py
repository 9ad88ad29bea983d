from .segman_encoder import LASS, SegMANEncoder, SegMANStage, layer_index, stage_prefix

__all__ = ['LASS', 'SegMANEncoder', 'SegMANStage', 'layer_index', 'stage_prefix']
