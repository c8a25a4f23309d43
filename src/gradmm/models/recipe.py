"""The reference LM's recipe (:class:`LMTrainConfig`), torch-free: ``gradmm lm train``'s options
are generated from it."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LMTrainConfig(BaseModel):
    """Settings of ``gradmm lm train``. Defaults: an 8.9M-parameter Llama, 8192-token BPE."""

    model_config = ConfigDict(extra="forbid")
    data_dir: str = Field(
        description="folder holding imdb/ and wikitext2/ ($GRADMM_DATA_DIR when unset)"
    )
    vocab_size: int = 8192
    hidden_size: int = 256
    layers: int = 6
    heads: int = 4
    intermediate_size: int = 688
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 200
    max_steps: int = Field(6500, ge=1)
    bf16: bool = Field(
        True,
        description="bfloat16 autocast for the forward pass (weights and AdamW stay fp32); "
        "about 1.5x faster on CPUs with AMX/AVX512-BF16",
    )
    weight_decay: float = 0.1
    heldout_fraction: float = 0.01
    seed: int = Field(0, ge=0)
    checkpoint_every: int = 100
    log_every: int = 20

    @model_validator(mode="before")
    @classmethod
    def _data_dir_from_env(cls, data: Any) -> Any:
        env = os.environ.get("GRADMM_DATA_DIR")
        if isinstance(data, dict) and data.get("data_dir") is None and env:
            return {**data, "data_dir": env}
        return data
