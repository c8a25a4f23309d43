"""Differential privacy of the target release: calibration and composition.

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

The noise itself is drawn by :mod:`gradmm.privacy.noise`; :mod:`gradmm.privacy.report` says what
a release guarantees.

Everything after the release (generation, filtering, reports) is post-processing of it.
"""

from __future__ import annotations

import functools
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


class Mechanism(BaseModel):
    """What protects a release's targets, as ``release.json`` records it (``type: none``: nothing).

    ``noise_seed`` is set only for a seeded simulation: whoever reads it can subtract the noise,
    so such a release carries no guarantee whatever its ε.
    """

    model_config = ConfigDict(extra="forbid")
    type: Literal["none", "gaussian"]
    epsilon: float | None = None
    delta: float | None = None
    clip: float | None = None
    neighbouring: Neighbouring | None = None
    sensitivity: float | None = None
    noise_multiplier: float | None = None
    sigma_sum: float | None = None
    sigma_target: float | None = None
    normaliser: int | None = None
    # Poisson sampling rate of the pool from the split (None: a fixed-size pool, no amplification)
    sampling_rate: float | None = None
    accountant: str | None = None
    accountant_version: str | None = None
    sampler: str | None = None
    noise_seed: int | None = None

    @model_validator(mode="after")
    def _complete(self) -> Mechanism:
        if self.type == "gaussian":
            needed = (
                "epsilon",
                "delta",
                "clip",
                "neighbouring",
                "sensitivity",
                "noise_multiplier",
                "sigma_sum",
                "normaliser",
                "sampler",
            )
            missing = [k for k in needed if getattr(self, k) is None]
            if missing:
                raise ValueError(f"gaussian mechanism without {', '.join(missing)}")
        return self

    @property
    def seeded(self) -> bool:
        return self.noise_seed is not None

    @property
    def private(self) -> bool:
        """True when the release carries a DP guarantee (Gaussian noise, not seeded)."""
        return self.type == "gaussian" and not self.seeded

    def multiplier_under(self, neighbouring: Neighbouring) -> float:
        """σ/Δ of this release for the sensitivity of ``neighbouring`` (which may differ from the
        relation it was calibrated for: the Gaussian mechanism's guarantee depends on σ/Δ only)."""
        assert self.sigma_sum is not None and self.clip is not None
        return self.sigma_sum / sensitivity(self.clip, neighbouring)


# Above it a guarantee means nothing, and the PLD accountant's grid for so little noise grows
# without bound (composing ε = 100 with ε = 1: 3 s, 0.7 GB; ε = 1e6: more than 150 GiB).
MAX_EPSILON = 100.0


def check_settings(epsilon: float | None, delta: float | None) -> None:
    """One-line errors for invalid (ε, δ) before anything else runs."""
    if epsilon is None or delta is None:
        raise UserError("differential privacy needs both --epsilon and --delta")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise UserError(f"--epsilon must be a positive number, got {epsilon}")
    if epsilon > MAX_EPSILON:
        raise UserError(
            f"--epsilon {epsilon:g} is above {MAX_EPSILON:g}: such a release "
            "carries no meaningful guarantee; release without --epsilon/--delta "
            "instead"
        )
    if not (0 < delta < 1):
        raise UserError(f"--delta must be in (0, 1), got {delta}")


def delta_warning(delta: float, pool_size: int) -> str | None:
    """A warning when δ ≥ 1/(pool size): such a δ allows releasing one example outright."""
    if delta >= 1 / pool_size:
        return (
            f"δ = {delta:g} is at least 1/(pool size) = 1/{pool_size}: the guarantee then allows "
            "leaking one whole example; choose δ well below 1/n"
        )
    return None


def noise_multiplier(epsilon: float, delta: float) -> float:
    """σ/Δ of one Gaussian release that is (ε, δ)-DP (exact analytic calibration)."""
    check_settings(epsilon, delta)
    from dp_accounting.gaussian_mechanism import get_sigma_gaussian

    return float(get_sigma_gaussian(epsilon, delta))


MIN_POISSON_MULTIPLIER = 0.25  # below it the PLD accountant is slow and ε is large anyway
POISSON_ACCOUNTANT = (
    "dp_accounting.pld.PLDAccountant (Poisson-subsampled Gaussian, add-or-remove-one, "
    "calibrated with dp_accounting.calibrate_dp_mechanism)"
)


