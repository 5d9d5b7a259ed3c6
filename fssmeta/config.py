"""The configuration schema: frozen pydantic models, one per top-level section of params.yaml.

Unknown keys and wrong types are rejected with the dotted key path and the expected type. Reading params.yaml,
overrides and the method option sections live in fssmeta/params.py. Every function receives the narrowest
section it needs; Ray workers rebuild a `Config` from a plain dict (`params.config_from_dict`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

# Counts that must be positive (episodes, shots, batch sizes) or non-negative (0 = "none" / "all"): a
# negative or zero value is rejected at load with its key path, not found mid-run.
Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
# A source split a model trains on: a fold (its base classes) or `all` (every source class; data/folds.py).
SourceSplit = NonNegative | Literal["all"]
# bf16 autocast: `off`; `cuda` = on CUDA only; `all` = on CUDA and on CPUs that compute bf16 natively
# (AVX-512 BF16 / AMX; elsewhere the CPU stays fp32). true / false read as `cuda` / `off` (earlier configs;
# YAML reads `on` / `off` as booleans too, hence `all`).
Amp = Annotated[Literal["off", "cuda", "all"],
                BeforeValidator(lambda v: {True: "cuda", False: "off"}[v] if isinstance(v, bool) else v)]


class ConfigError(ValueError):
    """A params file or an override that does not match the schema; the message names the key path."""


class Section(BaseModel):
    """Base of every config section: frozen, strict types, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _lists_to_tuples(cls, data: Any) -> Any:
        # YAML gives lists; the schema uses tuples so that a frozen config is hashable and immutable.
        if isinstance(data, dict):
            return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return data


class TargetConfig(Section):
    """One cross-domain target set in a PATNet layout, or PASCAL VOC val (`pascal`: RMT's cross-dataset setting)."""

    layout: Literal["deepglobe", "isic", "chest_xray", "fss1000", "suim", "pascal"]
    root: str
    # RMT's COCO-20i -> PASCAL: leave out the target classes the source model trained on (matched by name,
    # PASCAL's to COCO's; docs/protocol.md section 5), so each source split is scored on its unseen classes only.
    exclude_seen_classes: bool = False


class DataConfig(Section):
    """Which dataset, where it lives, and the protocol switches that change its lists (docs/protocol.md sections 1-2)."""

    dataset: Literal["synthetic", "pascal", "coco"] = "synthetic"
    root: str = "data/synthetic"
    # Reader used for the synthetic dataset, which is written in both layouts.
    format: Literal["voc", "coco"] = "voc"
    coco_split: Literal["interleaved", "consecutive"] = "interleaved"
    train_pool: Literal["pfenet", "hsnet"] = "pfenet"
    exclude_novel_images: bool = True
    # PFENet/BAM small-object rule: a class counts for an image only with >= 2*32*32 pixels. 0 disables it.
    min_object_pixels: int = 2048
    crowd: Literal["foreground", "ignore"] = "foreground"
    # The query's class in an `image`-order episode (docs/protocol.md section 3): `present` = any fold class
    # in the query image at any pixel count (PFENet/BAM `__getitem__`); `qualifying` = only the classes that
    # pass `min_object_pixels` (fssmeta's earlier convention). Supports always follow the small-object rule.
    query_class: Literal["present", "qualifying"] = "present"
    # The query's class in the TRAINING episodes (meta-training, the tune trials): `same` = `query_class`
    # (the official codes use one rule for both); `present` / `qualifying` set it apart from the test lists.
    train_query_class: Literal["same", "present", "qualifying"] = "same"
    # A COCO annotation whose segmentation is `[]`: left out with a warning (counted in the mask cache
    # manifest), or reported as an error by `prepare`.
    coco_empty_segmentation: Literal["skip", "error"] = "skip"
    # PASCAL list files (relative to root); lines are `<id>` or `JPEGImages/<id>.jpg SegmentationClassAug/<id>.png`.
    train_lists: tuple[str, ...] = ("ImageSets/Segmentation/train.txt", "ImageSets/SegmentationAug/train_noval.txt")
    test_list: str = "ImageSets/Segmentation/val.txt"
    # Pool for checkpoint selection; empty = the test pool, drawn with `episodes.val_seeds`.
    val_list: str = "ImageSets/Segmentation/selection.txt"
    mask_dir: str = "SegmentationClassAug"
    cache_dir: str = "data/cache"
    prepared: str = "data/prepared"
    targets: dict[str, TargetConfig] = {}

    @property
    def training_query_class(self) -> str:
        """The rule the training episodes follow: `train_query_class`, or `query_class` for `same`."""
        return self.query_class if self.train_query_class == "same" else self.train_query_class


