"""DataLoader factory: seeded shuffling, distributed sampling and evaluation sharding, padding collate.

Workers need no seeding of their own: the DataLoader seeds ``random``, numpy and torch in each
worker from its generator."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from data_loader.transforms import IGNORE_INDEX


def pad_collate(items: Sequence[dict]) -> dict:
    """Stack items, padding images with 0 and labels with 255 (bottom/right) to the largest size;
    ``size`` keeps each image's own (height, width)."""
    height = max(item["image"].shape[-2] for item in items)
    width = max(item["image"].shape[-1] for item in items)
    images = items[0]["image"].new_zeros((len(items), items[0]["image"].shape[0], height, width))
    labels = items[0]["label"].new_full((len(items), height, width), IGNORE_INDEX)
    for i, item in enumerate(items):
        h, w = item["label"].shape
        images[i, :, :h, :w] = item["image"]
        labels[i, :h, :w] = item["label"]
    return {"image": images, "label": labels, "name": [item["name"] for item in items],
            "size": [tuple(item["label"].shape) for item in items]}


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r gets indices r, r + world, ... (no duplicates)."""

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None):
        self.length = len(dataset)
        self.num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
        self.rank = dist.get_rank() if rank is None else rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def build_dataloader(dataset: Dataset, *, batch_size: int, train: bool, num_workers: int = 0,
                     pin_memory: bool = False, persistent_workers: bool = False, distributed: bool = False,
                     seed: int = 0, drop_last: bool | None = None, shuffle: bool = True) -> DataLoader:
    """A DataLoader for training (shuffled, seeded, drop_last by default, ``DistributedSampler``
    when distributed) or evaluation (in order, sharded without padding when distributed).
    ``shuffle=False`` keeps training batches in dataset order too."""
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed) if train else ShardSampler(dataset)
    if drop_last is None:
        drop_last = train
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train and shuffle and sampler is None, sampler=sampler,
        num_workers=num_workers, collate_fn=pad_collate, pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last, generator=generator,
        persistent_workers=persistent_workers and num_workers > 0,
    )
