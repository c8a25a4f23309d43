"""DP release: calibration against the accountant and the closed form, clipping, noise scale,
reuse, refusals, the noise-only control, and no private text in any output."""

import json
import math

import pytest
import torch
from conftest import NEGATIVE, POSITIVE, release_args, write_split
from scipy.stats import norm
from typer.testing import CliRunner

from gradmm.cli import app
from gradmm.core.gradients import example_gradients, per_example_grad_norms, summed_grads
from gradmm.core.tokens import LabelTokens, tokenize_prompt
from gradmm.data.pools import private_pool_exclusions, sample_per_class
from gradmm.data.tasks import BUILTIN_TASKS, Examples, load_examples
from gradmm.errors import UserError
from gradmm.models.loading import load_model
from gradmm.privacy import accounting as dp
from gradmm.privacy import noise as dp_noise
from gradmm.privacy import report as privacy_report
from gradmm.stages.configs import ReleaseConfig
from gradmm.stages.record import record_digest
from gradmm.stages.release import release_targets

runner = CliRunner()
# ENVIRONMENT.md, exact analytic Gaussian noise multipliers
KNOWN = {
    (0.05, 1e-4): 44.78,
    (1, 1e-4): 3.186,
    (4, 1e-4): 0.9587,
    (8, 1e-4): 0.5431,
    (0.05, 1e-5): 57.77,
    (1, 1e-5): 3.731,
    (4, 1e-5): 1.081,
    (8, 1e-5): 0.6002,
}


def analytic_delta(eps: float, z: float) -> float:
    """Balle & Wang (2018), Thm 8: δ of the Gaussian mechanism with noise multiplier z."""
    return norm.cdf(0.5 / z - eps * z) - math.exp(eps) * norm.cdf(-0.5 / z - eps * z)


@pytest.mark.parametrize("eps, delta", sorted(KNOWN))
def test_noise_multiplier_is_the_exact_analytic_value(eps, delta):
    z = dp.noise_multiplier(eps, delta)
    assert z == pytest.approx(KNOWN[(eps, delta)], rel=5e-3)
    assert analytic_delta(eps, z) == pytest.approx(delta, rel=1e-3)  # independent closed form
    assert analytic_delta(eps, z * 0.99) > delta  # and not more noise than needed
    assert z < math.sqrt(2 * math.log(1.25 / delta)) / eps or eps > 1  # tighter than classic


def test_composition_of_two_releases_costs_more_than_one():
    z = dp.noise_multiplier(1.0, 1e-5)
    assert dp.composed_epsilon([z], 1e-5) == pytest.approx(1.0, rel=1e-3)
    assert dp.composed_epsilon([z, z], 2e-5) > 1.2


@pytest.mark.parametrize("eps, delta", [(0, 1e-5), (-1, 1e-5), (1, 0), (1, 1), (1, None)])
def test_invalid_epsilon_delta(eps, delta):
    with pytest.raises(UserError):
        dp.noise_multiplier(eps, delta)


def test_clipping_bounds_every_autograd_gradient(model_dirs, data_dir):
    lm = load_model(str(model_dirs["phi"]))
    task = BUILTIN_TASKS["sst2"]
    prompt = tokenize_prompt(task, lm.tokenizer)
    ex = load_examples(task, "train", data_dir)
    seqs = [prompt.encode(lm.tokenizer, t) for t in ex.texts[:6]]
    labels = [prompt.label_ids[y][0] for y in ex.labels[:6]]  # one-token label words
    r, h, w = example_gradients(lm, seqs, ex.labels[:6], LabelTokens.of(prompt.label_ids))
    norms = per_example_grad_norms(r, h, w, has_bias=True)
    clip = 0.5 * float(norms.median())
    weights = torch.clamp(clip / norms, max=1.0)
    head = lm.model.get_output_embeddings().requires_grad_(True)
    for i, seq in enumerate(seqs):
        emb = lm.embeddings[torch.tensor([seq])].detach()
        ce = torch.nn.functional.cross_entropy(
            lm.model(inputs_embeds=emb).logits[:, -1], torch.tensor([labels[i]])
        )
        gw, gb = torch.autograd.grad(ce, [head.weight, head.bias])
        full = torch.cat([gw.flatten(), gb]).norm()
        assert float(norms[i]) == pytest.approx(float(full), rel=1e-4)
        assert float(weights[i] * full) <= clip * (1 + 1e-5)


