"""Stage settings from a config file plus command-line options, validated by pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gradmm.errors import UserError
from gradmm.files import read_yaml

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def one_line(e: ValidationError) -> str:
    """A pydantic validation error as one line."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")  # our validators' own sentences
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def read_options_file(path: Path | None) -> dict[str, Any]:
    """A YAML (or JSON) mapping of option names to values; ``{}`` when ``path`` is None."""
    if path is None:
        return {}
    loaded = read_yaml(path, "config") or {}
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
