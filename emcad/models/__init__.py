"""EMCAD models: decoder blocks, the EMCAD decoder, EMCADNet, EGE-UNet, MALUNet and the model registry."""

from .blocks import (CAB, EUCB, LGAG, MSCB, MSDC, SAB, MSCBLayer, channel_shuffle, init_decoder_weights,
                     make_activation, set_backend, valid_backends)
from .decoder import EMCAD
from .egeunet import EGEUNet
from .emcadnet import EMCADNet
from .malunet import MALUNet
from .registry import LIGHTWEIGHT_MODELS, MODELS, create_model, from_pretrained, list_models, save_pretrained

__all__ = [
    "CAB", "EGEUNet", "EMCAD", "EMCADNet", "EUCB", "LGAG", "LIGHTWEIGHT_MODELS", "MALUNet", "MODELS", "MSCB",
    "MSCBLayer", "MSDC", "SAB", "channel_shuffle",
    "create_model", "from_pretrained", "init_decoder_weights", "list_models", "make_activation", "save_pretrained",
    "set_backend", "valid_backends",
]
