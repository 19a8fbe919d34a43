"""Datasets, class lists/splits and loaders for zero-shot semantic segmentation."""
from data_loader.build import DataBundle, load_split_and_embeddings, prepare_data
from data_loader.classes import ClassSplit, parse_class_split
from utils.errors import DataError
from data_loader.loader import build_dataloader

__all__ = ["ClassSplit", "DataBundle", "DataError", "build_dataloader", "load_split_and_embeddings",
           "parse_class_split", "prepare_data"]
