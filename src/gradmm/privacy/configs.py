"""Settings of the privacy commands, torch-free like :mod:`gradmm.stages.configs` (the CLI's
options are generated from them): ``gradmm privacy`` (:class:`NoiseQuery`), ``gradmm audit``
(:class:`AuditConfig`) and ``gradmm canary-audit`` (:class:`CanaryAuditConfig`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gradmm.options import DATA_DIR
from gradmm.privacy.accounting import Neighbouring


class NoiseQuery(BaseModel):
    """Settings of ``gradmm privacy`` without release folders: the noise one release needs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    epsilon: float | None = Field(None, description="ε of one release")
    delta: float | None = Field(None, description="δ of one release")
    clip: float | None = Field(
        None, gt=0, description="per-example norm bound C (with n_per_class: the noise std)"
    )
    n_per_class: int | None = Field(None, ge=1, description="public examples per class")
    neighbouring: Neighbouring = Field("replace", description="neighbouring relation")
    sampling_rate: float | None = Field(
        None, gt=0, le=1, description="Poisson sampling rate q of the pool (add-remove only)"
    )


class AuditConfig(BaseModel):
    """Settings of ``gradmm audit``."""

    model_config = ConfigDict(extra="forbid")
    data_dir: str | None = Field(None, description=DATA_DIR + " (the data the release read)")
    finetuned: str | None = Field(
        None, description="fine-tuned model folder: adds a membership-inference test"
    )
    seed: int = Field(0, ge=0, description="seed of the membership test's held-out sample")


class CanaryAuditConfig(BaseModel):
    """Settings of ``gradmm canary-audit``: the release and generation it audits and the attack."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    release: dict[str, Any] = Field(description="release settings (ReleaseConfig)")
    generate: dict[str, Any] = Field(default_factory=dict, description="generate settings")
    canaries: int = Field(200, ge=2, description="canaries made; a seeded half is planted")
    prefix_words: int = Field(6, ge=1, description="words of the in-distribution prefix")
    suffix_tokens: int = Field(8, ge=1, description="uniformly random tokens of the suffix")
    ngram: int = Field(2, ge=1, description="order of the attack's n-gram model")
    seed: int = Field(0, ge=0, description="seed of the canaries and of the planted half")
