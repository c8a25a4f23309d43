"""Settings from a config file plus command-line options, validated by pydantic; the field
descriptions several configs share."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gradmm.errors import UserError
from gradmm.files import read_yaml

ConfigT = TypeVar("ConfigT", bound=BaseModel)

# Descriptions of fields several configs share.
TASK = "built-in task name or a task YAML file"
MODEL = "'reference', a fetched name (gradmm model list), a .gguf file, a folder or a hub id"
DATA_DIR = "local data folder ($GRADMM_DATA_DIR when unset; neither: the Hugging Face hub)"


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
        missing = [str(err["loc"][0]) for err in e.errors() if err["type"] == "missing"]
        if missing:
            flags = ", ".join("--" + name.replace("_", "-") for name in missing)
            raise UserError(f"missing {flags} (a flag, or a key of --config)") from None
        raise UserError(f"invalid options: {one_line(e)}") from None
