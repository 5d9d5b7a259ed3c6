"""Run folders and the one path from a checkpoint to a model (evaluation, `fssmeta predict`, the MLflow
pyfunc model and the report all rebuild models here).

Layout: `<train.out>/fold<k>/base/` (stage 1) and `<train.out>/fold<k>/<method>-<shot>shot/` (meta
training), each holding `last.pt`, `best.pt` and `history.json`. A method trained 1-shot for every k
(`Method.trains_each_shot` false) keeps its checkpoint in `<method>-1shot`; the folder of another shot then
holds only `trained_shot.json`, saying where the checkpoint is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fssmeta.checkpoint import CheckpointError, load_model_state, read_checkpoint
from fssmeta.config import Config
from fssmeta.data import folds
from fssmeta.data.io import DataError, write_json_atomic
from fssmeta.data.prepare import load_fold
from fssmeta.models import build_model, get_method
from fssmeta.models.memory import MetaMemory
from fssmeta.params import config_from_dict

POINTER = "trained_shot.json"


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def base_dir(cfg: Config, fold: folds.Split) -> Path:
    """The fold's stage-1 folder, `<train_base.out>/fold<k>/base` (dvc.yaml's train_base outputs): where
    `train-base` writes and where the later stages read the base learner."""
    return Path(cfg.train_base.out) / folds.split_name(fold) / "base"


def run_dir(cfg: Config, fold: folds.Split, shot: int, method: str | None = None) -> Path:
    """The folder named for (fold, shot): the train_meta stage's output folder."""
    return Path(cfg.train.out) / folds.split_name(fold) / f"{method or cfg.model.method}-{shot}shot"


def meta_dir(cfg: Config, fold: folds.Split, shot: int, method: str | None = None) -> Path:
    """The folder holding the checkpoint that scores `shot`-shot episodes: `run_dir` of the training shot."""
    method = method or cfg.model.method
    return run_dir(cfg, fold, get_method(method).training_shot(shot), method)


def write_pointer(cfg: Config, fold: folds.Split, shot: int, method: str | None = None) -> Path:
    """For a method trained once at 1 shot: record in `run_dir(shot)` where its checkpoint lives."""
    method = method or cfg.model.method
    here, there = run_dir(cfg, fold, shot, method), meta_dir(cfg, fold, shot, method)
    write_json_atomic(here / POINTER, {"method": method, "fold": fold, "shot": shot,
                                       "trained_shot": get_method(method).training_shot(shot),
                                       "checkpoint_dir": str(there)})
    return here / POINTER


def fold_base_classes(cfg: Config, fold: folds.Split) -> list[int]:
    """The fold's base classes: the prepared fold list (`data.prepared`, relative to the working folder) when
    it holds this dataset's lists, else the protocol's definition (fssmeta.data.folds) that `prepare` writes."""
    split = folds.fold_classes(cfg.data.dataset, fold, cfg.data.coco_split)
    if (Path(cfg.data.prepared) / f"{folds.split_name(fold)}.json").is_file():
        prepared = load_fold(cfg.data.prepared, fold)
        if prepared.get("novel") == split["novel"]:  # else another dataset's lists live there now
            return [int(c) for c in prepared["base"]]
    return split["base"]


def stage1_checkpoint(cfg: Config, fold: folds.Split) -> Path:
    """The fold's stage-1 PSPNet checkpoint (`train_base.select`: `best.pt`, selected on validation, or
    `last.pt`); a missing one names the command that trains it."""
    base = base_dir(cfg, fold) / f"{cfg.train_base.select}.pt"
    if not base.is_file():
        raise DataError(f"{base}: no stage-1 base learner for fold {fold}; run `fssmeta train-base --fold {fold}` first")
    return base


def require_stage1(cfg: Config, fold: folds.Split, method: str | None = None) -> None:
    """Fail early (before workers start) when `method` starts from stage 1 and the fold has none."""
    if get_method(method or cfg.model.method).stage1_for(cfg.model) is not None:
        stage1_checkpoint(cfg, fold)