def dp_config(model_dirs, data_dir, **kw):
    base = dict(
        task="sst2",
        model=str(model_dirs["phi"]),
        n_per_class=5,
        data_dir=str(data_dir),
        epsilon=2.0,
        delta=1e-5,
        clip=0.3,
        noise_seed=7,
    )
    if kw.get("epsilon", 1) is None:  # not DP: the DP-only settings would be refused
        base = {k: v for k, v in base.items() if k not in ("clip", "noise_seed")}
    return ReleaseConfig(**{**base, **kw})


def test_dp_release_noise_scale_reproducibility_and_reuse(model_dirs, data_dir, tmp_path):
    cfg = dp_config(model_dirs, data_dir)
    rel = release_targets(cfg, tmp_path / "a")
    m = rel.meta.mechanism.model_dump()
    z = dp.noise_multiplier(2.0, 1e-5)
    assert m["noise_multiplier"] == z and m["sensitivity"] == 0.6  # replace: 2C
    assert m["sigma_target"] == pytest.approx(z * 0.6 / 5)
    assert m["noise_seed"] == 7  # a seeded simulation says so

    # the exact clipped means, computed again; what is left is the noise
    lm = load_model(str(model_dirs["phi"]))
    task = BUILTIN_TASKS["sst2"]
    prompt = tokenize_prompt(task, lm.tokenizer)
    ex = load_examples(task, "train", data_dir)
    exclude = private_pool_exclusions(task, "train", ex)
    for c, ix in enumerate(sample_per_class(ex.labels, task.label_names, 5, 0, exclude)):
        seqs = [prompt.encode(lm.tokenizer, ex.texts[i]) for i in ix]
        r, h, w = example_gradients(lm, seqs, [c] * 5, LabelTokens.of(prompt.label_ids))
        w = w * torch.clamp(0.3 / per_example_grad_norms(r, h, w, True), max=1.0)[:, None]
        mean_w = summed_grads(r, h, w)[0] / 5
        noise = rel.target_weight[c] - mean_w
        assert float(noise.std()) == pytest.approx(m["sigma_target"], rel=0.03)
        assert abs(float(noise.mean())) < 0.05 * m["sigma_target"]

    again = release_targets(cfg, tmp_path / "b")
    torch.testing.assert_close(again.target_weight, rel.target_weight, rtol=0, atol=0)
    other = release_targets(cfg.model_copy(update={"noise_seed": 8}), tmp_path / "c")
    assert not torch.equal(other.target_weight, rel.target_weight)
    reused = release_targets(cfg, tmp_path / "a")
    assert reused.reused and torch.equal(reused.target_weight, rel.target_weight)
    # a seeded simulation is never handed out when another seed, or a real release, is asked for
    for seed in (99, None):
        with pytest.raises(UserError, match="never redrawn"):
            release_targets(cfg.model_copy(update={"noise_seed": seed}), tmp_path / "a")
    with pytest.raises(UserError, match="never redrawn"):
        release_targets(cfg.model_copy(update={"epsilon": 4.0}), tmp_path / "a")
    with pytest.raises(UserError, match="never redrawn"):
        release_targets(cfg, tmp_path / "a", overwrite=True)


def test_add_remove_sensitivity_is_c(model_dirs, data_dir, tmp_path):
    rel = release_targets(
        dp_config(model_dirs, data_dir, neighbouring="add-remove"), tmp_path / "r"
    )
    assert rel.meta.mechanism.sensitivity == 0.3


def test_noise_only_control_reads_no_data(model_dirs, tmp_path):
    cfg = dp_config(model_dirs, tmp_path / "does-not-exist", target="noise")
    rel = release_targets(cfg, tmp_path / "noise")
    assert rel.meta.split is None and rel.meta.data_source is None
    sigma = rel.meta.mechanism.sigma_target
    assert float(rel.target_weight.std()) == pytest.approx(sigma, rel=0.03)
    assert "no data" in privacy_report.report(rel.meta)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_refused_options_in_dp_mode(model_dirs, data_dir, tmp_path):
    cases = [
        (
            ["--epsilon", "1", "--delta", "1e-5", "--match-params", "last-block"],
            "need closed-form clipping",
        ),
        (["--match-params", "sketch"], "match_params sketch needs sketch_dim"),
        (["--sketch-dim", "8"], "sketch_dim is only for match_params sketch"),
        (["--sketch-seed", "3"], "sketch_seed is only for match_params sketch"),
        (["--target", "noise"], "target noise is a DP control: give epsilon and delta"),
        (["--clip", "2"], "clip is a DP setting: give epsilon and delta"),
        (["--neighbouring", "add-remove"], "neighbouring is a DP setting"),
        (["--epsilon", "1e6", "--delta", "1e-5"], "--epsilon 1e+06 is above 100"),
        (["--epsilon", "1"], "both --epsilon and --delta"),
        (["--epsilon", "0", "--delta", "1e-5"], "--epsilon must be a positive"),
        (["--epsilon", "1", "--delta", "1.5"], "--delta must be in (0, 1)"),
    ]
    for i, (extra, message) in enumerate(cases):
        r = invoke(*release_args(model_dirs["phi"], data_dir, tmp_path / f"r{i}", n=3), *extra)
        assert r.exit_code == 2 and message in r.stderr, (extra, r.output)
        assert not (tmp_path / f"r{i}").exists()


