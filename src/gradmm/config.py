"""Stage settings from a config file plus command-line options, validated by pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from gradmm.errors import UserError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def one_line(e: ValidationError) -> str:
    """A pydantic validation error as one line."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def read_options_file(path: Path | None) -> dict[str, Any]:
    """A YAML (or JSON) mapping of option names to values; ``{}`` when ``path`` is None."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a mapping of options")
    return {k.replace("-", "_"): v for k, v in loaded.items()}


def build_config(
    cls: type[ConfigT],
    options: dict[str, Any],
    config_file: Path | None = None,
    defaults: dict[str, Any] | None = None,
) -> ConfigT:
    """``cls`` from (lowest precedence first) ``defaults``, the config file, explicit options.

    Options whose value is None were not given on the command line and do not override.
    """
    merged = {**(defaults or {}), **read_options_file(config_file)}
    merged.update({k: v for k, v in options.items() if v is not None})
    try:
        return cls(**merged)
    except ValidationError as e:
        raise UserError(f"invalid options: {one_line(e)}") from None
