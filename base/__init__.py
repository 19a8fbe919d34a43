"""The epoch loop every trainer shares (pytorch-template's BaseTrainer): epochs, the monitored
metric, early stop, when checkpoints are saved. The JoEm training itself is in trainer/."""
