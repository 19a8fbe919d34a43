"""A trained model at work, above data_loader and model: loading checkpoints of this project and
official JoEm files (converted), and the Segmenter (any class list, images in, label maps out)."""
