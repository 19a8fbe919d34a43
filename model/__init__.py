"""JoEm model: visual encoder (DeepLabV3+), semantic encoder, losses, inference, metrics."""
from model.semantic_encoder import SemanticEncoder
from model.visual_encoder import DeepLabV3Plus

VISUAL_ENCODERS = {"DeepLabV3Plus": DeepLabV3Plus}
SEMANTIC_ENCODERS = {"SemanticEncoder": SemanticEncoder}

__all__ = ["DeepLabV3Plus", "SemanticEncoder", "VISUAL_ENCODERS", "SEMANTIC_ENCODERS"]
