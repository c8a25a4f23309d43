"""Loading a causal LM and its tokenizer from anything ``--model`` accepts."""

from __future__ import annotations

from pathlib import Path

import torch

from gradmm.core.lm import LoadedModel, check_logits_are_the_output_layers, output_layer
from gradmm.errors import UserError, describe
from gradmm.models.checkpoints import resolve_model_name


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") >= 2 or name.endswith("/")


def load_model(
    name: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> LoadedModel:
    """Load a causal LM and its tokenizer, frozen, in eval mode: ``name`` is anything
    :func:`~gradmm.models.checkpoints.resolve_model_name` accepts
    (``reference``, a fetched short name, a
    ``.gguf`` file, a folder, a hub id).

    fp32 by default: transformers v5 would otherwise use the checkpoint's dtype. Pass
    ``attn_implementation="eager"`` to differentiate gradients through attention (SDPA's CPU
    kernel has no double backward).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for loading an 8M model is noise; ours stay

    resolved = resolve_model_name(name)
    path = Path(resolved).expanduser()
    if not path.exists() and _looks_like_path(resolved):
        raise UserError(f"model folder not found: {name}")
    source = str(path) if path.exists() else resolved
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is a table of many lines: ours is one
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation
        )
    except RuntimeError as e:  # what transformers raises when config and weights disagree
        why = (
            "its config does not match the shapes of its weights"
            if "mismatched_sizes" in str(e)
            else describe(e)
        )
        raise UserError(f"could not load model {name!r}: {why}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model {name!r}: {describe(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval().requires_grad_(False)
    output = output_layer(model)
    check_logits_are_the_output_layers(model, output)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, output=output)
