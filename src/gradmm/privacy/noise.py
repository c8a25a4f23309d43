"""The noise of a DP release: which sampler draws it, and the samplers.

Up to :data:`EXACT_MAX_COORDINATES` released numbers (the label-rows and sketch targets), the
noisy sums come from OpenDP's Gaussian measurement (:func:`exact_gaussian`): exact sampling of a
discrete Gaussian on a grid finer than float64 can resolve Δ, from the operating system's
randomness. Above it (a whole output layer: minutes of exact sampling) the noise comes from
:func:`gaussian_noise`: standard normals made by the Box-Muller transform (float64) from the
operating system's CSPRNG (``secrets``), a floating-point sampler that the release record says is
not exact. Neither has a seed that could be replayed. A ``noise_seed`` makes a *simulation*
instead: the noise is drawn from a numpy PCG64 stream keyed by the seed and every public setting
of the release, recorded in ``release.json``, and reported as carrying no guarantee.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from gradmm.privacy.accounting import EXACT_SAMPLER

NOISE_CHUNK = 1 << 20  # normals drawn per call: bounds the memory of the random bytes


def uniforms(n: int, random_bytes: Callable[[int], bytes] | None = None) -> np.ndarray:
    """(n,) float64 uniforms in [0, 1) with 53 random bits each (default: the OS CSPRNG)."""
    words = np.frombuffer((random_bytes or secrets.token_bytes)(8 * n), dtype=np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def standard_normal(n: int, random_bytes: Callable[[int], bytes]) -> np.ndarray:
    """(n,) float64 N(0, 1) draws by the Box-Muller transform of uniforms made from
    ``random_bytes`` (53 random bits each; ``u1`` in (0, 1] so that the log is finite)."""
    pairs = (n + 1) // 2
    words = np.frombuffer(random_bytes(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1 = ((words[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    u2 = (words[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


def exact_gaussian(values: np.ndarray, sigma: float, sensitivity: float) -> np.ndarray:
    """``values + N(0, σ²)`` per coordinate (float64), sampled exactly by OpenDP's Gaussian
    measurement: the values are rounded to the grid ``2^k`` and a discrete Gaussian of scale σ
    on that grid is added, from the OS's randomness. ``k`` puts the rounding's worst-case growth
    of the L2 sensitivity (``2^k·√D``) below float64's resolution of ``Δ``: OpenDP's own privacy
    map then gives exactly the ρ = Δ²/(2σ²) of the Gaussian mechanism (checked here)."""
    import opendp.prelude as opendp

    opendp.enable_features("contrib")
    flat = np.ascontiguousarray(values, dtype=np.float64).ravel()
    k = math.floor(math.log2(sensitivity)) - 54 - math.ceil(math.log2(math.sqrt(max(flat.size, 1))))
    space = (
        opendp.vector_domain(opendp.atom_domain(T=float, nan=False), size=flat.size),
        opendp.l2_distance(T=float),
    )
    measurement = opendp.m.make_gaussian(*space, scale=float(sigma), k=k)
    rho = measurement.map(float(sensitivity))
    if not math.isclose(rho, sensitivity**2 / (2 * sigma**2), rel_tol=1e-12):
        raise RuntimeError(f"OpenDP accounts ρ = {rho} for this release, not Δ²/(2σ²)")
    return np.asarray(measurement(flat.tolist()), dtype=np.float64).reshape(np.shape(values))


def seeded_stream(noise_seed: int, public_settings: dict) -> Callable[[int], bytes]:
    """Random bytes of a simulation: a PCG64 stream keyed by the seed *and* the release's public
    settings, so that two different releases (a DP release and its noise-only control, two ε)
    never share noise even when given the same seed."""
    key = json.dumps([noise_seed, public_settings], sort_keys=True).encode()
    entropy = int.from_bytes(hashlib.sha256(key).digest(), "big")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy))).bytes


def gaussian_noise(
    sizes: list[int], sigma: float, random_bytes: Callable[[int], bytes] | None = None
) -> list[np.ndarray]:
    """Independent float64 N(0, σ²) vectors of the given sizes, drawn in order from one stream.

    ``random_bytes`` defaults to the OS CSPRNG (``secrets.token_bytes``): nothing is seeded, so
    there is no seed to guess or replay. Pass :func:`seeded_stream` only for simulations.
    """
    random_bytes = random_bytes or secrets.token_bytes
    out = []
    for size in sizes:
        parts = [
            standard_normal(min(NOISE_CHUNK, size - start), random_bytes)
            for start in range(0, size, NOISE_CHUNK)
        ]
        out.append(sigma * np.concatenate(parts) if parts else np.zeros(0))
    return out


def noisy_means(
    sums: list[dict[str, Tensor]], protection, random_bytes: Callable[[int], bytes]
) -> list[dict[str, Tensor]]:
    """``(S_c + N(0, σ² I)) / n`` for every class ``c`` and parameter: one draw over all of them,
    by the sampler ``protection`` (a :class:`gradmm.privacy.accounting.Mechanism`) records:
    exactly (:func:`exact_gaussian`), or float64 noise from :func:`gaussian_noise` on
    ``random_bytes`` (the OS CSPRNG, or a recorded seed for simulations) added in float64.
    Rounded once to fp32.
    """
    flat = torch.cat([g.double().flatten() for s in sums for g in s.values()]).numpy()
    if protection.sampler == EXACT_SAMPLER:
        noisy_flat = exact_gaussian(flat, protection.sigma_sum, protection.sensitivity)
    else:
        sizes = [g.numel() for s in sums for g in s.values()]  # drawn in this order, as ever
        noise = gaussian_noise(sizes, protection.sigma_sum, random_bytes)
        noisy_flat = flat + np.concatenate(noise)
    noisy_flat = torch.from_numpy(noisy_flat)
    out, start = [], 0
    for s in sums:
        noisy = {}
        for name, g in s.items():
            total = noisy_flat[start : start + g.numel()].reshape(g.shape)
            noisy[name] = (total / protection.normaliser).to(g.dtype)
            start += g.numel()
        out.append(noisy)
    return out
