"""JoEm model: visual encoder (DeepLabV3+), semantic encoder, losses, inference, metrics."""
from model.semantic_encoder import SemanticEncoder
from model.visual_encoder import DeepLabV3Plus

__all__ = ["DeepLabV3Plus", "SemanticEncoder"]
