"""The release record: ``release.json``'s schema (:class:`ReleaseMeta`), and reading a release
back verified (:func:`load_release`), with the model it was computed with
(:func:`load_release_model`). Every stage after the release reads targets through here.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor

from gradmm.core.gradients import GradientSpace
from gradmm.core.lm import LoadedModel, fingerprint, matched_parameters, place
from gradmm.core.settings import MatchParams, Runtime
from gradmm.core.tokens import PromptTokens, tokenize_prompt
from gradmm.data.tasks import Task
from gradmm.errors import UserError
from gradmm.files import OutputKind, read_json
from gradmm.models.loading import load_model
from gradmm.options import one_line
from gradmm.privacy.accounting import DPSettings, Mechanism, mechanism, poisson_epsilon
from gradmm.stages.configs import ReleaseConfig

RELEASE_FORMAT = 5  # 5: the record's own sha256, planted counts (4: label word sequences)


RELEASE_DIR = OutputKind("release", "release.json", ("release.json", "targets.safetensors"))


class ModelInfo(BaseModel):
    """The model a release was computed with."""

    model_config = ConfigDict(extra="forbid")
    name: str  # what the user asked for
    path: str | None  # the local folder it resolved to (None: a hub id)
    fingerprint: str
    vocab_rows: int
    hidden_size: int
    has_bias: bool
    tied: bool


class OutputParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: str
    bias: str | None


class ReleaseMeta(BaseModel):
    """``release.json``: everything later stages may know about a release."""

    model_config = ConfigDict(extra="forbid")
    format: int
    gradmm_version: str
    task: Task
    target: Literal["real", "noise"]
    split: str | None  # None: the noise-only control read no data
    data_source: str | None  # data set and split file name (never a local path)
    model: ModelInfo
    prompt_tokens: PromptTokens
    counts: list[int]
    seed: int
    config: ReleaseConfig
    description: str
    match_params: MatchParams
    parameters: list[str]
    output_params: OutputParams
    mechanism: Mechanism
    # canary audits only: rows planted per class (in ``counts`` too), None for any other release
    planted: list[int] | None = None
    targets_sha256: str
    record_sha256: str = ""  # of this record without this field (:func:`record_digest`)

    @model_validator(mode="after")
    def _consistent(self) -> ReleaseMeta:
        """Catch edited records. ``release.json`` is not signed: with :func:`record_digest`
        these checks stop accidents and careless edits (a seeded release passed off as private,
        a real one as a control, counts that were not read), not a forger who rewrites every
        field consistently and recomputes the digests."""
        m, cfg = self.mechanism, self.config
        if self.target != cfg.target or (self.target == "noise") != (self.split is None):
            raise ValueError("target, config.target and split disagree")
        classes = self.task.num_classes
        planted = self.planted or [0] * classes
        # a Poisson sample's sizes stay private: its counts are the public normaliser
        pool = [cfg.n_per_class] * classes
        if len(planted) != classes or self.counts != [
            n + k for n, k in zip(pool, planted, strict=True)
        ]:
            raise ValueError(
                "counts are not the pool size the settings give (n_per_class per "
                "class, plus any planted canaries)"
            )
        if (m.type == "gaussian") != cfg.private:
            raise ValueError("the mechanism disagrees with config.epsilon/delta")
        if m.type == "gaussian":
            if (m.epsilon, m.delta, m.clip, m.neighbouring, m.normaliser, m.sampling_rate) != (
                cfg.epsilon,
                cfg.delta,
                cfg.clip,
                cfg.neighbouring,
                cfg.n_per_class,
                cfg.sampling_rate,
            ):
                raise ValueError("the mechanism disagrees with the recorded settings")
            dp = DPSettings(
                epsilon=cfg.epsilon, delta=cfg.delta, clip=cfg.clip, neighbouring=cfg.neighbouring
            )
            recorded = None
            if cfg.sampling_rate is not None:  # calibration takes a minute: check its ε instead
                recorded = m.noise_multiplier
                if poisson_epsilon(recorded, cfg.sampling_rate, cfg.delta) > cfg.epsilon * 1.001:
                    raise ValueError("mechanism.noise_multiplier does not give the recorded ε")
            expected = mechanism(
                dp,
                cfg.n_per_class,
                released_coordinates(self),
                m.noise_seed,
                cfg.sampling_rate,
                recorded,
            )
            for field in ("sensitivity", "noise_multiplier", "sigma_sum", "sampler", "accountant"):
                a, b = getattr(m, field), getattr(expected, field)
                if a != b and not (isinstance(a, float) and math.isclose(a, b, rel_tol=1e-6)):
                    raise ValueError(f"mechanism.{field} is not what the settings give")
        return self


@dataclass
class Release:
    """A loaded, verified release: what generation may use."""

    path: Path
    meta: ReleaseMeta
    targets: dict[str, Tensor]  # parameter name -> (C, *parameter shape)
    reused: bool = False  # an existing DP release returned as it was (no new noise)

    @property
    def target_weight(self) -> Tensor:
        """(C, V, d) target of the output layer's weight."""
        return self.targets[self.meta.output_params.weight]

    @property
    def target_bias(self) -> Tensor | None:
        """(C, V) target of the output layer's bias, or None."""
        name = self.meta.output_params.bias
        return None if name is None else self.targets[name]

    @property
    def space(self) -> GradientSpace:
        """Where the output layer's targets live (the full layer unless label-rows or sketch)."""
        return release_space(self.meta)

    @property
    def task(self) -> Task:
        return self.meta.task

    @property
    def prompt(self) -> PromptTokens:
        return self.meta.prompt_tokens


