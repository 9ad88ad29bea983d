from .segman_head import SegMANHead

__all__ = ['SegMANHead']
