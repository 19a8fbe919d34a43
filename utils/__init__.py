"""Utilities: config parsing, class embeddings, file helpers."""
from utils.embeddings import load_class_embeddings, normalize_embeddings
from utils.parse_config import ConfigParser, CustomArgs
from utils.util import ConfigError, atomic_torch_save, read_json, write_json

__all__ = ["read_json", "write_json", "atomic_torch_save", "ConfigError", "ConfigParser", "CustomArgs",
           "load_class_embeddings", "normalize_embeddings"]
