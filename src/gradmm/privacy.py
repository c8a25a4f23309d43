"""Differential privacy of the target release: calibration, reports and composition.

The mechanism (one Gaussian release for all classes at once):

1. each private example's output-layer gradient ``g_i = (r_i h_iᵀ, r_i)`` is clipped jointly
   (weight and bias) to norm ``C``: ``ĝ_i = g_i · min(1, C / ‖g_i‖)`` (closed-form norms);
2. per class ``S_c = Σ_{i ∈ c} ĝ_i``; the vector of all ``S_c`` gets one draw of
   ``N(0, σ² I)`` with ``σ = z · Δ``;
3. the target is ``(S_c + noise) / n``, with ``n`` the *public* number of examples per class.

``z = σ/Δ`` is the noise multiplier of the exact analytic Gaussian mechanism (Balle & Wang 2018)
for ``(ε, δ)``, from Google's ``dp_accounting``; never the classic ``sqrt(2 ln(1.25/δ))/ε``.
The L2 sensitivity ``Δ`` of the concatenated sums depends on the neighbouring relation:

* ``replace``: the private pool is replaced by one that differs in one example of the same class
  (per-class counts are public and fixed): ``Δ = 2C``;
* ``add-remove``: one example is added or removed: ``Δ = C``. The normaliser stays the public
  ``n`` (the actual count is never used or released).

Everything after the release (generation, filtering, reports) is post-processing of it.
"""

from __future__ import annotations

import math
from importlib.metadata import version
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gradmm.errors import UserError

Neighbouring = Literal["replace", "add-remove"]
ACCOUNTANT = "dp_accounting.gaussian_mechanism.get_sigma_gaussian (analytic Gaussian)"


class DPSettings(BaseModel):
    """The privacy parameters a user asks for."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    clip: float = Field(gt=0, description="per-example gradient norm bound C")
    neighbouring: Neighbouring = "replace"

    @model_validator(mode="after")
    def _finite(self) -> DPSettings:
        if not all(math.isfinite(v) for v in (self.epsilon, self.delta, self.clip)):
            raise ValueError("epsilon, delta and clip must be finite")
        return self


def check_settings(epsilon: float | None, delta: float | None) -> None:
    """One-line errors for invalid (ε, δ) before anything else runs."""
    if epsilon is None or delta is None:
        raise UserError("differential privacy needs both --epsilon and --delta")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise UserError(f"--epsilon must be a positive number, got {epsilon}")
    if not (0 < delta < 1):
        raise UserError(f"--delta must be in (0, 1), got {delta}")


def noise_multiplier(epsilon: float, delta: float) -> float:
    """σ/Δ of one Gaussian release that is (ε, δ)-DP (exact analytic calibration)."""
    check_settings(epsilon, delta)
    from dp_accounting.gaussian_mechanism import get_sigma_gaussian

    return float(get_sigma_gaussian(epsilon, delta))


def sensitivity(clip: float, neighbouring: Neighbouring) -> float:
    """L2 sensitivity of the concatenated per-class sums of clipped gradients."""
    return 2.0 * clip if neighbouring == "replace" else clip


def mechanism(settings: DPSettings, n_per_class: int) -> dict:
    """Everything ``release.json`` records about the DP mechanism."""
    z = noise_multiplier(settings.epsilon, settings.delta)
    delta_l2 = sensitivity(settings.clip, settings.neighbouring)
    return {
        "type": "gaussian",
        "private": True,
        "epsilon": settings.epsilon,
        "delta": settings.delta,
        "clip": settings.clip,
        "neighbouring": settings.neighbouring,
        "sensitivity": delta_l2,
        "noise_multiplier": z,
        "sigma_sum": z * delta_l2,
        "sigma_target": z * delta_l2 / n_per_class,
        "normaliser": n_per_class,
        "counts": "public input (--n-per-class), not released from data",
        "accountant": ACCOUNTANT,
        "accountant_version": version("dp-accounting"),
    }


def composed_epsilon(noise_multipliers: list[float], delta: float) -> float:
    """ε of several Gaussian releases on the same data (PLD accountant), at total ``delta``."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant()
    for z in noise_multipliers:
        acc.compose(dp_accounting.GaussianDpEvent(z))
    return float(acc.get_epsilon(delta))


def report(meta: dict) -> str:
    """Human-readable privacy report of one release (``release.json`` contents)."""
    m = meta["mechanism"]
    lines = [f"release of task {meta['task']['name']!r}, model {meta['model']['name']!r}"]
    if m["type"] == "none":
        lines += [
            "NOT differentially private: the targets are exact class means of the private "
            "examples. Treat the release and everything generated from it as private data."
        ]
        return "\n".join(lines)
    unit = {
        "replace": "one private example replaced by another of the same class "
        "(per-class counts public)",
        "add-remove": "one private example added or removed",
    }[m["neighbouring"]]
    data = (
        "no data (pure noise control)"
        if meta.get("target") == "noise"
        else (f"{sum(meta['counts'])} private examples from split {meta['split']!r}")
    )
    lines += [
        f"protected unit: one example; neighbouring relation: {unit}",
        f"guarantee: ({m['epsilon']}, {m['delta']})-DP for the whole release (all classes, "
        "one Gaussian draw)",
        f"data read: {data}",
        f"clip C = {m['clip']}, sensitivity Δ = {m['sensitivity']}, noise multiplier σ/Δ = "
        f"{m['noise_multiplier']:.6g}, noise std on each class sum = {m['sigma_sum']:.6g}, "
        f"on each released mean = {m['sigma_target']:.6g} (normaliser n = {m['normaliser']})",
        f"accountant: {m['accountant']} {m['accountant_version']}",
        "counts per class: public input, not derived from the data",
        "not covered: the choice of the pool size, seeds, template, model and hyper-parameters "
        "(assumed public or chosen on public data); the sampling of the pool from the split "
        "(no amplification claimed); any other release on the same examples (compose them "
        "with `gradmm privacy DIR1 DIR2 ...`)",
    ]
    return "\n".join(lines)
