"""What a release, or several on the same examples, guarantees, in words (``gradmm privacy``)."""

from __future__ import annotations

from gradmm.errors import UserError, warn
from gradmm.privacy.accounting import (
    Mechanism,
    composed_epsilon,
    delta_warning,
    noise_multiplier,
    poisson_noise_multiplier,
    sensitivity,
)
from gradmm.privacy.configs import NoiseQuery

UNITS = {
    "replace": "one private example replaced by another of the same class (per-class counts "
    "public)",
    "add-remove": "one private example added or removed",
}


def report(meta) -> str:
    """Human-readable privacy report of one release (``ReleaseMeta``)."""
    m: Mechanism = meta.mechanism
    lines = [f"release of task {meta.task.name!r}, model {meta.model.name!r}"]
    poisson = m.sampling_rate is not None
    if meta.target == "noise":
        data = "no data (pure noise control)"
    elif poisson:
        data = (
            f"a Poisson sample (rate {m.sampling_rate:g}) of split {meta.split!r} outside its "
            "dev slice; its size is not released"
        )
    else:
        data = f"{sum(meta.counts)} private examples from split {meta.split!r}"
    if m.type == "none":
        lines += [
            "NOT differentially private: the targets are exact class means of the private "
            "examples. Treat the release and everything generated from it as private data.",
            f"data read: {data}",
        ]
        return "\n".join(lines)
    if m.seeded:
        lines += [
            f"SIMULATION, NO PRIVACY GUARANTEE: the noise was drawn from a seeded generator "
            f"(seed {m.noise_seed}, recorded here); anyone with the seed can subtract it. The "
            f"figures below say what a real (unseeded) release would guarantee."
        ]
    lines += [
        f"protected unit: one example; neighbouring relation: {UNITS[m.neighbouring]}",
        f"{'would guarantee' if m.seeded else 'guarantee'}: ({m.epsilon}, {m.delta})-DP for the "
        "whole release (all classes, one Gaussian draw)"
        + (
            f", for every example of the split (amplified by Poisson sampling at rate "
            f"{m.sampling_rate:g}; the sample is drawn from "
            f"{'the seeded stream' if m.seeded else 'the OS CSPRNG'}; the split's size, which "
            "sets the rate, is assumed public)"
            if poisson
            else ""
        ),
        f"data read: {data}",
        f"clip C = {m.clip}, sensitivity Δ = {m.sensitivity}, noise multiplier σ/Δ = "
        f"{m.noise_multiplier:.6g}, noise std on each class sum = {m.sigma_sum:.6g}, "
        f"on each released mean = {m.sigma_target:.6g} (normaliser n = {m.normaliser})",
        f"noise sampler: {m.sampler}",
        f"accountant: {m.accountant} {m.accountant_version}",
        "counts per class: public input, not derived from the data"
        + (" (the expected sample size per class, used as the normaliser)" if poisson else ""),
        "not covered: the choice of the pool size, seeds, template, model and hyper-parameters "
        "(assumed public or chosen on public data); "
        + (
            ""
            if poisson
            else "the sampling of the pool from the split (no amplification claimed); "
        )
        + "checkpoint selection and few-shot demonstrations on the "
        "dev slice of the private split (gradmm finetune/evaluate/run; see docs/privacy.md); "
        "any other release on the same examples (compose them with `gradmm privacy DIR1 DIR2 "
        "...`)",
    ]
    return "\n".join(lines)


def composition(metas: list, names: list[str]) -> list[str]:
    """What several releases on the same examples guarantee together, as report lines.

    Noise-only controls read no data and cost nothing. A non-DP release makes the total not
    private and a seeded one makes it a simulation. Releases calibrated under different
    neighbouring relations are composed under each relation, each release's noise multiplier
    taken for that relation's sensitivity (the Gaussian mechanism depends on σ/Δ only).
    """
    reading = [(n, m) for n, m in zip(names, metas, strict=True) if m.target != "noise"]
    exact = [n for n, m in reading if m.mechanism.type == "none"]
    if exact:
        return [f"== total: NOT private ({', '.join(exact)} released exact class means)"]
    if len(reading) < 2:
        return []
    mechs = [m.mechanism for _, m in reading]
    seeded = [n for n, m in reading if m.mechanism.seeded]
    total_delta = sum(m.delta for m in mechs)
    lines = []
    for relation in dict.fromkeys(m.neighbouring for m in mechs):
        # amplification by Poisson sampling is accounted for add-or-remove; under replace-one a
        # subsampled release is bounded by its unsampled Gaussian (sampling never hurts)
        rates = [m.sampling_rate if relation == "add-remove" else None for m in mechs]
        eps = composed_epsilon([m.multiplier_under(relation) for m in mechs], total_delta, rates)
        lines.append(
            f"== composition of {len(mechs)} DP releases on the same examples (PLD accountant, "
            f"relation {relation}): ε = {eps:.6g} at δ = {total_delta:.3g}"
        )
    if seeded:
        lines.append(
            f"== total: SIMULATION, NO PRIVACY GUARANTEE ({', '.join(seeded)} used seeded noise)"
        )
    skipped = len(metas) - len(reading)
    if skipped:
        lines.append(f"({skipped} noise-only control(s) read no data and cost no privacy)")
    return lines


def releases_report(metas: list, names: list[str]) -> list[str]:
    """The report of each release (``ReleaseMeta``), then what they guarantee together; a δ too
    large for a release's pool is a warning."""
    lines = []
    for name, meta in zip(names, metas, strict=True):
        lines.append(f"== {name}\n{report(meta)}")
        m = meta.mechanism
        if m.type == "gaussian" and meta.target == "real":
            note = delta_warning(m.delta, sum(meta.counts))
            if note:
                warn(f"{name}: {note}")
    return lines + composition(metas, names)


def noise_report(query: NoiseQuery) -> list[str]:
    """σ/Δ of one Gaussian release at (ε, δ) and, given C and n, the noise std it adds."""
    eps, delta, q = query.epsilon, query.delta, query.sampling_rate
    if q is None:
        z = noise_multiplier(eps, delta)
        lines = [f"noise multiplier σ/Δ = {z:.6g} for one ({eps}, {delta})-DP Gaussian release"]
    else:
        if query.neighbouring != "add-remove":
            raise UserError(
                "Poisson sampling is accounted for add-or-remove neighbours: "
                "pass --neighbouring add-remove"
            )
        z = poisson_noise_multiplier(eps, delta, q)
        lines = [
            f"noise multiplier σ/Δ = {z:.6g} for one Gaussian release on a Poisson sample at "
            f"rate {q:g}, ({eps}, {delta})-DP for the split (PLD accountant)"
        ]
    n = query.n_per_class
    if n is not None:
        note = delta_warning(delta, 2 * n)  # a pool holds at least 2 classes
        if note:
            warn(note)
    if query.clip is not None and n is not None:
        sens = sensitivity(query.clip, query.neighbouring)
        lines.append(
            f"sensitivity Δ = {sens:.6g} ({query.neighbouring}, C = {query.clip}); noise std σ = "
            f"{z * sens:.6g} on each class sum, {z * sens / n:.6g} on each released class mean "
            f"(n = {n})"
        )
    return lines