def release_space(meta: ReleaseMeta) -> GradientSpace:
    """The :class:`GradientSpace` of a release, rebuilt from its public record."""
    return GradientSpace.of(
        meta.match_params,
        meta.prompt_tokens.label_ids,
        meta.model.vocab_rows,
        meta.model.hidden_size,
        meta.config.sketch_dim,
        meta.config.sketch_seed,
    )


def load_release(path: Path) -> Release:
    """Read and verify a release folder written by :func:`release_targets`.

    Any defect (missing or malformed ``release.json``, targets that do not match their sha256,
    missing or extra tensors, shapes that disagree with the task and model, NaN or infinite
    values) is a one-line :class:`UserError`: a tampered or swapped release is never used.
    """
    path = Path(path)
    if not (path / "release.json").is_file():
        raise UserError(f"no release found at {path} (expected {path / 'release.json'})")
    raw = read_json(path / "release.json")
    if not isinstance(raw, dict) or raw.get("format") != RELEASE_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise UserError(f"{path}: unsupported release format {found!r} (expected {RELEASE_FORMAT})")
    if raw.get("record_sha256") != record_digest(raw):
        raise UserError(f"{path}/release.json does not match its record_sha256 (edited)")
    try:
        meta = ReleaseMeta.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{path}/release.json: invalid release record: {one_line(e)}") from None
    file = path / "targets.safetensors"
    if not file.is_file():
        raise UserError(f"{path}: targets.safetensors is missing")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.targets_sha256:
        raise UserError(
            f"{file} does not match the sha256 recorded in release.json (modified or swapped)"
        )
    try:
        targets = load_safetensors(data)
    except SafetensorError as e:
        raise UserError(f"{file}: unreadable ({e})") from None
    _check_targets(path, meta, targets)
    return Release(path, meta, targets)


def released_coordinates(meta: ReleaseMeta) -> int:
    """How many numbers a (closed-form) release holds: per class, the released weight gradient
    and its bias."""
    r1, r2 = release_space(meta).shape(meta.model.vocab_rows, meta.model.hidden_size)
    return meta.task.num_classes * (r1 * r2 + (r1 if meta.model.has_bias else 0))


def record_digest(record: dict) -> str:
    """sha256 of a ``release.json`` record without its ``record_sha256`` field (canonical JSON:
    sorted keys, no spaces; Python's float repr round-trips, so a re-read record digests the
    same)."""
    rest = {k: v for k, v in record.items() if k != "record_sha256"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _check_targets(path: Path, meta: ReleaseMeta, targets: dict[str, Tensor]) -> None:
    if sorted(targets) != sorted(meta.parameters):
        raise UserError(f"{path}: targets hold {sorted(targets)}, not {sorted(meta.parameters)}")
    out_names = [meta.output_params.weight, meta.output_params.bias or meta.output_params.weight]
    if not set(out_names) <= set(meta.parameters):
        raise UserError(f"{path}: output_params name tensors the release does not hold")
    classes = meta.task.num_classes
    label_ids = meta.prompt_tokens.label_ids
    if len(meta.counts) != classes or len(label_ids) != classes or not all(label_ids):
        raise UserError(f"{path}: counts or label ids do not match the task's {classes} classes")
    out = meta.output_params
    if meta.match_params == "sketch" and meta.config.sketch_dim is None:
        raise UserError(f"{path}: a sketch release without its sketch_dim")
    r1, r2 = release_space(meta).shape(meta.model.vocab_rows, meta.model.hidden_size)
    expected = {out.weight: (classes, r1, r2)}
    if out.bias is not None:
        expected[out.bias] = (classes, r1)
    for name, t in targets.items():
        if t.ndim < 2 or t.shape[0] != classes:
            raise UserError(
                f"{path}: target {name!r} has shape {tuple(t.shape)}; expected one row per class "
                f"of task {meta.task.name!r} ({classes})"
            )
        if name in expected and tuple(t.shape) != expected[name]:
            raise UserError(
                f"{path}: target {name!r} has shape {tuple(t.shape)}, not {expected[name]}"
            )
        if not torch.isfinite(t).all():
            raise UserError(f"{path}: target {name!r} contains NaN or infinite values")


def load_release_model(release: Release, runtime: Runtime | None = None) -> LoadedModel:
    """The model ``release`` was computed with, refused if its weights or shapes differ, then
    placed on ``runtime``'s device and dtype."""
    info = release.meta.model
    # double backward through attention needs eager attention (SDPA's CPU kernel has none)
    eager = "eager" if release.meta.match_params == "last-block" else None
    # the recorded folder, else the name (a fetched model's cache may live elsewhere here)
    source = info.path if info.path and Path(info.path).exists() else info.name
    lm = load_model(source, attn_implementation=eager)
    if fingerprint(lm.model) != info.fingerprint:
        raise UserError(
            f"model {info.name!r} differs from the one the release was computed with "
            "(fingerprint mismatch)"
        )
    if tokenize_prompt(release.task, lm.tokenizer) != release.prompt:
        raise UserError(
            f"{release.path}/release.json: its prompt_tokens are not its task's "
            "template and label words in the model's tokens (edited)"
        )
    params = matched_parameters(lm.model, release.meta.match_params)
    if not release.space.identity:  # mapped targets: the model must still have the head's shape
        weight = release.meta.output_params.weight
        if weight not in params or tuple(params[weight].shape) != (
            info.vocab_rows,
            info.hidden_size,
        ):
            raise UserError(f"{release.path}: the model's output layer does not fit the release")
        return place(lm, runtime)
    for name, t in release.targets.items():
        if name not in params or tuple(t.shape[1:]) != tuple(params[name].shape):
            raise UserError(
                f"{release.path}: target {name!r} of shape {tuple(t.shape)} does not fit the "
                "model's parameters"
            )
    return place(lm, runtime)