class SynthesizeConfig(Section):
    """The procedurally generated few-shot dataset (the embedded default)."""

    out: str = "data/synthetic"
    seed: int = 0
    image_size: int = 160
    train_images: int = 1200
    test_images: int = 300
    val_images: int = 150
    target_images_per_class: int = 40
    max_objects: int = 4
    boundary_width: int = 2


class EpisodesConfig(Section):
    """Fixed test and validation episode lists (docs/protocol.md section 3)."""

    out: str = "data/episodes"
    folds: Annotated[tuple[NonNegative, ...], Field(min_length=1)] = (0, 1, 2, 3)
    shots: Annotated[tuple[Positive, ...], Field(min_length=1)] = (1, 5)
    orders: tuple[Literal["image", "class"], ...] = ("image", "class")
    test_episodes: Positive = 1000
    test_seeds: Annotated[tuple[int, ...], Field(min_length=1)] = (0, 1, 2, 3, 4)
    val_episodes: Positive = 200
    val_seeds: Annotated[tuple[int, ...], Field(min_length=1)] = (1000,)
    target_episodes: Positive = 600
    # Share of each cross-domain target's images per class held out as its selection pool (its `val` lists:
    # promotion and target-scored sweeps); the target's test lists never use them. 0 = PATNet's whole pool for
    # test, no selection lists, and no promotion on the targets (docs/protocol.md section 5).
    target_val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2


class TransformConfig(Section):
    """PFENet-family training augmentation."""

    crop_size: int = 473
    scale_min: float = 0.9
    scale_max: float = 1.1
    rotate_degrees: float = 10.0
    blur_prob: float = 0.5
    flip_prob: float = 0.5


Regime = Literal["none", "tta", "finetune"]


class TTAConfig(Section):
    """`eval.tta` / `eval.finetune`: adaptation on each episode's supports (fssmeta/adaptation.py), one
    section per regime that adapts."""

    steps: Positive = 20  # support-as-query forward / backward passes per episode, whatever the shot
    lr: Annotated[float, Field(gt=0)] = 1.0e-3
    optimizer: Literal["adam", "sgd"] = "adam"  # fresh per episode
    modules: tuple[str, ...] = ()  # module prefixes to adapt; () = every learnable parameter
    episodes: NonNegative = 0  # episodes scored per list under the regime (the first ones); 0 = eval.episodes


class EvalConfig(Section):
    """Test-time conventions (docs/protocol.md section 4)."""

    resolution: Literal["original", "resized"] = "original"
    test_size: Positive = 473
    # The square canvas at `original` resolution (docs/protocol.md section 4): `pfenet` (test_Resize), `bam`
    # (BAM's Resize), `mean` (fssmeta's earlier mean-colour canvas), or `method` = the method's own
    # (`Method.canvas`).
    canvas: Literal["method", "pfenet", "bam", "mean"] = "method"
    resized_size: Positive = 400
    episode_order: Literal["image", "class"] = "image"
    folds: Annotated[tuple[NonNegative, ...], Field(min_length=1)] = (0, 1, 2, 3)
    shots: Annotated[tuple[Positive, ...], Field(min_length=1)] = (1, 5)
    episodes: NonNegative = 0  # episodes scored per list; 0 = the whole list
    batch_size: Positive = 1  # `original` resolution scores every query at its own size: 1
    num_workers: NonNegative = 0
    amp: Amp = "off"  # bf16 autocast in evaluation (see `Amp`); fp32 by default: bf16 moves BAM's psi ~5%
    feature_cache_mib: NonNegative = 1024  # frozen features reused per image, exact at batch_size 1; 0 = off
    out: str = "results"
    baseline_threshold: float = 0.5  # the non-learned prototype baseline's cut on min-max cosine
    # Cross-domain: which source model scores the data.targets lists (docs/protocol.md section 5). `all` =
    # PATNet's: one model trained on every source class (its own stage 1 and meta stage), selected on held-out
    # source images; `splits` = RMT's: every eval.folds model, per-split rows and their mean; `fold` = the
    # `target_fold` model alone (fssmeta's earlier shortcut, neither paper's protocol).
    target_source: Literal["all", "splits", "fold"] = "all"
    target_fold: int = 0  # the fold of `target_source: fold`, and whose version promotion takes to `source`
    # none: the trained weights as they are; tta: adapted per episode on its supports (fssmeta/adaptation.py);
    # finetune: adapted per episode on its labelled supports, each predicted from the others (CRNet's k-shot).
    # `regime` is that of `fssmeta evaluate` and the evaluate stage; `target_regimes` those the
    # evaluate_targets stage scores, each to its own results file (the report never mixes them).
    regime: Regime = "none"
    target_regimes: Annotated[tuple[Regime, ...], Field(min_length=1)] = ("none",)
    tta: TTAConfig = TTAConfig()
    finetune: TTAConfig = TTAConfig(steps=10)

    @model_validator(mode="after")
    def _one_episode_at_a_time(self) -> EvalConfig:
        adapting = sorted({"tta", "finetune"} & {self.regime, *self.target_regimes})
        if self.batch_size != 1 and adapting:
            raise ValueError(f"eval.regime / eval.target_regimes {' / '.join(adapting)} adapts one episode at a time: it needs "
                             f"eval.batch_size 1 (got {self.batch_size})")
        return self

    @model_validator(mode="after")
    def _cache_at_batch_one(self) -> EvalConfig:
        # The cache's exactness contract is one episode per batch (models/feature_cache.py).
        if self.feature_cache_mib > 0 and self.batch_size != 1:
            raise ValueError(f"eval.feature_cache_mib {self.feature_cache_mib} needs eval.batch_size 1 (got "
                             f"{self.batch_size}): the cache is exact one episode at a time; set "
                             "eval.feature_cache_mib: 0 to score in batches")
        return self

    @property
    def size(self) -> int:
        """The model input side at test time: `test_size` (original) or `resized_size` (resized)."""
        return self.test_size if self.resolution == "original" else self.resized_size


