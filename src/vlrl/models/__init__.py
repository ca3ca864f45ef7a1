"""Models: load local HF VLMs and their processors, build the tiny models, turn samples into tensors."""

from vlrl.models.build import ARCHS, init_model
from vlrl.models.inputs import Encoded, collate, encode_prompt, encode_sft
from vlrl.models.loading import load_model, load_model_and_processor
from vlrl.models.processor import ImageOnlyProcessor, load_processor, vision_token_ids
from vlrl.models.sizes import SIZES

__all__ = [
    "ARCHS", "SIZES", "init_model", "Encoded", "collate", "encode_prompt", "encode_sft",
    "load_model", "load_model_and_processor", "ImageOnlyProcessor", "load_processor", "vision_token_ids",
]
