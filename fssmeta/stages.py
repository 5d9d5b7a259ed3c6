"""The training stages a user runs, built from params: stage 1 (the PSPNet base learner) and episodic
meta-training of `model.method`, each a function of the typed config and a fold. What differs between methods
(stage-1 use, optimisers, transform, trained shots, loss) is read from the method's record; the CLI, the DVC
stages and the Ray integration call these."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fssmeta import distributed
from fssmeta.checkpoint import restore, resume
from fssmeta.config import Config, DataConfig, TrainConfig, config_to_dict
from fssmeta.data import folds
from fssmeta.data.dataset import (
    BaseSegmentationDataset,
    EpisodeDataset,
    IndexSource,
    TrainEpisodeDataset,
    episode_loader,
)
from fssmeta.data.episode_lists import list_path, load_episode_list
from fssmeta.data.io import DataError
from fssmeta.data.prepare import load_fold, load_index, present_classes
from fssmeta.data.sampler import TrainEpisodeSampler
from fssmeta.data.transforms import ResizeTransform, TrainTransform, training_transform
from fssmeta.data.ways import FSCSTrainSampler, TrainWayEpisodeDataset, WayEpisodeDataset, way_list_path
from fssmeta.episode import IGNORE_INDEX
from fssmeta.evaluation import scoring_transform
from fssmeta.fscs import evaluate_ways
from fssmeta.losses import base_losses
from fssmeta.models import get_method
from fssmeta.models.pspnet import PSPNet, build_pspnet
from fssmeta.runs import base_dir, default_device, fresh_model, load_init, meta_dir
from fssmeta.train import (
    FitResult,
    LossFn,
    Reporter,
    build_optimization,
    build_optimizer,
    build_scheduler,
    evaluate,
    fit,
)


def prepare_model(model: torch.nn.Module, device: torch.device, train_cfg: TrainConfig) -> torch.nn.Module:
    model = model.to(device)
    if device.type == "cuda" and train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def training_loader(dataset: Any, train_cfg: TrainConfig) -> DataLoader:
    """A training loader. Its workers are not persistent: each epoch starts its own from the dataset as `fit`'s
    `set_epoch` left it (a persistent worker keeps its first copy, so every epoch repeated the first one's
    data), and the loader draws its seed from torch's generator every epoch, as it does without workers."""
    return DataLoader(dataset, batch_size=train_cfg.batch_size, shuffle=False, drop_last=True,
                      num_workers=train_cfg.num_workers)


def _resume_payload(run: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, enabled: bool) -> dict | None:
    last = run / "last.pt"
    if enabled and last.is_file():
        return resume(last, model=model, optimizer=optimizer, scheduler=scheduler)
    return None


def base_training_keys(cfg: Config, fold: folds.Split) -> list[str]:
    """Stage 1's images: every image of the train pool (`train_base.images: all`, BAM's base list, novel
    pixels relabelled background by the dataset) or the fold's meta-training list (`meta`)."""
    if cfg.train_base.images == "meta":
        return [key for key, _ in load_fold(cfg.data.prepared, fold)["train"]]
    return [row["key"] for row in load_index(cfg.data.prepared)["pools"]["train"]]


def base_param_groups(model: PSPNet, encoder_lr_scale: float) -> list[dict[str, Any]]:
    """BAM's stage-1 groups: the encoder at lr x `encoder_lr_scale`, the PPM and classifier at lr."""
    encoder = list(model.backbone.parameters())
    in_encoder = {id(p) for p in encoder}
    return [{"params": encoder, "lr_scale": encoder_lr_scale},
            {"params": [p for p in model.parameters() if id(p) not in in_encoder]}]


def base_validation(cfg: Config, base_classes: list[int]) -> DataLoader | None:
    """Up to `train_base.val_episodes` images of the validation pool, resized to the crop size, labelled as
    in training (base classes 1..n, everything else 0); None when validation is off. Selecting on the test
    pool is refused: a dataset without a validation pool (COCO) trains stage 1 with `select: last`."""
    tc = cfg.train_base
    if tc.val_episodes == 0:
        return None
    index = load_index(cfg.data.prepared)
    keys = [row["key"] for row in index["pools"].get("val", [])][: tc.val_episodes]
    if not keys:
        raise DataError(f"train_base.select: best needs a validation pool, and {cfg.data.dataset} at "
                        f"{cfg.data.prepared} has none; set train_base.select: last and train_base.val_episodes: 0")
    dataset = BaseSegmentationDataset(keys, IndexSource(index, ("val",)), ResizeTransform(tc.transform.crop_size),
                                      base_classes, seed=tc.seed)
    return DataLoader(dataset, batch_size=tc.batch_size, shuffle=False, num_workers=tc.num_workers)


