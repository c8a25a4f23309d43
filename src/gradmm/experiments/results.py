"""The typed result of one experiment cell, the schema of ``OUT/cells/.../result.json``.

A method measures a :class:`MethodResult`; the runner adds the cell's identity (task, method,
seed, DP settings, time taken) to make the :class:`CellResult` it writes and the report reads.
An optional measurement a method did not make (``None``) is left out of the file, not written as
null, so that a file reads as before: ``model_dump(mode="json")`` is the file's content.
Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from gradmm.errors import UserError
from gradmm.files import read_json


class MethodResult(BaseModel):
    """What a method measured on one cell: accuracy and, for a fine-tuned method, its training."""

    model_config = ConfigDict(extra="forbid")
    test_accuracy: float = Field(description="test accuracy, a fraction in [0, 1]")
    dev_accuracy: float | None = Field(
        description="dev-slice accuracy of the selected checkpoint, in [0, 1] (None: no "
        "fine-tuning, nothing selected)"
    )
    selected_step: int | None = Field(
        None, description="fine-tuning step kept on the dev slice (0: the model before fine-tuning)"
    )
    dev_curve: list[dict[str, float | None]] | None = Field(
        None,
        description="dev accuracy (a fraction) at each evaluated fine-tuning step, step 0 the "
        "model before fine-tuning: [{step, accuracy}]",
    )
    train_examples: int | None = Field(None, description="number of training examples")
    test_per_class_accuracy: dict[str, float | None] = Field(
        description="test accuracy per label name, in [0, 1] (None: no test example of the class)"
    )
    train_loss: list[float] | None = Field(None, description="training loss per fine-tuning step")
    train_per_class: list[int] | None = Field(
        None, description="number of training examples per class, in label order"
    )
    train_perplexity: float | None = Field(
        None, description="median perplexity of the training texts under the experiment's model"
    )
    train_perplexity_mean: float | None = Field(
        None, description="mean perplexity of the training texts under the experiment's model"
    )
    samples: dict[str, list[str]] | None = Field(
        None, description="first three training texts per label name (synthetic sets only)"
    )
    mean_rec_loss: float | None = Field(
        None, description="mean gradient-matching loss of the synthetic set (GRADMM methods)"
    )
    quality: dict[str, Any] | None = Field(
        None,
        description="the training set's quality (gradmm.stages.quality.set_quality): matching "
        "loss, perplexity, label fidelity, distinct-2, what it read",
    )
    privacy: dict[str, Any] | None = Field(
        None, description="the release's mechanism as recorded in its release.json (GRADMM)"
    )
    same_as: str | None = Field(
        None,
        description="the method whose finished cell this one repeats exactly (a size-matched "
        "baseline with nothing to cut): its measurements, reused",
    )

    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Optional fields (those with a default) are dumped only when set to a value."""
        fields = type(self).model_fields
        return {k: v for k, v in handler(self).items() if v is not None or fields[k].is_required()}


class CellResult(MethodResult):
    """One cell's ``result.json``: the method's measurements and the cell's identity."""

    task: str = Field(description="task name")
    method: str = Field(description="method name (gradmm.experiments.methods.METHODS)")
    seed: int = Field(description="the cell's seed")
    epsilon: float | None = Field(description="ε of a per-ε DP method (None: no DP setting)")
    n_per_class: int | None = Field(
        description="a DP study's private pool size per class (None: the experiment's)"
    )
    match_params: str | None = Field(
        description="a DP study's released gradient (None: the output layer, the default)"
    )
    seconds: float = Field(description="wall-clock time of the cell, in seconds")

    def measured(self) -> MethodResult:
        """The method's part of this cell, without the identity fields."""
        return MethodResult(**self.model_dump(include=set(MethodResult.model_fields)))


def read_result(path: Path) -> CellResult:
    """A cell's ``result.json``; a file of another schema is a :class:`UserError` naming it."""
    try:
        return CellResult.model_validate(read_json(path))
    except ValidationError as e:
        raise UserError(f"{path} is not a cell result of this gradmm: {e}") from None