def test_privacy_command(model_dirs, data_dir, tmp_path):
    r = invoke("privacy", "--epsilon", "1", "--delta", "1e-5", "--clip", "1", "--n-per-class", "25")
    assert r.exit_code == 0
    assert "σ/Δ = 3.73063" in r.stdout and "sensitivity Δ = 2" in r.stdout
    assert "0.298451" in r.stdout  # 3.7306 * 2 / 25
    release_targets(dp_config(model_dirs, data_dir), tmp_path / "a")
    release_targets(dp_config(model_dirs, data_dir, noise_seed=1, epsilon=1.0), tmp_path / "b")
    r = invoke("privacy", tmp_path / "a", tmp_path / "b")
    assert r.exit_code == 0 and "composition of 2 DP releases" in r.stdout
    assert "neighbouring relation" in r.stdout


def test_dp_run_outputs_hold_no_private_text(model_dirs, tmp_path):
    canary = "the zebra council quietly adopted forty purple umbrellas on tuesday"
    rows = [(f"the film was {w} indeed", 1) for w in POSITIVE * 2]
    rows += [(f"the plot was {w} indeed", 0) for w in NEGATIVE * 2]
    labels = [y for _, y in rows]
    task = BUILTIN_TASKS["sst2"]
    for slot in (i for i, y in enumerate(labels) if y == 1):  # a row the private pool is sure
        trial = rows[:slot] + [(canary, 1)] + rows[slot + 1 :]  # to contain (seed 0's pool)
        exclude = private_pool_exclusions(
            task, "train", Examples([t for t, _ in trial], labels, "rows")
        )
        n = min(sum(1 for i, y in enumerate(labels) if y == c and i not in exclude) for c in (0, 1))
        if slot in sample_per_class(labels, task.label_names, n, 0, exclude)[1]:
            rows = trial
            break
    assert rows[slot] == (canary, 1)
    write_split(tmp_path / "data" / "sst2", "train", rows)
    rel, run = tmp_path / "rel", tmp_path / "run"
    r = invoke(
        "release",
        "--task",
        "sst2",
        "--model",
        model_dirs["llama"],
        "--data-dir",
        tmp_path / "data",
        "--out",
        rel,
        "--n-per-class",
        n,
        "--epsilon",
        1,
        "--delta",
        1e-5,
    )
    assert r.exit_code == 0, r.output
    r = invoke(
        "generate",
        "--release",
        rel,
        "--out",
        run,
        "--per-class",
        4,
        "--batch",
        2,
        "--length",
        12,
        "--steps",
        2,
        "--inner-steps",
        2,
        "--init-candidates",
        2,
        "--topk",
        10,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    words = canary.split()
    grams = [" ".join(words[i : i + 8]) for i in range(len(words) - 7)]
    for path in [*rel.iterdir(), *run.iterdir()]:
        content = path.read_bytes().decode("utf-8", errors="ignore").lower()
        assert canary not in content and not any(g in content for g in grams), path
    manifest = json.loads((run / "manifest.json").read_text())
    assert "(1.0, 1e-05)-DP" in manifest["privacy_report"]


def test_no_matching_control_is_a_projection_of_noise(model_dirs, data_dir, tmp_path):
    rel = tmp_path / "rel"
    assert (
        invoke(
            "release",
            "--task",
            "sst2",
            "--model",
            model_dirs["llama"],
            "--data-dir",
            data_dir,
            "--out",
            rel,
            "--n-per-class",
            3,
        ).exit_code
        == 0
    )
    r = invoke(
        "generate",
        "--release",
        rel,
        "--out",
        tmp_path / "run",
        "--per-class",
        4,
        "--batch",
        2,
        "--length",
        5,
        "--target",
        "none",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["solver"]["steps"] == 0 and manifest["solver"]["init_candidates"] == 1
    assert "x_steps" not in manifest["timings_s"]


# ------------------------------------------------------------- the noise sampler (attacker)


def exact_means(model_dir, data_dir, n, clip=None):
    """(C, V, d) exact (clipped when ``clip``) class means of the pool a seed-0 release reads."""
    lm = load_model(str(model_dir))
    task = BUILTIN_TASKS["sst2"]
    prompt = tokenize_prompt(task, lm.tokenizer)
    ex = load_examples(task, "train", data_dir)
    exclude = private_pool_exclusions(task, "train", ex)
    out = []
    for c, ix in enumerate(sample_per_class(ex.labels, task.label_names, n, 0, exclude)):
        r, h, w = example_gradients(
            lm,
            [prompt.encode(lm.tokenizer, ex.texts[i]) for i in ix],
            [c] * n,
            LabelTokens.of(prompt.label_ids),
        )
        if clip is not None:
            w = w * torch.clamp(clip / per_example_grad_norms(r, h, w, True), max=1.0)[:, None]
        out.append(summed_grads(r, h, w)[0] / n)
    return torch.stack(out)


@pytest.fixture(params=["exact", "float"])
def sampler(request, monkeypatch) -> str:
    """Releases of the tiny models draw their noise exactly (OpenDP); ``float``: as a release
    above :data:`gradmm.privacy.accounting.EXACT_MAX_COORDINATES` numbers does (Box-Muller)."""
    if request.param == "float":
        monkeypatch.setattr(dp, "EXACT_MAX_COORDINATES", 0)
    return dp.EXACT_SAMPLER if request.param == "exact" else dp.SECURE_SAMPLER


def test_dp_noise_is_not_any_replayable_torch_or_numpy_stream(
    model_dirs, data_dir, tmp_path, monkeypatch, sampler
):
    """The attack that removed the noise: torch keeps 32 bits of a seed, so an attacker tries
    every 32-bit stream. Record every seed handed to torch or numpy during a release and check
    that none of their streams is the realised noise, which came from the OS CSPRNG (or
    OpenDP's)."""
    import numpy as np

    seeds = []

    def record(fn):
        def wrapped(*args, **kwargs):
            seeds.extend(a for a in args if isinstance(a, int))
            return fn(*args, **kwargs)

        return wrapped

    class RecordingGenerator(torch.Generator):
        def manual_seed(self, seed):
            seeds.append(seed)
            return super().manual_seed(seed)

    real_default_rng = np.random.default_rng
    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    monkeypatch.setattr(torch, "manual_seed", record(torch.manual_seed))
    monkeypatch.setattr(np.random, "default_rng", record(real_default_rng))
    monkeypatch.setattr(np.random, "SeedSequence", record(np.random.SeedSequence))
    drawn = []
    real_token_bytes = dp_noise.secrets.token_bytes
    monkeypatch.setattr(
        dp_noise.secrets, "token_bytes", lambda k: drawn.append(k) or real_token_bytes(k)
    )

    cfg = dp_config(model_dirs, data_dir, noise_seed=None, clip=1e3)  # no clipping
    rel = release_targets(cfg, tmp_path / "dp")
    monkeypatch.undo()
    assert rel.meta.mechanism.noise_seed is None and rel.meta.mechanism.private
    assert rel.meta.mechanism.sampler == sampler
    sigma_mean = rel.meta.mechanism.sigma_target
    noise = (rel.target_weight - exact_means(model_dirs["phi"], data_dir, 5)).flatten()
    if sampler == dp.SECURE_SAMPLER:  # 64 random bits from the OS CSPRNG behind every number
        coords = sum(t.numel() for t in rel.targets.values())
        assert sum(drawn) >= 8 * coords
    head = noise[:16] / sigma_mean
    for s in set(seeds):
        for candidate in (s, s & 0xFFFFFFFF):
            g = torch.Generator().manual_seed(candidate)
            streams = [
                torch.randn(16, generator=g, dtype=torch.float32),
                torch.from_numpy(real_default_rng(candidate).standard_normal(16)),
            ]
            for stream in streams:
                assert not torch.allclose(head, stream.float(), atol=1e-2), s


def test_realised_noise_has_the_documented_std(model_dirs, data_dir, tmp_path, sampler):
    """DP release minus a non-DP release of the same pool (no clipping at this C) = the noise:
    zero mean, std σ/n on every coordinate, independent between classes; by either sampler."""
    exact = release_targets(
        dp_config(model_dirs, data_dir, epsilon=None, delta=None), tmp_path / "exact"
    )
    noisy = release_targets(
        dp_config(model_dirs, data_dir, noise_seed=None, clip=1e3), tmp_path / "dp"
    )
    assert noisy.meta.mechanism.sampler == sampler
    sigma = noisy.meta.mechanism.sigma_target
    for name in noisy.targets:
        noise = noisy.targets[name].double() - exact.targets[name].double()
        n = noise.numel()  # tolerances: 4 standard errors of the sample std and mean
        assert float(noise.std()) == pytest.approx(sigma, rel=4 / math.sqrt(2 * n)), name
        assert abs(float(noise.mean())) < 4 * sigma / math.sqrt(n), name
    w = (noisy.target_weight - exact.target_weight).flatten(1)
    assert abs(float(torch.corrcoef(w)[0, 1])) < 0.05
    # Gaussian, not merely the right std: the fourth moment of N(0, 1) is 3
    z = w.flatten().double() / sigma
    assert float((z**4).mean()) == pytest.approx(3.0, rel=0.1)


def test_seeded_noise_is_a_recorded_simulation(model_dirs, data_dir, tmp_path):
    rel = release_targets(dp_config(model_dirs, data_dir, noise_seed=123), tmp_path / "sim")
    recorded = json.loads((tmp_path / "sim" / "release.json").read_text())["mechanism"]
    assert recorded["noise_seed"] == 123 and "seeded" in recorded["sampler"]
    assert not rel.meta.mechanism.private
    r = invoke("privacy", tmp_path / "sim")
    assert r.exit_code == 0 and "SIMULATION, NO PRIVACY GUARANTEE" in r.stdout
    real = release_targets(dp_config(model_dirs, data_dir, noise_seed=None), tmp_path / "real")
    text = privacy_report.report(real.meta)
    assert "SIMULATION" not in text and "exact" in text


def test_exact_sampler_is_opendps_gaussian_on_a_grid_with_no_rounding_penalty():
    """The exact sampler's output has the Gaussian's std and fourth moment around the input,
    and OpenDP's own privacy map for it is the ρ = Δ²/(2σ²) of the
    unrounded Gaussian mechanism (the grid is fine enough that rounding costs nothing)."""
    import numpy as np
    import opendp.prelude as opendp

    values = np.linspace(-5, 5, 20_000)
    sigma, sens = 3.0, 0.5
    noisy = dp_noise.exact_gaussian(values, sigma, sens)
    z = (noisy - values) / sigma
    assert float(z.std()) == pytest.approx(1.0, rel=0.03) and abs(float(z.mean())) < 0.03
    assert float((z**4).mean()) == pytest.approx(3.0, rel=0.1)
    k = math.floor(math.log2(sens)) - 54 - math.ceil(math.log2(math.sqrt(values.size)))
    opendp.enable_features("contrib")
    space = (
        opendp.vector_domain(opendp.atom_domain(T=float, nan=False), size=values.size),
        opendp.l2_distance(T=float),
    )
    coarse = opendp.m.make_gaussian(*space, scale=sigma, k=-10)  # a coarse grid costs privacy
    fine = opendp.m.make_gaussian(*space, scale=sigma, k=k)
    assert coarse.map(sens) > 1.01 * sens**2 / (2 * sigma**2)
    assert fine.map(sens) == pytest.approx(sens**2 / (2 * sigma**2), rel=1e-12)


def test_dp_release_and_its_noise_control_never_share_noise(model_dirs, data_dir, tmp_path):
    """Given the same seed, a DP release and its noise-only control get independent noise (the
    stream is keyed by every public setting), and so do two ε."""
    dp_rel = release_targets(dp_config(model_dirs, data_dir, clip=1e3), tmp_path / "dp")
    control = release_targets(
        dp_config(model_dirs, data_dir, clip=1e3, target="noise"), tmp_path / "noise"
    )
    other_eps = release_targets(
        dp_config(model_dirs, data_dir, clip=1e3, epsilon=4.0), tmp_path / "eps4"
    )
    exact = exact_means(model_dirs["phi"], data_dir, 5)
    a = (dp_rel.target_weight - exact).flatten()
    for other in (control.target_weight.flatten(), (other_eps.target_weight - exact).flatten()):
        assert abs(float(torch.corrcoef(torch.stack([a, other]))[0, 1])) < 0.05


def test_composition_converts_relations_and_flags_non_dp_and_seeded(model_dirs, data_dir, tmp_path):
    from dp_accounting import GaussianDpEvent
    from dp_accounting.pld import pld_privacy_accountant

    rep = release_targets(dp_config(model_dirs, data_dir, noise_seed=None), tmp_path / "rep")
    ar = release_targets(
        dp_config(model_dirs, data_dir, noise_seed=None, neighbouring="add-remove"),
        tmp_path / "ar",
    )
    release_targets(
        dp_config(model_dirs, data_dir, noise_seed=None, target="noise"), tmp_path / "noise"
    )
    r = invoke("privacy", tmp_path / "rep", tmp_path / "ar", tmp_path / "noise")
    assert r.exit_code == 0, r.output
    z = dp.noise_multiplier(2.0, 1e-5)
    # under replace, the add-remove release (σ = z C) meets Δ = 2C: multiplier z/2; under
    # add-remove, the replace release (σ = 2 z C) meets Δ = C: multiplier 2z
    for relation, zs in (("replace", [z, z / 2]), ("add-remove", [2 * z, z])):
        acc = pld_privacy_accountant.PLDAccountant()
        for v in zs:
            acc.compose(GaussianDpEvent(v))
        expected = acc.get_epsilon(2e-5)
        line = next(x for x in r.stdout.splitlines() if f"relation {relation})" in x)
        assert float(line.split("ε = ")[1].split()[0]) == pytest.approx(expected, rel=1e-4)
    assert rep.meta.mechanism.multiplier_under("add-remove") == pytest.approx(2 * z)
    assert ar.meta.mechanism.multiplier_under("replace") == pytest.approx(z / 2)
    assert "noise-only control(s) read no data" in r.stdout  # the control costs nothing

    release_targets(dp_config(model_dirs, data_dir, epsilon=None, delta=None), tmp_path / "exact")
    r = invoke("privacy", tmp_path / "rep", tmp_path / "exact")
    assert r.exit_code == 0 and "total: NOT private" in r.stdout
    release_targets(dp_config(model_dirs, data_dir, noise_seed=5), tmp_path / "sim")
    r = invoke("privacy", tmp_path / "rep", tmp_path / "sim")
    assert "total: SIMULATION, NO PRIVACY GUARANTEE" in r.stdout


def test_delta_at_least_one_over_pool_size_is_warned(model_dirs, data_dir, tmp_path):
    r = invoke(
        *release_args(model_dirs["phi"], data_dir, tmp_path / "r", n=5),
        "--epsilon",
        1,
        "--delta",
        0.1,
    )
    assert r.exit_code == 0 and "warning: δ = 0.1 is at least 1/(pool size) = 1/10" in r.stderr
    r = invoke("privacy", tmp_path / "r")
    assert "warning" in r.stderr
    r = invoke("privacy", "--epsilon", 1, "--delta", 0.1, "--n-per-class", 5)
    assert r.exit_code == 0 and "warning" in r.stderr
    r = invoke("privacy", "--epsilon", 1, "--delta", 1e-5, "--n-per-class", 5)
    assert r.exit_code == 0 and "warning" not in r.stderr
    r = invoke("privacy", "--epsilon", 1, "--delta", 1)
    assert r.exit_code == 2 and "--delta must be in (0, 1)" in r.stderr


@pytest.mark.parametrize(
    "edit",
    ["drop the seed", "call it a noise control", "change sigma", "drop the mechanism"],
)
def test_edited_release_records_are_refused(edit, model_dirs, data_dir, tmp_path):
    """release.json is not signed, but the edits that would misreport a release are caught."""
    from gradmm.stages.record import load_release

    release_targets(dp_config(model_dirs, data_dir), tmp_path / "r")
    path = tmp_path / "r" / "release.json"
    meta = json.loads(path.read_text())
    if edit == "drop the seed":  # a simulation passed off as private
        meta["mechanism"]["noise_seed"] = None
    elif edit == "call it a noise control":  # so that composition would skip it
        meta["target"] = "noise"
    elif edit == "change sigma":
        meta["mechanism"]["sigma_sum"] *= 2
    else:
        meta["mechanism"] = {"type": "none"}
    path.write_text(json.dumps(meta))  # the record's digest catches any edit
    with pytest.raises(UserError, match="does not match its record_sha256"):
        load_release(tmp_path / "r")
    meta["record_sha256"] = record_digest(meta)  # and its consistency one who recomputes it
    path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="invalid release record"):
        load_release(tmp_path / "r")
    r = invoke("privacy", tmp_path / "r")
    assert r.exit_code == 2 and "invalid release record" in r.stderr


# ------------------------------------------------------------------------- Poisson sampling


def test_poisson_calibration_against_independent_accountants():
    """At rate 1 the Poisson-subsampled Gaussian is the plain one: the PLD calibration meets the
    exact analytic value. At rate q < 1 it needs less noise, its ε sits below the RDP
    accountant's upper bound for the same σ/Δ, and σ/Δ is the smallest that reaches ε."""
    import dp_accounting

    full = dp.poisson_noise_multiplier(1.0, 1e-5, 1.0)
    assert full == pytest.approx(KNOWN[(1, 1e-5)], rel=5e-3)
    z = dp.poisson_noise_multiplier(1.0, 1e-5, 0.2)
    assert z < 0.9 * full
    assert dp.poisson_epsilon(z, 0.2, 1e-5) <= 1.0 * 1.001
    assert dp.poisson_epsilon(z * 0.98, 0.2, 1e-5) > 1.0  # not more noise than needed
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(z)))
    assert 1.0 <= rdp.get_epsilon(1e-5) < 1.5  # RDP is an upper bound, and not a loose one


