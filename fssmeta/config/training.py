"""Training sections: the optimiser recipe, meta-training and stage 1, Ray, MLflow, the registry, the sweep
and the report."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from fssmeta.config.base import Amp, NonNegative, Positive, Section, SourceSplit
from fssmeta.config.data import TransformConfig


class OptimConfig(Section):
    """An optimiser recipe. Unset keys (null) take the method's published recipe (`Method.recipe`), so
    `train.optim` holds only what a run changes. `lr` is the EFFECTIVE learning rate every group trains at."""

    optimizer: Literal["sgd", "adam", "adamw"] | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    power: float | None = None  # poly schedule; 0 = constant
    warmup_steps: int | None = None

    def resolved(self, recipe: OptimConfig) -> OptimConfig:
        """This recipe's set keys over `recipe`'s (which must set every key)."""
        merged = recipe.model_copy(update={k: v for k, v in self.model_dump().items() if v is not None})
        missing = [k for k, v in merged.model_dump().items() if v is None]
        if missing:
            raise ValueError(f"optimiser recipe incomplete: {', '.join(missing)} unset")
        return merged


# The PFENet-family SGD recipe the loop used before recipes moved into the method records (poly 0.9,
# momentum 0.9, wd 1e-4); lr 0.05 is this project's CPU default on the synthetic data, not a published value.
SGD_RECIPE = OptimConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1.0e-4, power=0.9, warmup_steps=0)


class TrainConfig(Section):
    """A training stage (base learner or episodic meta-training): one loop, one process or DDP."""

    fold: SourceSplit = 0  # a fold, or `all` (every source class: the cross-domain source model)
    shot: Positive = 1  # episodes' shots; a method trained 1-shot for every k (Method.trains_each_shot) uses 1
    seed: int = 0
    epochs: NonNegative = 4
    episodes_per_epoch: Positive = 200  # per rank (meta); images per epoch for the base learner
    batch_size: Positive = 4
    num_workers: NonNegative = 0
    optim: OptimConfig = OptimConfig()  # a run's overrides over every method's recipe (a sweep sets optim.lr)
    # Per-method overrides, under `optim` and over that method's recipe: a data set's rates for the methods they
    # suit (params.yaml: the SGD methods' CPU rate), so switching model.method never carries an SGD rate into an
    # Adam recipe. Keys are `model.method` keys (checked at load).
    method_optim: dict[str, OptimConfig] = {}
    amp: Amp = "cuda"  # bf16 autocast in training steps (see `Amp`; evaluation: eval.amp)
    channels_last: bool = True  # on CUDA only
    val_episodes: NonNegative = 200  # validation episodes used per epoch (from the fixed val list); 0 = none
    grad_clip: float = 0.0
    out: str = "runs"
    log_every: int = 20  # steps between progress-bar metric refreshes
    # The training episodes: `fss` = the query holds the support class; `fscs` = iFSL's 1-way FS-CS episodes
    # (the support class is the query's own with probability 1/2, else another base class, as the official
    # fs-cs loader trains), for a method whose record says `fscs`.
    task: Literal["fss", "fscs"] = "fss"
    # What the loss reads: `mask` = the query's mask; `presence` = only whether the support class is in the
    # query (iFSL's weak labels, official `--weak`): needs `task: fscs` and a record with `weak`.
    supervision: Literal["mask", "presence"] = "mask"
    # A checkpoint whose model weights start this run, a fine-tune: its optimiser, schedule and epochs start
    # afresh. Same method, data set and fold as this run (another fold's base classes hold this fold's novel
    # ones). "" = the method's own start (its stage 1). E.g. an FS-S-trained ASNet as the start of
    # `task: fscs` (docs/results.md, "FS-CS, 2-way 1-shot": measured, not a fix on the CPU default).
    init: str = ""


class BaseTrainConfig(TrainConfig):
    """Stage 1, the PSPNet base learner, as BAM trains it (`train_base.py`, its `*_base.yaml` configs).
    `optim.lr` is the head's rate (PPM and classifier); the encoder trains at `lr x encoder_lr_scale`
    (PASCAL: 2.5e-3 and 2.5e-4, scale 0.1; COCO: 2.5e-3 for both, scale 1). `val_episodes` here counts
    validation IMAGES per epoch, from the dataset's validation pool, scored by base-class mIoU."""

    images: Literal["all", "meta"] = "all"  # every training image, novel pixels -> background | the meta list
    encoder_lr_scale: Annotated[float, Field(gt=0)] = 0.1
    select: Literal["best", "last"] = "best"  # the stage-1 checkpoint later stages load: best on validation | last
    transform: TransformConfig = TransformConfig(crop_size=417, scale_min=0.5, scale_max=2.0)  # BAM's PASCAL stage 1

    @model_validator(mode="after")
    def _selection(self) -> BaseTrainConfig:
        if self.task != "fss" or self.supervision != "mask":
            raise ValueError("task / supervision: stage 1 is supervised segmentation of whole images; leave "
                             "them at fss / mask (train.task and train.supervision set the episodic training)")
        if self.init:
            raise ValueError("init: stage 1 starts from its encoder's weights (model.weights), not from a "
                             "checkpoint; train.init sets the episodic training's start")
        if self.select == "best" and self.val_episodes == 0:
            raise ValueError("select: `best` needs validation images (val_episodes > 0); set select: last to "
                             "keep the last epoch's base learner")
        return self


class ReportConfig(Section):
    """The report stage: tables, metrics and plots."""

    out: str = "report"
    qualitative_episodes: int = 4
    ablation: str = "benchmarks/results/ablation.json"  # benchmarks/ablation.py's output, rendered when present