@torch.no_grad()
def base_miou(model: torch.nn.Module, loader: DataLoader, num_classes: int) -> float:
    """Mean IoU over background and the base classes present (BAM's stage-1 validation), ignoring 255."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inter = torch.zeros(num_classes, dtype=torch.float64)
    union = torch.zeros(num_classes, dtype=torch.float64)
    for image, label in loader:
        pred = model(image.to(device)).logits.argmax(1).cpu()
        valid = label != IGNORE_INDEX
        pred, label = pred[valid], label[valid]
        area_pred, area_label = (torch.bincount(x, minlength=num_classes).double() for x in (pred, label))
        both = torch.bincount(pred[pred == label], minlength=num_classes).double()
        inter += both
        union += area_pred + area_label - both
    model.train(was_training)
    seen = union > 0
    return float((inter[seen] / union[seen]).mean()) if seen.any() else 0.0


def train_base(cfg: Config, fold: folds.Split, *, progress: bool = True, resume_run: bool = True,
               device: torch.device | None = None) -> FitResult:
    """Stage 1: the PSPNet base learner, supervised on the fold's base classes (novel pixels -> 0), as BAM
    trains it (`train_base`: images, encoder / head rates, its own transform, the checkpoint selected on
    validation). BAM's base learner; the encoder a method with `Stage1("backbone")` may start from."""
    device = device or default_device()
    tc = cfg.train_base
    torch.manual_seed(tc.seed)
    base = load_fold(cfg.data.prepared, fold)["base"]
    model = prepare_model(build_pspnet(cfg.model, 1 + len(base)), device, tc)
    dataset = BaseSegmentationDataset(base_training_keys(cfg, fold),
                                      IndexSource(load_index(cfg.data.prepared), ("train",)),
                                      TrainTransform(tc.transform), base, seed=tc.seed, length=tc.episodes_per_epoch)
    loader = training_loader(dataset, tc)
    optimizer = build_optimizer(base_param_groups(model, tc.encoder_lr_scale), tc.optim)
    scheduler = build_scheduler(optimizer, tc.optim, tc.epochs * len(loader))
    run = base_dir(cfg, fold)
    start = _resume_payload(run, model, optimizer, scheduler, resume_run)
    val_loader = base_validation(cfg, base)

    def validate(m: torch.nn.Module) -> dict[str, float]:
        return {} if val_loader is None else {"val_miou": base_miou(m, val_loader, 1 + len(base))}

    return fit(model, train_loader=loader, loss_fn=base_losses, optimizer=optimizer, scheduler=scheduler,
               epochs=tc.epochs, validate=validate, checkpoint_dir=run, config=config_to_dict(cfg), start=start,
               amp=tc.amp, grad_clip=tc.grad_clip, progress=progress, desc=f"base fold {fold}")


def validation_loader(cfg: Config, fold: folds.Split, shot: int) -> DataLoader | None:
    """The fixed validation list (never the test list) for checkpoint selection; None when disabled. Under
    `train.task: fscs` the 1-way FS-CS validation list (fssmeta/data/ways.py, drawn at `episodes.ways` > 1)."""
    if cfg.train.val_episodes <= 0:
        return None
    order, seed = cfg.eval.episode_order, cfg.episodes.val_seeds[0]
    fscs = cfg.train.task == "fscs"
    path = (way_list_path(cfg.episodes.out, fold, "val", 1, shot, order, seed) if fscs
            else list_path(cfg.episodes.out, fold, "val", shot, order, seed))
    if fscs and not path.is_file():
        raise DataError(f"{path}: no FS-CS validation list, which train.task: fscs selects its checkpoint on; "
                        f"draw the lists with `fssmeta episodes --set episodes.ways=N` (N > 1), or set "
                        f"train.val_episodes: 0")
    episodes = load_episode_list(path)["episodes"][: cfg.train.val_episodes]
    # Under DDP each rank scores its share; `evaluate` sums the IoU counts over ranks, so the score is the same.
    episodes = episodes[distributed.rank() :: distributed.world_size()]
    index = load_index(cfg.data.prepared)
    dataset = (WayEpisodeDataset if fscs else EpisodeDataset)(episodes, IndexSource(index), scoring_transform(cfg))
    return episode_loader(dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers)


def selection_key(cfg: Config) -> str:
    """The validation metric `best.pt` maximises: mIoU; ER for weak labels (official fs-cs: `val/er` with
    `--weak`, `val/miou` otherwise)."""
    return "val_er" if cfg.train.supervision == "presence" else "val_miou"


def training_data(data: DataConfig) -> DataConfig:
    """The data section as the training episodes see it: `data.train_query_class` in place of
    `data.query_class` unless it is `same`."""
    if data.train_query_class == "same":
        return data
    return data.model_copy(update={"query_class": data.training_query_class})


