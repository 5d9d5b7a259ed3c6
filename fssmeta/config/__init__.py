"""The configuration schema: frozen pydantic models, one per top-level section of params.yaml.

Unknown keys and wrong types are rejected with the dotted key path and the expected type. Reading params.yaml,
overrides and the method option sections live in fssmeta/params.py. Every function receives the narrowest
section it needs; Ray workers rebuild a `Config` from a plain dict (`params.config_from_dict`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, model_validator

from fssmeta.config.base import Amp, ConfigError, NonNegative, Positive, Section, SourceSplit
from fssmeta.config.data import DataConfig, EpisodesConfig, SynthesizeConfig, TargetConfig, TransformConfig
from fssmeta.config.evaluation import EvalConfig, FinetuneConfig, Regime, TTAConfig
from fssmeta.config.model import MemoryConfig, MiningConfig, ModelConfig, PSPNetConfig
from fssmeta.config.training import (
    SEARCH_KINDS,
    SGD_RECIPE,
    TUNABLE_SECTIONS,
    BaseTrainConfig,
    MlflowConfig,
    OptimConfig,
    RayConfig,
    RegistryConfig,
    ReportConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = [
    "SEARCH_KINDS", "SGD_RECIPE", "TUNABLE_SECTIONS", "Amp", "BaseTrainConfig", "Config", "ConfigError", "DataConfig",
    "EpisodesConfig", "EvalConfig", "FinetuneConfig", "MemoryConfig", "MiningConfig", "MlflowConfig", "ModelConfig", "NonNegative",
    "OptimConfig", "PSPNetConfig", "Positive", "RayConfig", "Regime", "RegistryConfig", "ReportConfig", "Section",
    "SourceSplit", "SynthesizeConfig", "TTAConfig", "TargetConfig", "TrainConfig", "TransformConfig", "TuneConfig",
    "config_to_dict",
]


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
