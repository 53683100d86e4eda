"""YAML configs validated by pydantic, with `key=value` overrides from the command line.

Every section is a pydantic model with `extra="forbid"`, so a typo in a config or an override is
an error that names the field, not a silently ignored setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pallm.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["grpo.steps=50", "seed=1"]` -> `{"grpo": {"steps": 50}, "seed": 1}` (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. grpo.steps=50).")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'.")
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections.")
    return data


def build_config(
    model: type[T],
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> T:
    """Defaults <- `base` <- YAML file <- overrides, validated by `model`."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, load_yaml(path))
    data = deep_merge(data, parse_overrides(overrides or []))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        where = f"{path}" if path else "config"
        msgs = []
        for err in e.errors()[:5]:
            field = ".".join(str(x) for x in err["loc"])
            msgs.append(f"'{field}': {err['msg']}")
        raise ConfigError(f"{where}: " + "; ".join(msgs)) from None


def dump_config(cfg: BaseModel, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