def training_config(cfg: Config) -> Config:
    """`cfg` as the method actually trains: `train.shot` by its record's rule and `train.optim` resolved over
    its recipe, so the checkpoint's stored config (and the run's MLflow params) say what was trained."""
    method = get_method(cfg.model.method)
    train = cfg.train.model_copy(update={"shot": method.training_shot(cfg.train.shot),
                                         "optim": method.training_recipe(cfg.train.optim, cfg.train.method_optim)})
    return cfg.model_copy(update={"train": train})


def train_meta(cfg: Config, fold: folds.Split, *, progress: bool = True, resume_run: bool = True,
               device: torch.device | None = None, forward_wrapper: Any = None, reporter: Reporter | None = None,
               start: dict | None = None, checkpoint_dir: Path | None = None,
               observe: Any = None) -> FitResult:
    """Episodic meta-training of `model.method` on the fold's base classes, validated on the fixed
    validation list every epoch; `best.pt` keeps the best validation mIoU (ER under `train.supervision:
    presence`).

    The method's record gives its stage-1 start, optimisers (`Method.optimizers` over `train.optim` resolved
    against `Method.recipe`), training transform, trained shot and loss. `start` (a checkpoint payload) is
    loaded into the raw model before `forward_wrapper` (e.g. DDP) wraps it; without it or a `last.pt` to
    resume, `train.init` (a checkpoint of the same method and fold) gives the starting weights.
    `observe(loss_fn)` may wrap the loss to watch the steps (the Ray integration's fault injection) without a
    loop change.
    """
    device = device or default_device()
    cfg = training_config(cfg)
    method = get_method(cfg.model.method)
    if not method.learned:
        raise DataError(f"model.method: {method.key} is not trained (nothing learnable); evaluate it directly")
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = prepare_model(fresh_model(cfg, fold, tc.shot), device, tc)
    index, lists = load_index(cfg.data.prepared), load_fold(cfg.data.prepared, fold)
    sampler = TrainEpisodeSampler([(k, cs) for k, cs in lists["train"]], tc.shot, seed=tc.seed,
                                  present=present_classes(index, training_data(cfg.data), lists, "train"))
    # train.task fscs: iFSL's 1-way FS-CS episodes (the support class the query's own with probability 1/2)
    kind, draws = ((TrainWayEpisodeDataset, FSCSTrainSampler(sampler)) if tc.task == "fscs"
                   else (TrainEpisodeDataset, sampler))
    dataset = kind(draws, IndexSource(index, ("train",)), training_transform(method.transform, cfg.transform),
                   length=tc.episodes_per_epoch, rank=distributed.rank(), world_size=distributed.world_size(),
                   batch_size=tc.batch_size)
    loader = training_loader(dataset, tc)
    specs = method.optimizers(model, method.training_recipe(tc.optim, tc.method_optim))
    optimizer, scheduler = build_optimization(specs, tc.epochs * len(loader))
    run = checkpoint_dir or meta_dir(cfg, fold, tc.shot)
    if start is not None:
        # A payload Ray handed back: every rank loads it; each rank keeps its own (seeded) RNG stream.
        resume_payload = restore(start, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=False)
    else:
        resume_payload = _resume_payload(run, model, optimizer, scheduler, resume_run)
        if resume_payload is None and tc.init:  # a fine-tune's start; a resumed run continues its own weights
            load_init(model, tc.init, cfg, fold)
    val_loader = validation_loader(cfg, fold, tc.shot)
    n_classes = folds.num_classes(cfg.data.dataset)

    def validate(m: torch.nn.Module) -> dict[str, float]:
        if val_loader is None:
            return {}
        score_logits = val_loader.dataset.transform.score_logits
        if tc.task == "fscs":  # official fs-cs: FS-CS mIoU and ER at the training way
            iou, exact = evaluate_ways(m, val_loader, n_classes, amp=cfg.eval.amp, progress=progress,
                                       desc="validate", score_logits=score_logits)
            return {"val_miou": iou.miou(), "val_er": exact.value()}
        meter = evaluate(m, val_loader, n_classes, amp=cfg.eval.amp, progress=progress, desc="validate",
                         score_logits=score_logits)
        return {"val_miou": meter.miou(), "val_fbiou": meter.fb_iou()}

    loss: LossFn = method.training_loss(tc.supervision)  # train.supervision: masks, or presence labels only
    loss_fn: LossFn = observe(loss) if observe is not None else loss
    forward_model = forward_wrapper(model) if forward_wrapper is not None else model
    return fit(model, train_loader=loader, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
               epochs=tc.epochs, validate=validate, score_key=selection_key(cfg), checkpoint_dir=run,
               config=config_to_dict(cfg), start=resume_payload, reporter=reporter, forward_model=forward_model, amp=tc.amp,
               grad_clip=tc.grad_clip, progress=progress, desc=f"{method.key} fold {fold} {tc.shot}-shot")