def test_poisson_release_samples_the_split_and_states_the_guarantee(
    model_dirs, data_dir, tmp_path, capsys
):
    from gradmm.data.pools import poisson_pool
    from gradmm.stages.record import load_release

    cfg = dp_config(
        model_dirs,
        data_dir,
        sampling="poisson",
        sampling_rate=0.5,
        neighbouring="add-remove",
        n_per_class=10,
    )
    rel = release_targets(cfg, tmp_path / "r")
    # 80 rows: the dev slice is half the split, and one row may move another across it
    assert "guarantee holds for groups of two rows" in capsys.readouterr().err
    m = rel.meta.mechanism
    assert m.sampling_rate == 0.5 and m.noise_multiplier == dp.poisson_noise_multiplier(
        2.0, 1e-5, 0.5
    )
    assert m.sensitivity == 0.3 and m.normaliser == 10 and rel.meta.counts == [10, 10]
    assert m.sigma_target == pytest.approx(m.noise_multiplier * 0.3 / 10)
    text = privacy_report.report(rel.meta)
    assert "Poisson sample (rate 0.5)" in text and "size is not released" in text
    assert load_release(tmp_path / "r").meta.mechanism == m  # the recorded ε is checked on load
    path = tmp_path / "r" / "release.json"
    record = json.loads(path.read_text())
    for key in ("noise_multiplier", "sigma_sum", "sigma_target"):  # consistently less noise
        record["mechanism"][key] *= 0.5
    record["record_sha256"] = record_digest(record)
    path.write_text(json.dumps(record))
    with pytest.raises(UserError, match="does not give the recorded ε"):
        load_release(tmp_path / "r")

    task = BUILTIN_TASKS["sst2"]
    ex = load_examples(task, "train", data_dir)
    dev = set(private_pool_exclusions(task, "train", ex))
    _, picked = poisson_pool(task, "train", 0.5, str(data_dir), None)
    chosen = [i for ix in picked for i in ix]
    assert not dev & set(chosen) and all(
        ex.labels[i] == c for c, ix in enumerate(picked) for i in ix
    )
    eligible = len(ex.labels) - len(dev)
    assert abs(len(chosen) - 0.5 * eligible) < 4 * math.sqrt(0.25 * eligible)
    again = [i for ix in poisson_pool(task, "train", 0.5, str(data_dir), None)[1] for i in ix]
    assert again != chosen  # the OS CSPRNG: nothing to replay


