"""Encoders and decoders, one module per family; every name is importable from
`vqtrain.nets` (configs name `vqtrain.nets.<Class>`).

Every encoder has `modality` ("image" or "audio"), `stride` (signal samples per
latent position, per side for images) and `out_channels`; every decoder has
`in_channels` and `forward(z, lengths=None, size=None)`.
"""

from vqtrain.nets.conv import (
    ConvDecoder1d,
    ConvDecoder2d,
    ConvEncoder1d,
    ConvEncoder2d,
    Downsample1d,
    MaskedDecoder1d,
    MaskedEncoder1d,
    ResBlock,
    Upsample1d,
    check_strides,
    masked_stack,
    residual_stack1d,
    zero_biases,
)
from vqtrain.nets.seanet import CodecDecoder, CodecEncoder, Snake1d
from vqtrain.nets.vqgan import AttnBlock, ResnetBlock, VQGANDecoder, VQGANEncoder
from vqtrain.utils import TimeMasks, mask_time

__all__ = [
    "AttnBlock",
    "CodecDecoder",
    "CodecEncoder",
    "ResnetBlock",
    "VQGANDecoder",
    "VQGANEncoder",
    "ConvDecoder1d",
    "ConvDecoder2d",
    "ConvEncoder1d",
    "ConvEncoder2d",
    "Downsample1d",
    "MaskedDecoder1d",
    "MaskedEncoder1d",
    "ResBlock",
    "Snake1d",
    "TimeMasks",
    "Upsample1d",
    "check_strides",
    "mask_time",
    "masked_stack",
    "residual_stack1d",
    "zero_biases",
]