@functools.cache
def poisson_epsilon(multiplier: float, rate: float, delta: float) -> float:
    """ε at ``delta`` of one Gaussian release of noise multiplier σ/Δ on a pool drawn by Poisson
    sampling at ``rate`` from the data (PLD accountant, add-or-remove-one)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(multiplier))
    )
    return float(acc.get_epsilon(delta))


@functools.cache
def poisson_noise_multiplier(epsilon: float, delta: float, rate: float) -> float:
    """The smallest σ/Δ (to 1e-3, at least :data:`MIN_POISSON_MULTIPLIER`) whose
    Poisson-subsampled Gaussian release is (ε, δ)-DP for the whole data set (PLD accountant).
    Takes seconds to a minute: the accountant is evaluated a few dozen times."""
    check_settings(epsilon, delta)
    if not 0 < rate <= 1:
        raise UserError(f"the sampling rate must be in (0, 1], got {rate}")
    if poisson_epsilon(MIN_POISSON_MULTIPLIER, rate, delta) <= epsilon:
        return MIN_POISSON_MULTIPLIER
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    upper = 1.1 * noise_multiplier(epsilon, delta)  # no subsampling: always enough
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: pld_privacy_accountant.PLDAccountant(
                dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
            ),
            lambda z: dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(z)),
            epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(MIN_POISSON_MULTIPLIER, upper),
            tol=1e-3,
        )
    )


def sensitivity(clip: float, neighbouring: Neighbouring) -> float:
    """L2 sensitivity of the concatenated per-class sums of clipped gradients."""
    return 2.0 * clip if neighbouring == "replace" else clip


def mechanism(
    settings: DPSettings,
    n_per_class: int,
    coordinates: int,
    noise_seed: int | None = None,
    sampling_rate: float | None = None,
    multiplier: float | None = None,
) -> Mechanism:
    """The Gaussian mechanism of one release of ``coordinates`` numbers, as ``release.json``
    records it. With a ``sampling_rate`` the pool is a Poisson sample of the split and the
    guarantee is for the split (add-or-remove-one; PLD accountant); ``n_per_class`` is then the
    public normaliser. ``multiplier`` skips the calibration (a recorded σ/Δ whose ε was
    checked)."""
    if sampling_rate is not None and settings.neighbouring != "add-remove":
        raise UserError(
            "Poisson sampling is accounted for add-or-remove neighbours: "
            "pass --neighbouring add-remove"
        )
    if multiplier is not None:
        z = multiplier
    elif sampling_rate is None:
        z = noise_multiplier(settings.epsilon, settings.delta)
    else:
        z = poisson_noise_multiplier(settings.epsilon, settings.delta, sampling_rate)
    delta_l2 = sensitivity(settings.clip, settings.neighbouring)
    return Mechanism(
        type="gaussian",
        epsilon=settings.epsilon,
        delta=settings.delta,
        clip=settings.clip,
        neighbouring=settings.neighbouring,
        sensitivity=delta_l2,
        noise_multiplier=z,
        sigma_sum=z * delta_l2,
        sigma_target=z * delta_l2 / n_per_class,
        normaliser=n_per_class,
        sampling_rate=sampling_rate,
        accountant=ACCOUNTANT if sampling_rate is None else POISSON_ACCOUNTANT,
        accountant_version=version("dp-accounting"),
        sampler=sampler_for(coordinates, noise_seed),
        noise_seed=noise_seed,
    )


def composed_epsilon(
    noise_multipliers: list[float], delta: float, rates: list[float | None] | None = None
) -> float:
    """ε of several Gaussian releases on the same data (PLD accountant), at total ``delta``;
    release ``i`` Poisson-subsampled at ``rates[i]`` when given (add-or-remove-one)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    for z, q in zip(noise_multipliers, rates or [None] * len(noise_multipliers), strict=True):
        event = dp_accounting.GaussianDpEvent(z)
        acc.compose(event if q is None else dp_accounting.PoissonSampledDpEvent(q, event))
    return float(acc.get_epsilon(delta))


EXACT_SAMPLER = (
    "exact: opendp.measurements.make_gaussian (discrete Gaussian on the grid 2^k, its rounding "
    "below Δ·2^-54; OpenDP's cryptographically secure randomness)"
)


SECURE_SAMPLER = (
    "Box-Muller (float64) on uniforms from the OS CSPRNG (Python secrets); NOT EXACT: "
    "floating-point noise, whose last bits may depend on the input (Mironov 2012), used above "
    "2^20 released numbers where exact sampling takes minutes"
)


SEEDED_SAMPLER = "seeded simulation: Box-Muller (float64) on a numpy PCG64 stream keyed by the seed"


# Released numbers up to which the noise is sampled exactly: OpenDP's measurement costs about
# 10 µs per number here (benchmarks/results/noise.md), 10 s at this bound.
EXACT_MAX_COORDINATES = 1 << 20


def sampler_for(coordinates: int, noise_seed: int | None) -> str:
    """The sampler a release of ``coordinates`` numbers draws its noise with."""
    if noise_seed is not None:
        return SEEDED_SAMPLER
    return EXACT_SAMPLER if coordinates <= EXACT_MAX_COORDINATES else SECURE_SAMPLER