def test_poisson_refusals_come_before_any_data_is_read(model_dirs, tmp_path):
    missing = tmp_path / "no-data"
    base = ["--epsilon", "1", "--delta", "1e-5", "--sampling", "poisson"]
    for extra, message in [
        (["--sampling-rate", "0.1"], "pass --neighbouring add-remove"),
        ([], "sampling poisson needs sampling_rate"),
    ]:
        r = invoke(*release_args(model_dirs["phi"], missing, tmp_path / "r"), *base, *extra)
        assert r.exit_code == 2 and message in r.stderr, r.output
        assert not (tmp_path / "r").exists()
    r = invoke(
        *release_args(model_dirs["phi"], missing, tmp_path / "r"),
        "--sampling",
        "poisson",
        "--sampling-rate",
        "0.1",
    )
    assert r.exit_code == 2 and "Poisson sampling is for DP releases" in r.stderr


def test_poisson_releases_compose_with_amplification(model_dirs, data_dir, tmp_path):
    cfg = dp_config(
        model_dirs, data_dir, sampling="poisson", sampling_rate=0.5, neighbouring="add-remove"
    )
    a = release_targets(cfg, tmp_path / "a")
    b = release_targets(cfg.model_copy(update={"noise_seed": 8}), tmp_path / "b")
    lines = privacy_report.composition([a.meta, b.meta], ["a", "b"])
    z = a.meta.mechanism.noise_multiplier
    amplified = dp.composed_epsilon([z, z], 2e-5, [0.5, 0.5])
    assert f"ε = {amplified:.6g}" in lines[0] and amplified < dp.composed_epsilon([z, z], 2e-5)


