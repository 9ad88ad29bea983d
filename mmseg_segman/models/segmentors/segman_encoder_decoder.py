"""mmseg's ``EncoderDecoder`` that checks, once built, that its SegMAN head fits its SegMAN encoder."""
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS
from mmseg.utils import ConfigType

from ..backbones import SegMANEncoder
from ..decode_heads import SegMANHead


@MODELS.register_module()
class SegMANEncoderDecoder(EncoderDecoder):
    """``EncoderDecoder`` that refuses at build time a decode head whose ``in_channels``
    do not fit the encoder's maps.

    mmseg builds the backbone and the decode head apart, so on its own a
    :class:`SegMANHead` can check the widths of the maps only when it gets them, at its
    first forward. Here it is checked against :attr:`SegMANEncoder.out_channels` as soon as
    it is built, with an error that names ``in_channels`` and both widths. Nothing is
    added: the modules, the state-dict keys and the forward are ``EncoderDecoder``'s. With a
    neck, or an encoder or head other than SegMAN's, the head's forward check is what remains.

    Args: those of :class:`mmseg.models.EncoderDecoder`.
    """

    def _init_decode_head(self, decode_head: ConfigType) -> None:
        """Build the decode head and check it against the encoder's maps."""
        super()._init_decode_head(decode_head)
        if (not self.with_neck and isinstance(self.backbone, SegMANEncoder)
                and isinstance(self.decode_head, SegMANHead)):
            self.decode_head.check_in_channels(self.backbone.out_channels)
