"""Settings of the stages, defined once: one pydantic model per stage, complete on its own
(:class:`ReleaseConfig`, :class:`GenerateConfig` on top of the solver's
:class:`gradmm.core.settings.SolverConfig`, :class:`FilterConfig`, :class:`FinetuneConfig`,
:class:`EvaluateConfig`). The CLI's options, their help and defaults, and ``docs/options.md``
are generated from these fields. Kept free of torch so that the CLI starts fast.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gradmm.core.settings import (
    MatchParams,
    ProjectionOrder,
    SolverConfig,
    TokenFilter,
)
from gradmm.data import paper
from gradmm.options import DATA_DIR, MODEL, TASK
from gradmm.privacy.accounting import Neighbouring


class ReleaseConfig(BaseModel):
    """Settings of ``gradmm release``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    task: str = Field(description=TASK)
    model: str = Field(description=MODEL)
    n_per_class: int = Field(
        25,
        ge=1,
        description="private examples sampled per class (Poisson sampling: the "
        "expected number, the public normaliser)",
    )
    sampling: Literal["fixed", "poisson"] = Field(
        "fixed",
        description="'fixed': n_per_class per class, seeded; 'poisson': every example "
        "of the split kept with probability sampling_rate (DP amplification)",
    )
    sampling_rate: float | None = Field(None, gt=0, le=1, description="q of --sampling poisson")
    split: str | None = Field(None, description="private split (default: the task's, 'train')")
    seed: int = Field(0, ge=0, description="seed of the pool's sample")
    # local paths (data_dir, canary_file) are never recorded: exclude=True keeps them out of
    # release.json
    data_dir: str | None = Field(None, exclude=True, description=DATA_DIR)
    preset: Literal["default", "paper"] = Field(
        "default", description="'paper': the authors' tokenisation of template and label words"
    )
    match_params: MatchParams = Field(
        "output",
        description="released gradient: the output layer (the paper), also the last decoder "
        "block, the label words' rows of the output layer, or a random sketch of it",
    )
    sketch_dim: int | None = Field(
        None, ge=1, description="R of --match-params sketch: R x V and R x d maps, R² numbers"
    )
    sketch_seed: int | None = Field(
        None, ge=0, description="public seed of the sketch's maps, recorded (sketch: default 0)"
    )
    batch_size: int = Field(32, ge=1, description="real examples per forward pass")
    max_text_tokens: int | None = Field(
        None,
        ge=1,
        description="cut texts to their first N tokens (default: the task's; a DP "
        "release cuts at most to the longest that fits the context)",
    )
    epsilon: float | None = Field(None, description="DP ε (with delta: a DP release)")
    delta: float | None = Field(None, description="DP δ")
    clip: float | None = Field(
        None, gt=0, description="DP per-example gradient norm bound C (DP: default 1.0)"
    )
    neighbouring: Neighbouring | None = Field(
        None, description="DP neighbouring relation (DP: default replace)"
    )
    target: Literal["real", "noise"] = Field(
        "real", description="'noise': zero-signal control of the same σ; reads no data"
    )
    canary_file: str | None = Field(
        None,
        exclude=True,
        description="audit only: JSONL of extra rows planted in the pool "
        "(gradmm canary-audit); recorded in the counts, its path is not",
    )
    # Seed of the DP noise: a simulation without guarantee, recorded in the mechanism (whoever
    # knows it can subtract the noise). Unset: the OS CSPRNG, nothing to replay.
    noise_seed: int | None = Field(
        None,
        ge=0,
        exclude=True,
        description="seed the DP noise: a recorded simulation with NO privacy guarantee",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ReleaseConfig:
        """Refuse options that would be ignored, and fill the defaults of those that apply: a
        setting is recorded only where it has an effect."""
        sketch = self.match_params == "sketch"
        if sketch and self.sketch_dim is None:
            raise ValueError("match_params sketch needs sketch_dim (R: the sketch is R x R)")
        for name in ("sketch_dim", "sketch_seed"):
            if not sketch and getattr(self, name) is not None:
                raise ValueError(f"{name} is only for match_params sketch")
        if sketch and self.sketch_seed is None:
            self.sketch_seed = 0
        if self.sampling == "poisson" and self.sampling_rate is None:
            raise ValueError("sampling poisson needs sampling_rate")
        if self.sampling != "poisson" and self.sampling_rate is not None:
            raise ValueError("sampling_rate is only for sampling poisson")
        if not self.private:
            for name in ("clip", "neighbouring", "noise_seed"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is a DP setting: give epsilon and delta too")
            if self.sampling == "poisson":
                raise ValueError("Poisson sampling is for DP releases: give epsilon and delta")
            if self.target == "noise":
                raise ValueError("target noise is a DP control: give epsilon and delta")
        else:
            if self.clip is None:
                self.clip = 1.0
            if self.neighbouring is None:
                self.neighbouring = "replace"
        return self

    @property
    def private(self) -> bool:
        return self.epsilon is not None or self.delta is not None

    def public_fields(self) -> dict:
        """The settings ``release.json`` records: all but the noise seed (recorded, when set, in
        the mechanism) and the local paths of the data folder and of any canary file."""
        return self.model_dump(mode="json")


class GenerateConfig(SolverConfig):
    """Settings of ``gradmm generate``: the solver's (:class:`SolverConfig`) and these. Defaults
    are the authors' (docs/authors-code.md, "Defaults") with the fixes of its "Bugs and
    deviations"; ``preset: paper`` restores the authors' behaviour (:mod:`gradmm.data.paper`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=False)
    preset: Literal["default", "paper"] = Field("default", description="'paper': the authors' way")
    per_class: int = Field(100, ge=1, description="synthetic examples per class")
    batch: int = Field(10, ge=1, description="B: sequences matched together (one ADMM problem)")
    length: int = Field(24, ge=1, description="free (text) tokens per sequence, template excluded")
    topk: int = Field(200, ge=1, description="k: candidate set of the projection")
    projection: ProjectionOrder = Field(
        "cosine-first", description="cosine-first (the authors' code) or lm-first candidates"
    )
    seed: int = Field(0, ge=0, description="random seed")
    target: Literal["release", "none"] = Field(
        "release", description="'none': no-matching control, the projection of the random init"
    )
    engine: Literal["fast", "reference"] = Field(
        "fast", description="fast (exact reformulation) or reference (the authors' computation)"
    )
    lm_prefix: str | None = Field(None, description="LM context of the projection ({label} ok)")
    projection_context: Literal["prefix", "chat", "demonstrations"] = Field(
        "prefix",
        description="what the projection's LM reads before the text: the LM prefix "
        "('chat': as a user turn of the tokenizer's chat template, as a task's chat_template "
        "does) or the class's public demonstrations and the template's head (the lm_prompted "
        "and --init lm context)",
    )
    checkpoint_every: int = Field(5, ge=1, description="outer iterations between checkpoints")
    token_filter: TokenFilter = Field(
        "fixed", description="tokens the projection may choose: 'fixed' (ours) or 'paper'"
    )
    freeze_template: bool | None = Field(
        None,
        description="zero the template positions' x-gradient (unset: yes; preset paper: on the "
        "authors' data sets only)",
    )
    # What a preset gives the options not set explicitly (the fields' defaults are `default`'s).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": paper.GENERATE_OPTIONS}

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in cls.PRESETS:
            return {**cls.PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _whole_problems(self) -> GenerateConfig:
        if self.per_class % self.batch:
            raise ValueError(
                f"per_class ({self.per_class}) must be a multiple of --batch "
                f"({self.batch}): each ADMM problem is one batch"
            )
        return self


class SelectConfig(BaseModel):
    """Settings of ``gradmm select`` (see :mod:`gradmm.stages.selection`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    per_class: int = Field(100, ge=1, description="N: texts selected per class")
    pool: int = Field(400, ge=1, description="M: texts sampled from the LM per class")
    seed: int = Field(0, ge=0, description="sampling seed")
    min_words: int = Field(
        4, ge=1, description="texts of fewer words are never selected (degenerate samples)"
    )
    max_perplexity: float | None = Field(
        None, gt=0, description="texts of higher perplexity are never selected (none: no limit)"
    )

    @model_validator(mode="after")
    def _pool_holds_the_selection(self) -> SelectConfig:
        if self.pool < self.per_class:
            raise ValueError(f"pool ({self.pool}) must be at least per_class ({self.per_class})")
        return self


class FilterConfig(BaseModel):
    """Settings of ``gradmm filter`` (see :mod:`gradmm.stages.filtering`)."""

    model_config = ConfigDict(extra="forbid")
    keep_per_class: int | None = Field(
        50, ge=1, description="keep the N lowest-loss examples per class (none: keep all)"
    )
    classifier: bool = Field(True, description="drop examples a few-shot classifier puts elsewhere")
    balance: bool = Field(True, description="balance the classes' mean matching loss")
    dedupe: bool = Field(True, description="keep identical texts once")


class QualityConfig(BaseModel):
    """Settings of ``gradmm quality`` (see :mod:`gradmm.stages.quality`)."""

    model_config = ConfigDict(extra="forbid")
    data: str = Field(description="JSONL with text and label (a training set, synthetic or real)")
    release: str | None = Field(
        None, description="release folder: its targets give the matching loss, its model and task"
    )
    model: str | None = Field(None, description=MODEL + " (default: the release's)")
    task: str | None = Field(None, description=TASK + " (default: the release's)")
    data_dir: str | None = Field(None, description=DATA_DIR)

    @model_validator(mode="after")
    def _model_and_task_known(self) -> QualityConfig:
        if self.release is None and (self.model is None or self.task is None):
            raise ValueError("without --release, give --model and --task")
        return self


class FinetuneConfig(BaseModel):
    """Settings of ``gradmm finetune`` (see :mod:`gradmm.stages.finetune`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(description=MODEL)
    task: str = Field(description=TASK)
    train: str = Field(description="JSONL with text and label (synthetic or real)")
    data_dir: str | None = Field(None, description=DATA_DIR)
    method: Literal["full", "lora"] = Field("full", description="all weights or LoRA adapters")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (linear decay to 0)")
    steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="examples per step")
    eval_every: int = Field(50, ge=1, description="steps between dev evaluations")
    selection: Literal["dev", "last"] = Field(
        "dev", description="'dev': best dev step; 'last': the last step (reads no dev data)"
    )
    dev_file: str | None = Field(
        None, description="public JSONL dev set (default: the dev slice of the private split)"
    )
    max_dev: int | None = Field(
        None, ge=1, description="cap on dev examples (a fixed sample, the same for every seed)"
    )
    lora_rank: int = Field(8, ge=1, description="rank of the LoRA adapters")
    max_test: int | None = Field(None, ge=1, description="cap on test examples (seeded sample)")
    seed: int = Field(0, ge=0, description="random seed (batch order, test sample)")
    save_model: bool = Field(False, description="also write the selected weights (OUT/model)")


class EvaluateConfig(BaseModel):
    """Settings of ``gradmm evaluate``: verbalizer accuracy on the task's test split."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(description=MODEL)
    task: str = Field(description=TASK)
    few_shot: int = Field(0, ge=0, description="demonstrations per class (from the dev set)")
    dev_file: str | None = Field(
        None, description="public JSONL of demonstrations (default: the private dev slice)"
    )
    data_dir: str | None = Field(None, description=DATA_DIR)
    max_test: int | None = Field(None, ge=1, description="cap on test examples (seeded sample)")
    seed: int = Field(0, ge=0, description="seed of the demonstrations and the test sample")
