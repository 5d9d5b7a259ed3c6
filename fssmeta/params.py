"""Reading params: params.yaml (or the embedded defaults) and `key.path=value` overrides into a validated
`Config`, with each method's options section (`model.<method>`) typed and filled by its record; a sweep's
tuned overrides. The schema itself is the fssmeta.config package.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from fssmeta.config import Config, ConfigError, ModelConfig, config_to_dict

if TYPE_CHECKING:
    from fssmeta.models.method import Method


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 requires a dot: `1.0e-3`)."""


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _expected(error: dict[str, Any]) -> str:
    kind = error["type"]
    names = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool",
             "tuple_type": "list", "dict_type": "mapping", "model_type": "mapping"}
    if kind in names:
        return f"expected {names[kind]}"
    if kind == "extra_forbidden":
        return "unknown key"
    return error["msg"]


def format_errors(exc: ValidationError, source: str, prefix: str = "") -> str:
    """One line per error: the dotted key path (under `prefix`), what was expected and what was given."""
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        path = ".".join([prefix] * bool(prefix) + [str(p) for p in err["loc"]])
        if err["type"] == "value_error":  # a validator's own message names the key and the value
            message = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"  {path}: {message}" if path else f"  {message}")
            continue
        got = err.get("input")
        got_text = "" if err["type"] in ("extra_forbidden", "missing") else f", got {type(got).__name__} {got!r}"
        lines.append(f"  {path}: {_expected(err)}{got_text}")
    return "\n".join(lines)


def parse_value(text: str) -> Any:
    """Parse an override value the way params.yaml would (`1` int, `1e-3` float, `[1, 5]` list).

    An empty value is the empty string (`--set data.val_list=`), not YAML's null.
    """
    return yaml.load(text, Loader=_Loader) if text.strip() else ""


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c = value` in a nested dict, creating intermediate mappings."""
    keys = dotted.split(".")
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a plain dict (a Ray worker's loop config, a checkpoint's stored config) against the schema,
    and against what `model.method` can run (`task_problem`: N-way lists, FS-CS training, weak labels)."""
    from fssmeta.models import METHODS

    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from None
    learned = sorted(k for k, m in METHODS.items() if m.learned)
    unknown = sorted(set(cfg.train.method_optim) - set(learned))
    if unknown:
        raise ConfigError(f"{source}: invalid configuration\n  train.method_optim.{unknown[0]}: not a method "
                          f"(model.method keys: {', '.join(learned)}; the baseline trains nothing)")
    if cfg.model.method in METHODS:  # an unknown method is refused where it is built, naming model.method
        problem = task_problem(cfg, METHODS[cfg.model.method], METHODS)
        if problem:
            raise ConfigError(f"{source}: invalid configuration\n  {problem}")
    return cfg


def task_problem(cfg: Config, record: Method, methods: dict[str, Method]) -> str:
    """What of the FS-CS task `record` cannot run, naming the key ("" = nothing): N-way lists or FS-CS
    training without `Method.fscs`; presence supervision without `Method.weak`, on FS-S episodes (every label
    would be "present") or with an option that lets the support mask reach the learner."""
    takers = "methods that can: " + ", ".join(sorted(k for k, m in methods.items() if m.fscs))
    if cfg.episodes.ways > 1 and not record.fscs:
        return (f"episodes.ways: {cfg.episodes.ways}-way FS-CS lists need a method that segments N ways and judges "
                f"presence; {record.key} does not ({takers}); set episodes.ways: 1")
    if cfg.train.task == "fscs" and not record.fscs:
        return (f"train.task: fscs (FS-CS training episodes) needs a method that takes them; {record.key} does not "
                f"({takers}); set train.task: fss")
    if cfg.train.supervision != "presence":
        return ""
    if record.weak is None:
        return (f"train.supervision: presence (weak labels) needs a method with a weak-label objective; "
                f"{record.key} has none; set train.supervision: mask")
    if cfg.train.task != "fscs":
        return ("train.supervision: presence learns whether the support class is in the query; FS-S episodes "
                "(train.task: fss) always hold it, so every label would be 1: set train.task: fscs")
    options = record.options_of(cfg.model)
    for option, value in record.weak.options.items():
        if getattr(options, option) != value:
            return (f"model.{record.key}.{option}: {getattr(options, option)!r} lets the support mask reach the "
                    f"learner, and train.supervision: presence trains without masks: set {value!r}")
    return ""


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read params.yaml (None: embedded defaults), apply `key.path=value` overrides, validate."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: params file not found")
        try:
            loaded = yaml.load(path.read_text(), Loader=_Loader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides or []]
    for key, value in items:
        apply_override(data, key, value)
    fill_method_options(data)
    return config_from_dict(data, source)


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value)


def with_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> Config:
    """`cfg` with dotted-key `overrides` applied and validated again. A float setting takes an int value
    (a sampled `2` for `lr`); the error names `source`."""
    data = config_to_dict(cfg)
    for key, value in overrides.items():
        node: Any = data
        for part in key.split(".")[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        current = node.get(key.split(".")[-1]) if isinstance(node, dict) else None
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        apply_override(data, key, value)
    fill_method_options(data)
    return config_from_dict(data, source)


def load_tuned(path: str | Path) -> dict[str, Any]:
    """The `overrides` mapping of a sweep's best.yaml (fssmeta/integrations/ray_tune.py)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no tuned params file (run the tune stage: `dvc repro tune` or `fssmeta tune`)")
    loaded = yaml.load(path.read_text(), Loader=_Loader) or {}
    overrides = loaded.get("overrides") if isinstance(loaded, dict) else None
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: expected a mapping `overrides: {{dotted.key: value}}`")
    return overrides


def apply_tuned(cfg: Config, path: str | Path) -> tuple[Config, dict[str, Any]]:
    """`cfg` with a sweep's best values (`load_tuned(path)`) applied, and those values."""
    tuned = load_tuned(path)
    return with_overrides(cfg, tuned, f"{path} (tuned overrides)"), tuned


def fill_method_options(data: dict[str, Any]) -> None:
    """Type every method's `model.<key>` options section in place: its keys checked (errors name
    `model.<key>.<option>`), its defaults filled, so the dumped config says what each method ran with.
    A `model.<name>` mapping that is no method's options section is an unknown key."""
    from fssmeta.models import METHODS

    model = data.get("model")
    if model is None:
        model = data["model"] = {}
    if not isinstance(model, dict):
        return  # the schema names the error
    with_options = {key: m for key, m in METHODS.items() if m.options is not None}
    known = set(ModelConfig.model_fields)
    for key in list(model):
        if key not in known and key not in with_options:
            raise ConfigError(f"model.{key}: unknown key (method option sections: {', '.join(sorted(with_options))})")
    for key, method in with_options.items():
        try:
            model[key] = config_to_dict(method.options.model_validate(model.get(key) or {}))
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, f"model.{key} ({key} options)", prefix=f"model.{key}")) from None


def config_from_args(args: Any) -> Config:
    """The Config of a command line's `--params FILE` and `--set key=value` (`fssmeta ...`)."""
    # `--params none` (or no params.yaml in the working folder) runs on the embedded defaults
    default_missing = args.params == "params.yaml" and not Path(args.params).is_file()
    params = None if args.params.lower() in ("", "none") or default_missing else args.params
    return load_config(params, args.set)
