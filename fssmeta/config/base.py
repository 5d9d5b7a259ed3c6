"""The schema's building blocks: the frozen, strict `Section` base, `ConfigError` and the checked count types."""

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
