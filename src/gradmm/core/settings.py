"""The maths' choices, the solver's settings and the runtime (device, dtype), torch-free: the
CLI builds its options from them without importing torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gradmm.errors import UserError

if TYPE_CHECKING:
    import torch

# Which gradient is released and matched (see gradmm.core.gradients.GradientSpace).
MatchParams = Literal["output", "last-block", "label-rows", "sketch"]
# Which tokens the projection may choose (gradmm.core.projection.allowed_tokens).
TokenFilter = Literal["fixed", "paper"]
ProjectionOrder = Literal["cosine-first", "lm-first"]
# Which iterate a problem returns (gradmm.core.admm.SELECTIONS).
SelectRule = Literal["projected", "augmented"]
# Where x₀ comes from (gradmm.core.admm.ADMMSolver.initial_state), and how many candidate batches
# each scores when --init-candidates is unset: random draws are cheap, sampled text is not.
InitRule = Literal["random", "lm"]
INIT_CANDIDATES: dict[str, int] = {"random": 500, "lm": 4}


class SolverConfig(BaseModel):
    """Settings of the ADMM solver (``gradmm generate`` adds its own on top of these)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)
    steps: int = Field(30, ge=0, description="T: outer ADMM iterations")
    inner_steps: int = Field(50, ge=1, description="I: Adam steps per x-update")
    rho: float = Field(1.0, gt=0, description="ADMM penalty ρ")
    lr: float = Field(0.008, gt=0, description="Adam learning rate on x")
    grad_clip: float | None = Field(1.0, gt=0, description="x-gradient norm clip per problem")
    init: InitRule = Field(
        "random",
        description="x0: 'random' (best of K N(0, I) draws, the authors') or 'lm' (best of K "
        "batches of the LM's own text, sampled under the class's demonstrations)",
    )
    init_candidates: int | None = Field(
        None,
        ge=1,
        description="K: init batches scored, best kept (unset: "
        + ", ".join(f"{n} for {rule}" for rule, n in INIT_CANDIDATES.items())
        + ")",
    )
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

    @property
    def candidates(self) -> int:
        """K: ``init_candidates``, or the init rule's default."""
        return self.init_candidates or INIT_CANDIDATES[self.init]

    @model_validator(mode="after")
    def _patience_needs_projected(self) -> SolverConfig:
        if self.patience is not None and self.select != "projected":
            raise ValueError("patience needs select: projected (the rule that tracks the loss)")
        return self


Dtype = Literal["float32", "bfloat16", "float16"]


class Runtime(BaseModel):
    """Where and in which precision the transformer passes run (never changes what is computed
    beyond rounding; the matching loss, clipping and Adam state stay fp32)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    device: str = Field("auto", description="'auto' (the GPU if there is one), 'cpu', 'cuda[:N]'")
    dtype: Dtype = Field("float32", description="dtype of the transformer passes")

    def torch_device(self) -> torch.device:
        """The device, checked: a GPU that is not there is a :class:`UserError`."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise UserError(f"unknown device {self.device!r} (auto, cpu, cuda or cuda:N)") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"device {self.device!r} asked for, but no CUDA GPU is available")
            if (device.index or 0) >= torch.cuda.device_count():
                raise UserError(f"device {self.device!r}: only {torch.cuda.device_count()} GPUs")
        elif device.type != "cpu":
            raise UserError(f"unsupported device {self.device!r} (auto, cpu, cuda or cuda:N)")
        return device

    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)


TEXT_SLOT = "{text}"


LabelTokenPolicy = Literal["all", "first"]


LabelScore = Literal["sum", "mean"]
