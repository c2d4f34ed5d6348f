"""Quantizers: one module per method on the shared base in `base.py`."""

from vqtrain.quantizers.base import Quantizer, QuantizerOutput
from vqtrain.quantizers.bsq import BSQ
from vqtrain.quantizers.fsq import FSQ
from vqtrain.quantizers.ibq import IBQ
from vqtrain.quantizers.lfq import LFQ, ResidualLFQ
from vqtrain.quantizers.residual import ResidualFSQ, ResidualQuantizer
from vqtrain.quantizers.simvq import SimVQ
from vqtrain.quantizers.vq import VectorQuantizer

__all__ = [
    "Quantizer",
    "QuantizerOutput",
    "VectorQuantizer",
    "SimVQ",
    "FSQ",
    "ResidualQuantizer",
    "ResidualFSQ",
    "LFQ",
    "BSQ",
    "ResidualLFQ",
    "IBQ",
]
