"""The data side, knowing nothing of the model: datasets and layouts, class lists and splits,
word vectors and class embeddings, the synthetic benchmark, loaders and python -m data_loader.verify."""
from data_loader.build import DataBundle, load_split_and_embeddings, prepare_data
from data_loader.classes import ClassSplit, parse_class_split
from data_loader.loader import build_dataloader
from utils.errors import DataError

__all__ = ["ClassSplit", "DataBundle", "DataError", "build_dataloader", "load_split_and_embeddings",
           "parse_class_split", "prepare_data"]
