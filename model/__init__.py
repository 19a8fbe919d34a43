"""nn modules and their builder, losses and distance maths (no file I/O, nothing from data_loader):
the encoders, calibration, the one Predictor (images -> distances -> labels) and the metrics."""
from model.semantic_encoder import SemanticEncoder
from model.visual_encoder import DeepLabV3Plus

__all__ = ["DeepLabV3Plus", "SemanticEncoder"]
