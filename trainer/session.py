"""One run from a resolved config: build data, encoders and optimizers; train or test."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from data_loader import build_dataloader, prepare_data
from trainer.official import convert_official, is_official
from trainer.builders import build_optimizers, build_scheduler, build_semantic_encoder, build_visual_encoder
from trainer.trainer import Trainer, seed_everything
from utils.checkpoint import check_compatible, load_checkpoint, load_state
from utils.distributed import DistContext, broadcast_object
from utils.parse_config import ConfigParser
from utils.util import ConfigError

logger = logging.getLogger("joem")


_LOADED: dict[Path, dict] = {}  # the -r checkpoint read for its config, reused by run()


def _load_once(path: str | Path) -> dict:
    """Read a checkpoint, reusing the copy already read for its config."""
    path = Path(path)
    return _LOADED.pop(path.resolve(), None) or load_checkpoint(path)


def forget_loaded() -> None:
    """Drop a checkpoint read for its config but not used (the run failed before)."""
    _LOADED.clear()


def load_resume_config(path: str | Path) -> dict:
    """The config stored in a checkpoint (used for ``-r`` without ``-c``)."""
    checkpoint = load_checkpoint(path)
    _LOADED[Path(path).resolve()] = checkpoint
    if is_official(checkpoint):
        raise ConfigError(f"{path}: an official JoEm checkpoint holds no config or class split; pass -c CONFIG")
    if not isinstance(checkpoint.get("config"), dict):
        raise ConfigError(f"{path}: holds no config; pass the training config with -c")
    return checkpoint["config"]


def _banner(config: ConfigParser, ctx: DistContext, bundle, batch_size: int, test_only: bool) -> str:
    from trainer.cli import environment_banner
    data = config["data"]
    split = bundle.split
    lines = [f"run: {config.run_dir}",
             f"mode: {'test' if test_only else 'train'}; dataset: {data.get('type')} at {data.get('root')}",
             f"classes: {split.num_classes} ({len(split.seen)} seen incl. background, {len(split.unseen)} unseen)",
             f"unseen: {', '.join(split.unseen_names) or 'none'}",
             f"seen: {', '.join(split.seen_names)}",
             f"training images with unseen pixels removed: {data.get('remove_unseen_images', True)}; "
             f"ignore_bg: {data.get('ignore_bg', False)}; ignore_unseen: {data.get('ignore_unseen', False)}",
             f"embeddings: {tuple(bundle.embeddings.shape)}; "
             f"train images: {len(bundle.train_set) if bundle.train_set is not None else '-'}; "
             f"val images: {len(bundle.val_set) if bundle.val_set is not None else '-'}",
             f"effective batch size: {batch_size} ({ctx.world_size} process(es) x {batch_size // ctx.world_size}); "
             f"amp: {config['trainer'].get('amp', False)}; channels_last: {config['trainer'].get('channels_last', False)}",
             environment_banner(ctx)]
    return "\n".join(lines)


def _shard(dataset, ctx: DistContext):
    """Every process evaluates a disjoint slice (no padding: the summed confusion matrix is exact)."""
    if not ctx.distributed:
        return dataset
    return torch.utils.data.Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world_size)))


def _to_sync_bn(model: nn.Module) -> None:
    """SyncBatchNorm outside the frozen backbone (CUDA only; on CPU each process keeps its own BN)."""
    for name in ("aspp", "decoder"):
        setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(model, name)))
    if not getattr(model, "freeze_backbone_bn", True):
        model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)


def _loader_args(config: ConfigParser) -> dict:
    spec = config["data_loader"]
    return {"num_workers": int(spec.get("num_workers", 0)), "pin_memory": bool(spec.get("pin_memory", False)),
            "persistent_workers": bool(spec.get("persistent_workers", False))}


def run(config: ConfigParser, ctx: DistContext, test_only: bool = False) -> dict:
    """Train (or with ``test_only`` evaluate the ``-r`` checkpoint); returns the final record."""
    seed = int(config.get("seed", 0))
    seed_everything(seed)
    source = str(config.config_path) if config.config_path else "config"
    bundle = prepare_data(config["data"], train=not test_only, val=True, source=source, logger=logger)
    split = bundle.split
    batch_size = int(config["data_loader"]["batch_size"])
    if batch_size % ctx.world_size:
        raise ConfigError(f"data_loader.batch_size {batch_size} is not divisible by the {ctx.world_size} processes")
    if ctx.is_main:
        logger.info(_banner(config, ctx, bundle, batch_size, test_only))

    checkpoint = None
    if config.resume is not None:
        checkpoint = _load_once(config.resume)
        if is_official(checkpoint):
            checkpoint = convert_official(config.resume, config.config, source)
        if "visual_encoder" not in checkpoint:
            raise ConfigError(f"{config.resume}: not a checkpoint of this project (no 'visual_encoder')")
        check_compatible(checkpoint, config.resume, config.config, split.to_dict())
    torch.manual_seed(seed)
    model = build_visual_encoder(config, split.num_classes, load_pretrained=checkpoint is None)
    feature_dim = model.decoder.pred_conv.in_channels
    semantic_encoder = build_semantic_encoder(config, bundle.embeddings.shape[1], feature_dim)
    if checkpoint is not None:
        load_state(model, checkpoint["visual_encoder"], config.resume, "visual encoder")
        load_state(semantic_encoder, checkpoint["semantic_encoder"], config.resume, "semantic encoder")
        logger.info("loaded %s (epoch %s)", config.resume, checkpoint.get("epoch"))
    channels_last = bool(config["trainer"].get("channels_last", False))
    model.to(ctx.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    semantic_encoder.to(ctx.device)
    if ctx.distributed and ctx.device.type == "cuda":
        _to_sync_bn(model)
    loader_args = _loader_args(config)
    val_loader = build_dataloader(_shard(bundle.val_set, ctx), batch_size=int(config["data_loader"].get(
        "val_batch_size", 1)), train=False, seed=seed, **loader_args)
    writer = None
    if ctx.is_main and config["trainer"].get("tensorboard", False) and not test_only:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(config.run_dir / "tensorboard"))

    if test_only:
        trainer = Trainer(config, ctx, model, semantic_encoder, split, bundle.embeddings, None, val_loader,
                          *_dummy_optimizers(model, semantic_encoder), None, "epoch", writer)
        record = trainer.validate(int(checkpoint.get("epoch", 0)), "test")
        _finish(trainer, record)
        return record

    train_loader = build_dataloader(bundle.train_set, batch_size=batch_size // ctx.world_size, train=True,
                                    distributed=ctx.distributed, seed=seed,
                                    shuffle=bool(config["data_loader"].get("shuffle", True)), **loader_args)
    optimizer, optimizer_gen = build_optimizers(config, model, semantic_encoder)
    scheduler, interval = build_scheduler(config, optimizer, len(train_loader))
    trainer = Trainer(config, ctx, model, semantic_encoder, split, bundle.embeddings, train_loader, val_loader,
                      optimizer, optimizer_gen, scheduler, interval, writer)
    if checkpoint is not None and "optimizer" in checkpoint:
        trainer.resume(checkpoint)
    elif checkpoint is not None:
        logger.info("training starts at epoch 1 from the weights of %s (it holds no optimizer state)", config.resume)
    try:
        trainer.train()
    finally:
        if writer is not None:
            writer.close()
    record = {}
    if config["trainer"].get("test_after_train", True):
        record = _final_test(trainer, ctx)
    _finish(trainer, record)
    return record


def _dummy_optimizers(model, semantic_encoder):
    return torch.optim.SGD(model.parameters(), lr=0.0), torch.optim.SGD(semantic_encoder.parameters(), lr=0.0)


def _final_test(trainer: Trainer, ctx: DistContext) -> dict:
    """Evaluate the best checkpoint (this run's, or the resumed run's when this one saved none;
    else the final weights) as split 'test'."""
    best = trainer.best_path
    if ctx.distributed:
        torch.distributed.barrier()
        best = broadcast_object(best)
    epoch = trainer.completed_epoch
    if best is not None and best.is_file():
        checkpoint = load_checkpoint(best)
        load_state(trainer.model, checkpoint["visual_encoder"], best, "visual encoder")
        load_state(trainer.semantic_encoder, checkpoint["semantic_encoder"], best, "semantic encoder")
        epoch = int(checkpoint["epoch"])
        logger.info("final test with %s (epoch %d)", best, epoch)
    return trainer.validate(epoch, "test")


def _finish(trainer: Trainer, record: dict) -> None:
    if not trainer.is_main:
        return
    if record:
        logger.info("seen / unseen / harmonic mIoU: %s / %s / %s (sigma %g)", *(
            "n/a" if record.get(k) is None else f"{record[k]:.2f}"
            for k in ("mIoU_seen", "mIoU_unseen", "mIoU_harmonic")), record["sigma"])
    logger.info("metrics: %s", trainer.metrics_path)