class MemoryConfig(Section):
    """RMT meta-memory (fssmeta/models/memory.py): restyles the mid-level features of any PFENet-family learner."""

    enabled: bool = False
    items: int = 64  # N memory items
    momentum: float = 0.9  # EMA lambda of the writes
    alpha: float = 0.5  # share of the instance's own style in the restyled feature (1 = no restyling)
    # alpha in eval mode (target restyling at test time); null = `alpha`. Read from the params at evaluation,
    # like eval.baseline_threshold: changing it retrains nothing.
    test_alpha: float | None = None
    init: Literal["source", "random"] = "source"  # items from the first training batch's statistics, or random
    top_k: int = 8  # items retrieved per read
    temperature: float = 0.1  # softmax temperature of reads and writes (cosine similarities)
    index: Literal["flat", "ivf", "torch"] = "flat"  # FAISS exact / IVF, or the torch exact path
    nlist: int = 16  # IVF lists
    contrast_weight: float = 0.1  # L_cont (category contrast over memory-restyled views)
    contrast_temperature: float = 0.1


class MiningConfig(Section):
    """NTRENet non-target mining (fssmeta/models/mining.py): background and distracting-object elimination.

    `enabled` switches it on for BAM (the flagship); the `ntrenet` method always mines and reads the weights.
    """

    enabled: bool = False
    bg_weight: float = 1.0  # BG loss
    aux_final_weight: float = 0.4  # deep supervision of the final (per-scale) heads
    aux_initial_weight: float = 0.6  # deep supervision of the initial-prediction heads
    pcl_weight: float = 0.01  # prototypical contrastive loss
    pcl_temperature: float = 1.0
    queue_size: int = 2000  # distractor prototypes kept per class
    queue_sample: int = 1000  # negatives sampled per anchor
    # As NTRENet's paper and release (docs/methods.md, NTRENet), each with fssmeta's earlier form as the switch:
    do_prototype: Literal["average", "masked"] = "average"  # DOEM: mean of mask x feature | masked average
    pcl_form: Literal["paper", "infonce"] = "paper"  # positive left out of the denominator | standard InfoNCE
    queue_push: Literal["before", "after"] = "before"  # the batch's distractors join the queue before the loss


class PSPNetConfig(Section):
    """The stage-1 PSPNet (BAM's base learner; the backbone a method may take from stage 1)."""

    aux_head: bool = False  # semseg's layer3 deep-supervision head; BAM's stage-1 PSPNet has none
    ppm_dim: int = 512  # pyramid pooling branch width, stated at ResNet-50/101 (2048 / 4); scaled on `small`
    ppm_bins: tuple[int, ...] = (1, 2, 3, 6)
    dropout: float = 0.1


