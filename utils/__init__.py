"""Utilities: config parsing, files, checkpoints, embeddings, devices, logging, environment."""