def fresh_model(cfg: Config, fold: folds.Split, shot: int, method: str | None = None) -> nn.Module:
    """`method` (default `model.method`) built for `shot` on the fold's base classes, with what its record
    takes from the fold's stage 1 loaded (`Method.stage1_for`: nothing for a method with no stage 1, or a
    backbone taken from `model.weights`)."""
    record = get_method(method or cfg.model.method)
    stage1 = record.stage1_for(cfg.model)
    model = build_model(cfg.model, shot=shot, base_classes=load_fold(cfg.data.prepared, fold)["base"],
                        method=record.key)
    if stage1 is not None:
        stage1.load(model, read_checkpoint(stage1_checkpoint(cfg, fold))["model"])
    return model


def load_init(model: nn.Module, path: str | Path, cfg: Config, fold: folds.Split) -> None:
    """`train.init`: load a checkpoint's model weights into a fresh `model` as a fine-tune's start. Refused,
    naming the file, unless the checkpoint is of `model.method` on the same data set and fold (a model trained
    on another fold has seen this fold's novel classes) and its weights fit the model."""
    payload = read_checkpoint(path)
    stored = stored_config(payload, path)
    problems = [f"{what} {theirs!r}, this run {ours!r}" for what, theirs, ours in (
        ("method", stored.model.method, cfg.model.method),
        ("data set", stored.data.dataset, cfg.data.dataset),
        ("fold", folds.split_name(stored.train.fold), folds.split_name(fold))) if theirs != ours]
    if problems:
        raise CheckpointError(f"{path} (train.init): trained with another setting: {'; '.join(problems)}")
    load_model_state(model, payload["model"], path)


def stored_config(payload: dict[str, Any], source: str | Path) -> Config:
    """The config a checkpoint was trained with. A config stored before `model.pspnet.aux_head` existed
    describes a PSPNet that always had the layer3 head: it is read with `aux_head: true`, so the checkpoints
    (and registered versions) of earlier releases still load."""
    if not payload.get("config"):
        raise CheckpointError(f"{source}: the checkpoint stores no config; save it with `config=...`")
    raw = payload["config"]
    pspnet = raw.get("model", {}).get("pspnet") if isinstance(raw, dict) else None
    if isinstance(pspnet, dict) and "aux_head" not in pspnet:
        raw = {**raw, "model": {**raw["model"], "pspnet": {**pspnet, "aux_head": True}}}
    return config_from_dict(raw, source=f"{source} (config)")


def model_from_checkpoint(payload: dict[str, Any], *, shot: int, base_classes: list[int], source: str | Path,
                          method: str | None = None) -> tuple[nn.Module, Config]:
    """The trained model (eval mode, CPU) rebuilt from its checkpoint's stored config (tuned values
    included, not params.yaml's), for `shot`-shot episodes, and that config."""
    cfg = stored_config(payload, source)
    record = get_method(method or cfg.model.method)
    # Built as trained: a method trained 1-shot for every k has the 1-shot layout at any `shot`.
    model = build_model(cfg.model, shot=record.training_shot(shot), base_classes=base_classes, method=record.key)
    load_model_state(model, payload["model"], source)
    return model.eval(), cfg


def evaluation_model(cfg: Config, fold: folds.Split, shot: int, method: str, device: torch.device) -> nn.Module:
    """What `fssmeta evaluate` scores at `shot`: a learned method's best checkpoint (selected on the
    validation list; its memory restyles at the params' `model.memory.test_alpha`), or a non-learned method built on the fold's stage 1 with `eval.baseline_threshold`."""
    record = get_method(method)
    if not record.learned:
        model = fresh_model(cfg, fold, shot, method)
        model.threshold = cfg.eval.baseline_threshold
        return model.to(device).eval()
    best = meta_dir(cfg, fold, shot, method) / "best.pt"
    if not best.is_file():
        raise DataError(f"{best}: no trained {method} for fold {fold}, {shot}-shot; run `fssmeta train "
                        f"--set model.method={method} --fold {fold} --shot {record.training_shot(shot)}` first")
    base_classes = load_fold(cfg.data.prepared, fold)["base"]
    model, _ = model_from_checkpoint(read_checkpoint(best), shot=shot, base_classes=base_classes, source=best,
                                     method=method)
    for module in model.modules():  # test-time settings come from the params, like the baseline's threshold
        if isinstance(module, MetaMemory):
            module.test_alpha = cfg.model.memory.test_alpha
    return model.to(device).eval()
