"""Recipe configs: a typed dataclass per recipe; YAML sets values, the command line overrides them."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tunery.errors import TuneryError

C = TypeVar("C")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Turn YAML/CLI values into the field's type ('auto' stays a string where the type allows it)."""
    args = typing.get_args(annotation)
    options = (
        args
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        else (annotation,)
    )
    if value is None and type(None) in options:
        return None
    if isinstance(value, str) and value == "auto" and str in options:
        return value
    for option in options:
        if option is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif option in (int, float):
            if isinstance(value, bool):
                continue
            try:
                number = option(value)
            except (TypeError, ValueError):
                continue
            if option is int and isinstance(value, float) and value != int(value):
                continue
            return number
        elif option is str and isinstance(value, str | int | float):
            return str(value)
    raise TuneryError(f"config field '{name}': {value!r} is not a valid {annotation}")


def build_config(
    cls: type[C], yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> C:
    values: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise TuneryError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise TuneryError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise TuneryError(f"{path}: expected a mapping of config fields")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise TuneryError(
            f"unknown config field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(names))}"
        )
    coerced = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
    return cls(**coerced)


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise TuneryError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    return out


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
