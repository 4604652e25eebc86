"""The typed config tree: YAML files (composed from fragments) → dataclasses, with ``--set`` overrides.

A pipeline YAML may list fragments under ``include:`` (paths relative to the including file); they
are deep-merged in order and the file's own keys win. ``--set a.b=c`` overrides any key after
loading; the value is parsed as YAML (``--set train.epochs=2``, ``--set data.window_range=[-160,240]``).
An unknown key or a value of the wrong type raises :class:`ConfigError` naming the key.

Example:
    >>> cfg = load_config("pipelines/quickstart.yaml", ["train.epochs=2"])
    >>> cfg.train.epochs
    2
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


# the schema (DataConfig, ..., Config) lives in medseg.config.schema; re-exported here
from medseg.config.schema import (  # noqa: E402
    CalibrationConfig,
    Config,
    CRFConfig,
    DataConfig,
    ElasticConfig,
    EvaluationConfig,
    HardNegativeConfig,
    InferenceConfig,
    LossConfig,
    MetricsConfig,
    ModelConfig,
    PredictConfig,
    PropagateConfig,
    TrackingConfig,
    TrainConfig,
    TransformsConfig,
    WeightMapConfig,
)

__all__ = ["ConfigError", "apply_override", "deep_merge", "flatten", "from_dict", "load_config", "public_dict",
           "read_yaml", "save_config", "to_dict", "CRFConfig", "CalibrationConfig", "Config", "DataConfig", "ElasticConfig", "EvaluationConfig", "HardNegativeConfig", "InferenceConfig", "LossConfig", "MetricsConfig", "ModelConfig", "PredictConfig", "PropagateConfig", "TrackingConfig", "TrainConfig", "TransformsConfig", "WeightMapConfig"]

# ----------------------------------------------------------------------------- conversion


_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (dicts → dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key} = {value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as true/false
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of: {', '.join(map(str, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a list")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected true/false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected an integer")
        return value
    if tp is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept exactly such numeric strings
        if isinstance(value, str) and _SCI.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a string")
        return value
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(
                f"unknown config key {full!r}; valid keys here: {', '.join(sorted(names))}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            full = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], full)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a plain (nested) dict."""
    return _from_dict(Config, data)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a plain nested dict (YAML-serialisable)."""
    return dataclasses.asdict(cfg)


def public_dict(cfg: Config) -> dict[str, Any]:
    """:func:`to_dict` with credentials removed (``tracking.uri`` through :func:`medseg.runtime.redact_uri`):
    what medseg writes anywhere — ``config.yaml``, the config inside checkpoints, MLflow params."""
    from medseg.runtime import redact_uri

    data = to_dict(cfg)
    data["tracking"]["uri"] = redact_uri(data["tracking"]["uri"])
    return data


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``over`` wins. Neither input is modified."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file and resolve its ``include:`` list (relative to the file), recursively."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    rp = path.resolve()
    if rp in _seen:
        raise ConfigError(f"include cycle: {' -> '.join(map(str, _seen + (rp,)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = deep_merge(merged, read_yaml(path.parent / inc, _seen + (rp,)))
    return deep_merge(merged, data)


def apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` override to a nested dict (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value (e.g. train.epochs=2)")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    out = dict(data)
    node = out
    for p in parts[:-1]:
        child = node.get(p)
        child = dict(child) if isinstance(child, dict) else {}
        node[p] = child
        node = child
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a pipeline YAML (with includes), apply ``--set`` overrides and validate.

    Args:
        path: the pipeline YAML; None starts from the defaults.
        overrides: ``key=value`` strings, applied in order.

    Raises:
        ConfigError: missing file, bad YAML, unknown key or wrong type (the message names the key).
    """
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    if path is not None and "name" not in data:
        data["name"] = Path(path).stem
    for ov in overrides or []:
        data = apply_override(data, ov)
    return from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(public_dict(cfg), sort_keys=False))