def test_poisson_sample_that_misses_a_class_releases_noise_for_it(model_dirs, data_dir, tmp_path):
    """At a tiny rate the sample is almost surely empty: the release still succeeds (a class
    without examples has a zero sum, then noise), and says nothing about the sample."""
    cfg = dp_config(
        model_dirs,
        data_dir,
        sampling="poisson",
        sampling_rate=1e-6,
        neighbouring="add-remove",
        epsilon=8.0,
    )
    rel = release_targets(cfg, tmp_path / "r")
    sigma = rel.meta.mechanism.sigma_target
    assert float(rel.target_weight.std()) == pytest.approx(sigma, rel=0.03)
    assert rel.meta.counts == [5, 5]


def test_canaries_planted_in_a_poisson_sample_add_their_clipped_gradients(
    model_dirs, data_dir, tmp_path
):
    """A canary audit of a Poisson release: the planted rows join the sample (the same sample
    and noise as without them: the canary file is not a public setting), so the two releases
    differ by the canaries' clipped gradients over the public normaliser, nothing else."""
    canaries = tmp_path / "canaries.jsonl"
    canaries.write_text(
        '{"text": "zebra umbrellas quietly", "label": 1}\n'
        '{"text": "forty purple councils", "label": 1}\n'
    )
    kw = dict(sampling="poisson", sampling_rate=0.3, neighbouring="add-remove", epsilon=8.0)
    plain = release_targets(dp_config(model_dirs, data_dir, **kw), tmp_path / "plain")
    audit = release_targets(
        dp_config(model_dirs, data_dir, canary_file=str(canaries), **kw), tmp_path / "audit"
    )
    diff = [audit.targets[k] - plain.targets[k] for k in plain.targets]
    assert all(float(d[0].abs().max()) == 0 for d in diff)  # no canary of class 0
    norm = float(sum(d[1].pow(2).sum() for d in diff).sqrt())
    clip, n = plain.meta.mechanism.clip, plain.meta.mechanism.normaliser
    assert 0 < norm <= 2 * clip / n + 1e-6
    # the sample's size stays private: the counts are the normaliser plus the planted rows
    assert audit.meta.planted == [0, 2] and audit.meta.counts == [5, 7] == [
        n + k for n, k in zip(plain.meta.counts, audit.meta.planted, strict=True)
    ]


def test_privacy_command_with_a_sampling_rate():
    r = invoke(
        "privacy",
        "--epsilon",
        "2",
        "--delta",
        "1e-5",
        "--sampling-rate",
        "0.5",
        "--neighbouring",
        "add-remove",
        "--clip",
        "1",
        "--n-per-class",
        "10",
    )
    z = dp.poisson_noise_multiplier(2.0, 1e-5, 0.5)
    assert r.exit_code == 0 and f"σ/Δ = {z:.6g}" in r.stdout and "Poisson sample" in r.stdout
    assert f"{z / 10:.6g} on each released class mean" in r.stdout  # add-remove: Δ = C
    r = invoke("privacy", "--epsilon", "2", "--delta", "1e-5", "--sampling-rate", "0.5")
    assert r.exit_code == 2 and "--neighbouring add-remove" in r.stderr
