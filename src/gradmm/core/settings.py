"""The maths' choices and the solver's settings, torch-free (the CLI builds its options from
them without importing torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Which gradient is released and matched (see gradmm.core.gradients.GradientSpace).
MatchParams = Literal["output", "last-block", "label-rows", "sketch"]
# Which tokens the projection may choose (gradmm.core.projection.allowed_tokens).
TokenFilter = Literal["fixed", "paper"]
ProjectionOrder = Literal["cosine-first", "lm-first"]
# Which iterate a problem returns (gradmm.core.admm.SELECTIONS).
SelectRule = Literal["projected", "augmented"]


class SolverConfig(BaseModel):
    """Settings of the ADMM solver (``gradmm generate`` adds its own on top of these)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)
    steps: int = Field(30, ge=0, description="T: outer ADMM iterations")
    inner_steps: int = Field(50, ge=1, description="I: Adam steps per x-update")
    rho: float = Field(1.0, gt=0, description="ADMM penalty ρ")
    lr: float = Field(0.008, gt=0, description="Adam learning rate on x")
    grad_clip: float | None = Field(1.0, gt=0, description="x-gradient norm clip per problem")
    init_candidates: int = Field(500, ge=1, description="K: random init batches, best kept")
    init_scale: float | None = Field(
        None, gt=0, description="per-position init norm (default: mean token embedding norm)"
    )
    score_init_scaled: bool = Field(
        True, description="score init candidates at the scale they are used at"
    )
    freeze_template: bool = Field(True, description="zero the template positions' x-gradient")
    select: SelectRule = Field(
        "projected", description="'projected': best tokens seen; 'augmented': the authors' rule"
    )
    patience: int | None = Field(
        None,
        ge=1,
        description="stop once no problem's best loss improved for this many outer iterations "
        "(select: projected)",
    )

    @model_validator(mode="after")
    def _patience_needs_projected(self) -> SolverConfig:
        if self.patience is not None and self.select != "projected":
            raise ValueError("patience needs select: projected (the rule that tracks the loss)")
        return self
