"""DataLoader factory: the training order and augmentation as functions of (seed, epoch) alone (so an
epoch resumes at any step, whatever the number of workers or processes), evaluation sharding,
padding collate."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.schema import IGNORE_INDEX
from utils.seeding import order_seed, sample_seed


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


class EpochSampler(Sampler[tuple[int, int]]):
    """Training samples as ``(index, augmentation seed)``: a permutation drawn from (``seed``, epoch)
    (in order without ``shuffle``), split over processes like ``DistributedSampler``;
    ``set_epoch(epoch, start)`` starts at position ``start`` counted over all processes, so that an
    epoch resumed with another number of processes continues with the same samples."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _total(self) -> int:
        return -(-self.size // self.num_replicas) * self.num_replicas

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """This process's samples of the current epoch, from the start position."""
        generator = torch.Generator().manual_seed(order_seed(self.seed, self.epoch))
        indices = torch.randperm(self.size, generator=generator).tolist() if self.shuffle else list(range(self.size))
        total = self._total()
        indices += indices[:total - len(indices)]
        for index in indices[self.start + self.rank:total:self.num_replicas]:
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self._total(), self.num_replicas))


def steps_per_epoch(loader: DataLoader) -> int:
    """Batches in a full training epoch (whatever position the sampler starts from)."""
    sampler = loader.sampler
    full = -(-sampler.size // sampler.num_replicas) if isinstance(sampler, EpochSampler) else len(sampler)
    return full // loader.batch_size if loader.drop_last else -(-full // loader.batch_size)


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
    """A DataLoader for training (an :class:`EpochSampler`; drop_last by default) or evaluation (in
    order, sharded without padding when distributed)."""
    if train:
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        sampler = EpochSampler(len(dataset), seed, shuffle, world, rank)
    else:
        sampler = ShardSampler(dataset) if distributed else None
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=pad_collate,
        pin_memory=pin_memory and torch.cuda.is_available(), drop_last=train if drop_last is None else drop_last,
        generator=torch.Generator().manual_seed(seed), persistent_workers=persistent_workers and num_workers > 0,
    )
