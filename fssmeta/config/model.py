"""`model`: the method, its backbone, its option sections and the family parts (memory, mining, stage 1)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, model_validator

from fssmeta.config.base import Section


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
    # RMT's L_pro: CE of the query segmented by cosine to the support's restyled fg / bg prototypes (x `prototype_scale`)
    prototype_weight: float = 0.0
    prototype_scale: float = 20.0
    # What the memory restyles: `mid` = the input of the mid-level reduction only; `backbone` = the frozen
    # layer2 / layer3 features themselves, so the layer4 prior, the base learner and BAM's Gram psi see the
    # restyled features too (layer4 is recomputed from the restyled layer3). docs/methods.md, RMT.
    restyle: Literal["mid", "backbone"] = "mid"


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
    # Where a method with a frozen ImageNet backbone (PFENet, NTRENet, HSNet, ASNet, the baseline) takes it from: `weights`
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
