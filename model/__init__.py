"""The networks (visual and semantic encoders), their builder and CPU kernels, losses, distance
maths, the one Predictor (images -> distances -> labels) and the metrics; no file I/O (the builder
reads weight files through utils.checkpoint), nothing from data_loader."""
from model.semantic_encoder import SemanticEncoder
from model.visual_encoder import DeepLabV3Plus

__all__ = ["DeepLabV3Plus", "SemanticEncoder"]