class RayConfig(Section):
    """Ray Train: where the cluster is and how many workers train (fssmeta/integrations/ray_train.py)."""

    address: str = ""  # "" = start a local Ray; "auto" or "ray://host:10001" = an existing cluster
    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = {}  # e.g. {CPU: 1} or {CPU: 4, GPU: 1}
    max_failures: int = 2  # worker / node failures survived by resuming from the last checkpoint
    storage_path: str = "ray_results"  # made absolute at run time (Ray requires it)
    num_cpus: int = 0  # CPUs of a local Ray started by fssmeta; 0 = all
    fail_at_step: int = 0  # fault injection for tests: the first attempt's rank-0 worker dies at this step

    @model_validator(mode="after")
    def _local_storage(self) -> RayConfig:
        # The driver reads the run's files through the local filesystem: a URI would become a local folder.
        if "://" in self.storage_path:
            raise ValueError(f"storage_path: must be a local path every node shares (NFS, EFS, a RWX volume); "
                             f"URIs such as {self.storage_path!r} are not supported")
        return self


class MlflowConfig(Section):
    """Tracking: a sqlite file and an artifact folder in the project by default; a server at scale."""

    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI in the environment wins
    artifact_location: str = "mlartifacts"
    experiment: str = "fssmeta"
    registered_model: str = "fssmeta"


class RegistryConfig(Section):
    """Per-domain promotion in the MLflow registry (fssmeta/integrations/promotion.py)."""

    min_improvement: float = 0.005  # mIoU a challenger must gain over the champion to take its alias
    promote: bool = True  # the register stage promotes the `eval.target_fold` / `shot` version per domain
    shot: int = 1  # which shot's version the register stage promotes (aliases compare equal shots only)
    domains: tuple[str, ...] = ()  # () = `source` and every data.targets name
    # Every promotion must also beat the non-learned baseline (`model.method: baseline`) on the same selection
    # episodes, the first one ("no champion yet") included: that floor has no switch.


SEARCH_KINDS = {"uniform": 2, "loguniform": 2, "randint": 2, "choice": None}  # kind -> number of arguments
TUNABLE_SECTIONS = ("train", "model", "transform")  # what a trial trains with


class TuneConfig(Section):
    """A Ray Tune sweep before meta-training (fssmeta/integrations/ray_tune.py): Optuna search, ASHA early
    stopping, scored on the VALIDATION episodes: the fold's (`domain: source`) or one cross-domain target's
    selection lists (`domain: <data.targets name>`). The best values go to `<out>/best.yaml`, which the
    train_meta stage applies on top of params.yaml; 0 trials = params pass through unchanged.

    `search_space` maps a dotted key of train / model / transform to `[kind, args...]`: `[loguniform, lo, hi]`,
    `[uniform, lo, hi]`, `[randint, lo, hi]` (hi exclusive) or `[choice, a, b, ...]`. `trial_overrides`
    (dotted key -> value) is the trials' short schedule, not written to best.yaml.
    """

    trials: int = 0
    fold: int = 0
    shot: int = 1
    search_space: dict[str, tuple[Any, ...]] = {}
    trial_overrides: dict[str, Any] = {}
    max_concurrent_trials: int = 2
    grace_period: int = 1  # ASHA: epochs every trial runs before it may be stopped (capped at the trials' epochs)
    reduction_factor: int = 2  # ASHA: 1 / reduction_factor of the trials go on at each rung
    seed: int = 0  # Optuna's sampler
    num_workers: int = 1  # Ray Train workers per trial: 1 = a function trainable; > 1 = a TorchTrainer per trial
    cpus_per_trial: float = 1.0  # a single-worker trial's CPUs (several workers: ray.resources_per_worker each)
    out: str = "runs/tune"  # best.yaml and trials.json
    # What scores a trial: `source` = `fold`'s validation list; a data.targets name = that target's selection
    # lists (episodes.target_val_fraction > 0), every epoch's checkpoint rebuilt and scored in the trial.
    domain: str = "source"

    @model_validator(mode="before")
    @classmethod
    def _spec_lists(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("search_space"), dict):
            data = {**data, "search_space": {k: tuple(v) if isinstance(v, list) else v
                                             for k, v in data["search_space"].items()}}
        return data

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        if self.trials < 0 or self.max_concurrent_trials < 1 or self.num_workers < 1:
            raise ValueError("trials must be >= 0, max_concurrent_trials and num_workers >= 1")
        if self.trials and not self.search_space:
            raise ValueError("search_space is empty: declare at least one key to search (or set trials: 0)")
        if not self.domain:
            raise ValueError("domain: empty; `source` or a data.targets name")
        if self.domain != "source" and self.num_workers > 1:
            # the target is scored on each epoch's checkpoint in the trial's own process (a function trainable)
            raise ValueError(f"domain {self.domain!r}: a sweep scored on a target runs single-worker trials; "
                             f"set num_workers: 1 (got {self.num_workers}) or domain: source")
        for key, spec in self.search_space.items():
            kind = spec[0] if spec else None
            if kind not in SEARCH_KINDS:
                raise ValueError(f"search_space.{key}: expected [kind, args...] with kind one of "
                                 f"{', '.join(SEARCH_KINDS)}, got {list(spec)!r}")
            args = spec[1:]
            if kind == "choice":
                if not args:
                    raise ValueError(f"search_space.{key}: [choice, ...] needs at least one value")
                continue
            numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
            if len(args) != 2 or not numeric or not args[0] < args[1]:
                raise ValueError(f"search_space.{key}: [{kind}, lo, hi] needs two numbers with lo < hi, got {list(args)!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"search_space.{key}: loguniform needs lo > 0, got {args[0]!r}")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise ValueError(f"search_space.{key}: randint needs integer bounds, got {list(args)!r}")
        return self
