"""build_dataloader: seeded shuffling, padding collate, distributed samplers, worker errors."""
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist

from data_loader import build_dataloader, prepare_data
from data_loader.loader import EpochSampler, ShardSampler, pad_collate, sample_seed, steps_per_epoch
from tests.test_data_helpers import standard_voc, voc_cfg
from utils.errors import DataError


@pytest.fixture
def voc(tmp_path):
    root, emb = standard_voc(tmp_path)
    return prepare_data(voc_cfg(root, emb, remove_unseen_images=False, crop_size=16))


def names(loader):
    return [name for batch in loader for name in batch["name"]]


def test_train_loader_is_seeded_and_drops_last(voc):
    first = names(build_dataloader(voc.train_set, batch_size=2, train=True, seed=3))
    assert len(first) == 4 and set(first) < {"t0", "t1", "t2", "t3", "t4"}  # 5 samples, last odd one dropped
    assert names(build_dataloader(voc.train_set, batch_size=2, train=True, seed=3)) == first
    orders = {tuple(names(build_dataloader(voc.train_set, batch_size=5, train=True, seed=s))) for s in range(6)}
    assert len(orders) > 1
    batch = next(iter(build_dataloader(voc.train_set, batch_size=2, train=True)))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["label"].shape == (2, 16, 16)
    assert len(names(build_dataloader(voc.train_set, batch_size=2, train=True, drop_last=False))) == 5


def test_val_loader_pads_in_order(voc):
    loader = build_dataloader(voc.val_set, batch_size=2, train=False)
    batches = list(loader)
    assert names(loader) == ["v0", "v1", "v2"]
    assert batches[0]["image"].shape == (2, 3, 24, 32)
    last = batches[1]  # single 30x20 image: no padding at batch size 1
    assert last["image"].shape == (1, 3, 30, 20)
    items = [voc.val_set[1], voc.val_set[2]]  # 24x32 and 30x20
    batch = pad_collate(items)
    assert batch["image"].shape == (2, 3, 30, 32) and batch["label"].dtype == torch.int64
    assert (batch["label"][0, 24:] == 255).all() and (batch["image"][0, :, 24:] == 0).all()
    assert (batch["label"][1, :, 20:] == 255).all() and (batch["image"][1, :, :, 20:] == 0).all()
    assert torch.equal(batch["label"][1, :, :20], items[1]["label"])


def test_shard_sampler():
    data = list(range(7))
    shards = [list(ShardSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]] and len(ShardSampler(data, 3, 1)) == 2


def test_epoch_sampler_order_start_and_ranks():
    sampler = EpochSampler(10, seed=4)
    sampler.set_epoch(3)
    full = list(sampler)
    assert sorted(i for i, _ in full) == list(range(10)) and len(sampler) == 10
    assert all(seed == sample_seed(4, 3, i) for i, seed in full)
    sampler.set_epoch(3, start=6)
    assert list(sampler) == full[6:] and len(sampler) == 4      # a resumed epoch: the same tail
    sampler.set_epoch(4)
    assert [i for i, _ in sampler] != [i for i, _ in full]
    shards = [EpochSampler(10, seed=4, num_replicas=3, rank=r) for r in range(3)]
    for shard in shards:
        shard.set_epoch(3)
    parts = [[i for i, _ in shard] for shard in shards]
    assert [len(p) for p in parts] == [4, 4, 4] and set(sum(parts, [])) == set(range(10))
    assert [i for i, _ in EpochSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]


def test_augmentation_follows_the_sample_not_the_worker_or_the_position(voc):
    """Each sample's random crop/flip/scale come from its own seed: the same with 0 or 2 workers,
    and the same for the samples of a resumed epoch."""
    def batches(workers, start=0):
        loader = build_dataloader(voc.train_set, batch_size=1, train=True, seed=1, num_workers=workers)
        loader.sampler.set_epoch(2, start)
        return {b["name"][0]: (b["image"], b["label"]) for b in loader}
    before = torch.get_rng_state()
    plain = batches(0)
    assert torch.equal(torch.get_rng_state(), before)    # the global RNG (dropout) is left alone
    workers, resumed = batches(2), batches(0, start=3)
    assert set(resumed) < set(plain) and len(resumed) == 2
    for name, (image, label) in plain.items():
        assert torch.equal(image, workers[name][0]) and torch.equal(label, workers[name][1])
        if name in resumed:
            assert torch.equal(image, resumed[name][0])
    assert steps_per_epoch(build_dataloader(voc.train_set, batch_size=2, train=True)) == 2


def test_distributed_samplers(voc, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        train = build_dataloader(voc.train_set, batch_size=2, train=True, distributed=True, seed=5)
        assert isinstance(train.sampler, EpochSampler) and train.sampler.seed == 5 and train.sampler.shuffle
        train.sampler.set_epoch(1)
        epoch1 = names(train)
        assert len(epoch1) == 4 and names(train) == epoch1
        train.sampler.set_epoch(2)
        assert names(train) != epoch1
        val = build_dataloader(voc.val_set, batch_size=1, train=False, distributed=True)
        assert isinstance(val.sampler, ShardSampler) and names(val) == ["v0", "v1", "v2"]
    finally:
        dist.destroy_process_group()


def test_worker_error_names_the_file(tmp_path):
    root, emb = standard_voc(tmp_path)
    val = prepare_data(voc_cfg(root, emb), train=False).val_set
    (root / "JPEGImages" / "v1.jpg").write_bytes(b"broken")
    loader = build_dataloader(val, batch_size=1, train=False, num_workers=1)
    with pytest.raises(DataError, match=r"v1.jpg: cannot read image") as excinfo:
        list(loader)
    traceback.clear_frames(excinfo.tb)  # frees the worker iterator now (else gc waits 5 s for its worker)


def test_worker_seeds_numpy():
    class Draw(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 1, 1), "label": torch.zeros(1, 1, dtype=torch.long),
                    "name": str(np.random.randint(1 << 30))}
    first = names(build_dataloader(Draw(), batch_size=1, train=False, num_workers=2, seed=1))
    again = names(build_dataloader(Draw(), batch_size=1, train=False, num_workers=2, seed=1))
    assert first == again and first[0] != first[1]  # workers 0 and 1 draw from different numpy seeds