class ModelConfig(Section):
    """Which method and backbone, the stage-1 PSPNet, the family parts (memory, mining), and one options
    section per method: `model.<method key>` (e.g. `model.bam.reduce_dim`), typed by that method's record
    (`Method.options` in fssmeta/models) and checked when params are loaded (fssmeta/params.py)."""

    # Method option sections are the only extra keys; each must be a mapping (its method checks its keys).
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    method: str = "bam"  # a key of fssmeta.models.METHODS
    backbone: Literal["resnet50", "resnet101", "small"] = "small"
    weights: str = ""  # local ImageNet / PSPNet weight file for the backbone; "" = random init
    # Where a method with a frozen ImageNet backbone (PFENet, NTRENet, the baseline) takes it from: `weights`
    # (official: `model.weights`) or `stage1` (the fold's stage-1 PSPNet encoder, fssmeta's convention where no
    # ImageNet weights exist, as on the synthetic default). BAM always takes its encoder from stage 1, as published.
    backbone_source: Literal["weights", "stage1"] = "weights"
    # The frozen backbone's BN in training: `method` = each method's official convention (`Method.backbone_bn`:
    # PFENet and NTRENet leave BN in train mode, BAM fixes it), or `frozen` / `train` for every method.
    backbone_bn: Literal["method", "frozen", "train"] = "method"
    pspnet: PSPNetConfig = PSPNetConfig()
    memory: MemoryConfig = MemoryConfig()
    mining: MiningConfig = MiningConfig()

    @model_validator(mode="after")
    def _option_sections(self) -> ModelConfig:
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, dict):
                raise ValueError(f"{key}: unknown key (the extra keys of `model` are method option sections, "
                                 f"mappings such as `model.bam: {{reduce_dim: 256}}`)")
        return self

    def options(self, method: str) -> dict[str, Any]:
        """The raw `model.<method>` section ({} when absent); `Method.options_of` types it."""
        return dict((self.model_extra or {}).get(method, {}))


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
    optim: OptimConfig = OptimConfig()
    amp: Amp = "cuda"  # bf16 autocast in training steps (see `Amp`; evaluation: eval.amp)
    channels_last: bool = True  # on CUDA only
    val_episodes: NonNegative = 200  # validation episodes used per epoch (from the fixed val list); 0 = none
    grad_clip: float = 0.0
    out: str = "runs"
    log_every: int = 20  # steps between progress-bar metric refreshes


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


class Config(Section):
    """The whole params.yaml."""

    data: DataConfig = DataConfig()
    synthesize: SynthesizeConfig = SynthesizeConfig()
    episodes: EpisodesConfig = EpisodesConfig()
    transform: TransformConfig = TransformConfig()
    eval: EvalConfig = EvalConfig()
    model: ModelConfig = ModelConfig()
    train_base: BaseTrainConfig = BaseTrainConfig(epochs=6, batch_size=8, optim=OptimConfig(lr=2.5e-3))  # over SGD_RECIPE
    train: TrainConfig = TrainConfig(optim=OptimConfig(lr=0.05))  # as params.yaml: the CPU default rate
    report: ReportConfig = ReportConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    registry: RegistryConfig = RegistryConfig()
    tune: TuneConfig = TuneConfig()

    @model_validator(mode="after")
    def _tune_keys(self) -> Config:
        # A swept or overridden key must name a real setting of what a trial trains with.
        data = self.model_dump(mode="json")
        for field in ("search_space", "trial_overrides"):
            for key in getattr(self.tune, field):
                if key.split(".")[0] not in TUNABLE_SECTIONS:
                    raise ValueError(f"tune.{field}.{key}: only keys of {', '.join(TUNABLE_SECTIONS)} "
                                     "change what a trial trains")
                node: Any = data
                for part in key.split("."):
                    if not isinstance(node, dict) or part not in node:
                        raise ValueError(f"tune.{field}.{key}: no such setting")
                    node = node[part]
                if isinstance(node, dict):
                    raise ValueError(f"tune.{field}.{key}: is a section; name one of its settings")
        if self.tune.domain != "source" and self.tune.domain not in self.data.targets:
            known = ", ".join(["source", *sorted(self.data.targets)])
            raise ValueError(f"tune.domain: {self.tune.domain!r} is not `source` nor a data.targets name (known: {known})")
        return self


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict (tuples become lists) that `config_from_dict` reads back."""
    return cfg.model_dump(mode="json")
