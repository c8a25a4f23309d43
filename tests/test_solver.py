"""Projection and ADMM: allowed tokens, cached == uncached, batched == one at a time, resume."""

import pytest
import torch
from pydantic import ValidationError

from gradmm.core.admm import Problems
from gradmm.core.projection import Projector, allowed_tokens
from gradmm.core.tokens import encode_text
from gradmm.models.loading import load_model
from gradmm.stages.configs import GenerateConfig, ReleaseConfig
from gradmm.stages.generate import build_solver
from gradmm.stages.record import load_release
from gradmm.stages.release import release_targets


@pytest.fixture(scope="module")
def release_dir(model_dirs, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("solver") / "rel"
    cfg = ReleaseConfig(
        task="sst2", model=str(model_dirs["llama"]), n_per_class=5, data_dir=str(data_dir)
    )
    release_targets(cfg, out)
    return out


def lm_and_release(model_dirs, release_dir, double=False):
    lm = load_model(str(model_dirs["llama"]))
    rel = load_release(release_dir)
    if double:
        lm.model.double()
        rel.targets = {k: v.double() for k, v in rel.targets.items()}
    return lm, rel


def small(**kw) -> GenerateConfig:
    base = dict(per_class=6, batch=3, length=5, steps=3, inner_steps=4, topk=12, init_candidates=20)
    return GenerateConfig(**{**base, **kw})


def test_token_filter_rules(tokenizer):
    rows = len(tokenizer) + 5  # padding rows beyond the tokenizer, as in phi-1.5
    fixed = allowed_tokens(tokenizer, rows, "fixed")
    paper = allowed_tokens(tokenizer, rows, "paper")
    great = tokenizer(" great", add_special_tokens=False).input_ids[0]
    eos = tokenizer.eos_token_id
    assert fixed[great] and paper[great]
    assert not fixed[eos] and not paper[eos]  # "<|endoftext|>" fails the word rule
    assert not fixed[len(tokenizer) :].any() and paper[len(tokenizer) :].all()
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if any(ch in text for ch in ";:-()'"):
            assert not fixed[i] and not paper[i], text


@pytest.mark.parametrize("order", ["cosine-first", "lm-first"])
def test_projection_cached_equals_uncached_and_brute_force(order, model_dirs):
    """Batched, KV-cached projection equals the uncached one and a per-row, per-position
    reading of its rule: cosine-first = the LM's favourite of the k tokens nearest (cosine) to
    the embedding; lm-first = the nearest of the LM's k most probable allowed tokens."""
    lm = load_model(str(model_dirs["llama"]))
    allowed = allowed_tokens(lm.tokenizer, lm.embeddings.shape[0])
    contexts = [encode_text(lm.tokenizer, "The"), encode_text(lm.tokenizer, "I")]
    k = 7
    cached = Projector(lm.model, lm.embeddings, allowed, k, contexts, row_chunk=3, order=order)
    uncached = Projector(
        lm.model, lm.embeddings, allowed, k, contexts, use_cache=False, order=order
    )
    v = torch.randn(5, 6, lm.embeddings.shape[1], generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([0, 1, 0, 1, 1])
    ids = cached(v, classes)
    assert torch.equal(ids, uncached(v, classes))

    unit = torch.nn.functional.normalize(lm.embeddings, dim=-1)
    for n in range(5):
        prefix = contexts[int(classes[n])]
        for pos in range(6):
            cos = torch.nn.functional.normalize(v[n, pos], dim=0) @ unit.T
            cos[~allowed] = -float("inf")
            seq = torch.tensor([prefix + ids[n, :pos].tolist()])
            logits = lm.model(input_ids=seq).logits[0, -1]
            logits[~allowed] = -float("inf")
            if order == "cosine-first":
                cand, score = cos.topk(k).indices.tolist(), logits
            else:
                cand, score = logits.topk(k).indices.tolist(), cos
            assert int(ids[n, pos]) == max(cand, key=lambda t: float(score[t]))
    other = "lm-first" if order == "cosine-first" else "cosine-first"
    rule = Projector(lm.model, lm.embeddings, allowed, k, contexts, order=other)
    assert not torch.equal(ids, rule(v, classes))  # the two orders are different rules


def test_admm_lowers_matching_loss_and_reports_it_honestly(model_dirs, release_dir):
    lm, rel = lm_and_release(model_dirs, release_dir)
    solver, problems, _ = build_solver(lm, rel, small(per_class=3, steps=4, inner_steps=10))
    x0 = solver.initialise(problems)
    with torch.no_grad():
        rec_init = solver.rec(x0, problems)
    solution = solver.solve(problems, progress=False)
    with torch.no_grad():
        rec_ids = solver.rec(solver.embed(solution.ids, problems), problems)
        gen = torch.Generator().manual_seed(0)
        allowed = torch.isfinite(solver.projector.penalty).nonzero().flatten()
        random_ids = allowed[torch.randint(len(allowed), (20, 3, 5), generator=gen)]
        p20 = Problems(problems.classes.repeat(10), [0] * 20)
        rec_random = solver.rec(solver.embed(random_ids, p20), p20)
    torch.testing.assert_close(solution.rec, rec_ids)
    assert solution.ids.shape == (2, 3, 5)
    assert (solution.rec < rec_random.median()).all()
    assert (solution.rec < rec_init).all()


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_batched_problems_equal_one_at_a_time(model_dirs, release_dir, preset):
    lm, rel = lm_and_release(model_dirs, release_dir, double=True)
    solver, problems, _ = build_solver(lm, rel, small(preset=preset, length=5))
    together = solver.solve(problems, progress=False)
    for p in range(len(problems)):
        alone = solver.solve(problems[p : p + 1], progress=False)
        assert torch.equal(alone.ids[0], together.ids[p])
        torch.testing.assert_close(alone.rec[0], together.rec[p], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_resumed_run_equals_uninterrupted(model_dirs, release_dir, tmp_path, engine):
    """Interrupted in the z-step after a checkpoint, then resumed: the same tokens and losses.
    The reference engine solves one problem at a time: it is interrupted in its second problem,
    and resumes from the first one's answer and the second one's checkpoint."""
    lm, rel = lm_and_release(model_dirs, release_dir)
    cfg = small(steps=4, engine=engine)
    solver, problems, _ = build_solver(lm, rel, cfg)
    project = solver.projector.__class__.__call__
    calls = {"n": 0, "stop": None}

    def counting(self, v, classes):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return project(self, v, classes)

    solver.projector.__class__ = type("Counting", (Projector,), {"__call__": counting})
    full = solver.solve(problems, progress=False)
    per_part = calls["n"] // (len(problems) if engine == "reference" else 1)
    # the 4th outer iteration's z-step (after the checkpoint of iteration 2): of the 2nd problem
    # for the reference engine
    before = per_part if engine == "reference" else 0
    calls["n"], calls["stop"] = 0, before + 1 + (per_part - 1) * 3 // 4

    solver, problems, _ = build_solver(lm, rel, cfg)
    solver.projector.__class__ = type("Counting", (Projector,), {"__call__": counting})
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        solver.solve(problems, checkpoint=ckpt, checkpoint_every=2, progress=False)
    if engine == "fast":
        assert torch.load(ckpt)["step"] == 2
    else:
        assert sorted(f.name for f in tmp_path.iterdir()) == [
            "checkpoint.part0.done.pt",
            "checkpoint.part1.pt",
        ]
        assert torch.load(tmp_path / "checkpoint.part1.pt")["step"] == 2

    solver, problems, _ = build_solver(lm, rel, cfg)
    resumed = solver.solve(problems, checkpoint=ckpt, checkpoint_every=2, progress=False)
    assert torch.equal(resumed.ids, full.ids)
    torch.testing.assert_close(resumed.rec, full.rec, rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_reference_engine_follows_the_same_trajectory(model_dirs, release_dir, preset):
    """float64: the authors' computation (autograd double backward, uncached projection,
    one problem and one candidate at a time, logging work) gives the fast engine's answer."""
    lm, rel = lm_and_release(model_dirs, release_dir, double=True)
    fast_solver, problems, _ = build_solver(lm, rel, small(preset=preset))
    ref_solver, _, _ = build_solver(lm, rel, small(preset=preset, engine="reference"))
    fast = fast_solver.solve(problems, progress=False)
    ref = ref_solver.solve(problems, progress=False)
    assert torch.equal(fast.ids, ref.ids)
    torch.testing.assert_close(fast.rec, ref.rec, rtol=1e-9, atol=1e-12)
    assert ref.timings["logging"] > 0 and "logging" not in fast.timings


def test_engines_agree_in_float32(model_dirs, release_dir):
    lm, rel = lm_and_release(model_dirs, release_dir)
    fast_solver, problems, _ = build_solver(lm, rel, small(per_class=9))
    ref_solver, _, _ = build_solver(lm, rel, small(per_class=9, engine="reference"))
    fast = fast_solver.solve(problems, progress=False).rec
    ref = ref_solver.solve(problems, progress=False).rec
    assert abs(float(fast.mean() - ref.mean())) < 0.1 * float(ref.mean())


def test_shards_cover_problems_once_in_order():
    from gradmm.core.distributed import shard

    for n in (1, 5, 6, 7):
        for world in (1, 2, 3, 4):
            blocks = [list(shard(n, r, world)) for r in range(world)]
            assert sum(blocks, []) == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_last_block_matching_lowers_the_loss(model_dirs, data_dir, tmp_path):
    from gradmm.stages.record import load_release_model

    cfg = ReleaseConfig(
        task="sst2",
        model=str(model_dirs["llama"]),
        n_per_class=4,
        data_dir=str(data_dir),
        match_params="last-block",
    )
    release_targets(cfg, tmp_path / "rel")
    rel = load_release(tmp_path / "rel")
    lm = load_release_model(rel)
    solver, problems, _ = build_solver(lm, rel, small(per_class=3, steps=3, inner_steps=8))
    with torch.no_grad():
        rec_init = solver.rec(solver.initialise(problems), problems)
    solution = solver.solve(problems, progress=False)
    with torch.no_grad():
        rec_ids = solver.rec(solver.embed(solution.ids, problems), problems)
        torch.testing.assert_close(solution.rec, rec_ids)
    assert (solution.rec < rec_init).all()


def plain_admm(solver, problem, cfg):
    """One problem's ADMM written out from the equations (docs/authors-code.md, "The ADMM
    loop"), sharing only the loss, the projection and the init with the solver: the oracle of
    its loop."""
    layout, fixed, classes = solver.layout, solver.layout.fixed_mask(), problem.classes
    template = solver.emb[layout.fixed_ids()[classes]][:, None]  # (1, 1, L - G, d)

    def tokens_of(v):  # z = Proj(v): free positions only, then the template
        free = solver.projector(v[0][:, layout.free], classes.repeat(v.shape[1]))
        return free[None], solver.emb[layout.full_ids(free[None], classes)]

    best = [float("inf"), None]  # rec, ids: the lowest-loss projection so far

    def project_and_keep(v):
        z_ids, z = tokens_of(v)
        with torch.no_grad():
            rec_z = float(solver.loss.rec(solver.model, z, classes))
        if rec_z < best[0]:
            best[:] = [rec_z, z_ids]
        return z

    x = solver.initialise(problem).clone().requires_grad_(True)
    u = torch.zeros_like(x)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    for _ in range(cfg.steps):
        with torch.no_grad():
            x[:, :, fixed] = template
        z = project_and_keep(x.detach() + u)
        for _ in range(cfg.inner_steps):  # x = argmin rec(x) + ρ/2 ‖x − z + u‖², by Adam
            objective = (
                solver.loss.rec(solver.model, x, classes) + cfg.rho / 2 * ((x - z + u) ** 2).sum()
            )
            (grad,) = torch.autograd.grad(objective.sum(), x)
            grad[:, :, fixed] = 0
            norm = grad.norm()
            if norm > cfg.grad_clip:
                grad = grad * (cfg.grad_clip / (norm + 1e-6))
            x.grad = grad
            opt.step()
        with torch.no_grad():
            u = u + x - z  # scaled dual ascent
            x[:, :, fixed] = template
    project_and_keep(x.detach() + u)
    return best[1], best[0]


def test_solver_equals_a_plain_admm_loop(model_dirs, release_dir):
    lm, rel = lm_and_release(model_dirs, release_dir, double=True)
    cfg = small(per_class=3, steps=4, inner_steps=5)
    solver, problems, _ = build_solver(lm, rel, cfg)
    for p in range(len(problems)):
        ids, rec = plain_admm(solver, problems[p : p + 1], cfg)
        solution = solver.solve(problems[p : p + 1], progress=False)
        assert torch.equal(solution.ids, ids)
        assert float(solution.rec[0]) == pytest.approx(rec, rel=1e-9)
        assert len(solution.history) == cfg.steps


def test_patience_stops_a_stalled_solve(model_dirs, release_dir):
    lm, rel = lm_and_release(model_dirs, release_dir)
    solver, problems, _ = build_solver(lm, rel, small(steps=40, inner_steps=1, lr=1e-6, patience=2))
    solution = solver.solve(problems, progress=False)
    best = [h[1] for h in solution.history]
    assert 2 <= len(best) < 40  # stopped early: the tiny steps stop changing the tokens
    assert best[-1] == best[-2]  # the last 2 (= patience) projections improved nothing
    with pytest.raises(ValidationError, match="patience"):
        small(patience=2, select="augmented")


def test_lower_precision_keeps_the_loss_and_optimiser_in_fp32(model_dirs, release_dir):
    from gradmm.core.lm import place
    from gradmm.core.settings import Runtime

    lm, rel = lm_and_release(model_dirs, release_dir)
    cfg = small(per_class=3, steps=2, inner_steps=3)
    solver32, problems, _ = build_solver(lm, rel, cfg)
    x = solver32.initialise(problems)
    with torch.no_grad():
        rec32 = solver32.rec(x, problems)
    place(lm, Runtime(device="cpu", dtype="bfloat16"))
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.output.weight.dtype == torch.float32  # an fp32 copy of the output layer
    solver16, problems, _ = build_solver(lm, rel, cfg)
    assert solver16.dtype == torch.float32 and solver16.initialise(problems).dtype == torch.float32
    with torch.no_grad():
        rec16 = solver16.rec(x, problems)
    assert rec16.dtype == torch.float32
    torch.testing.assert_close(rec16, rec32, rtol=0.05, atol=0.02)  # bf16 rounding only
    solution = solver16.solve(problems, progress=False)
    assert solution.rec.dtype == torch.float32 and torch.isfinite(solution.rec).all()


def test_lm_init_with_no_steps_returns_the_best_sampled_batch(model_dirs, release_dir):
    """init: lm, T = 0: each problem's text is exactly the lowest-rec of its K sampled batches,
    scored here one candidate at a time; every sampled token is one the projection allows."""
    lm, rel = lm_and_release(model_dirs, release_dir)
    solver, problems, _ = build_solver(lm, rel, small(init="lm", init_candidates=3, steps=0))
    solution = solver.solve(problems, progress=False)
    allowed = torch.isfinite(solver.projector.penalty)
    for p in range(len(problems)):
        single = problems[p : p + 1]
        candidates = solver.init_sampler(single, 3)[0]  # (K, B, G): the same seeded draw
        assert allowed[candidates].all()
        recs = [float(solver.rec(solver.embed(c[None], single), single)) for c in candidates]
        best = min(range(3), key=recs.__getitem__)
        assert torch.equal(solution.ids[p], candidates[best])
        assert float(solution.rec[p]) == pytest.approx(recs[best], rel=1e-5)


def test_lm_init_never_ends_worse_than_its_start(model_dirs, release_dir):
    """select: projected keeps the sampled start among the candidates it returns."""
    lm, rel = lm_and_release(model_dirs, release_dir)
    solver, problems, _ = build_solver(
        lm, rel, small(init="lm", init_candidates=2, steps=2, lr=50.0)
    )  # x far from text
    _, start_rec = solver.sampled_start(problems)
    solution = solver.solve(problems, progress=False)
    assert (solution.rec <= start_rec + 1e-6).all()
    assert solver.cfg.candidates == 2 and small(init="lm").candidates == 20
    assert GenerateConfig(init="lm").candidates == 4 and GenerateConfig().candidates == 500
    assert GenerateConfig(preset="paper").init == "random"


def test_demonstrations_context_lm_first_top1_is_greedy_decoding(model_dirs, release_dir):
    """--projection-context demonstrations: the projection's LM reads the class's public
    demonstrations and the template's head; with lm-first and k = 1 it takes the LM's most
    probable allowed token every time, so every text is Hugging Face's greedy decoding of that
    context restricted to the allowed tokens."""
    from transformers import LogitsProcessorList

    from gradmm.stages.sampling import AllowedTokensOnly, class_context

    lm, rel = lm_and_release(model_dirs, release_dir)
    cfg = small(projection_context="demonstrations", projection="lm-first", topk=1, steps=1)
    solver, problems, contexts = build_solver(lm, rel, cfg)
    classes = range(rel.task.num_classes)
    assert contexts == [class_context(rel.task, rel.prompt, lm.tokenizer, c, "") for c in classes]
    assert contexts[0] != contexts[1]
    solution = solver.solve(problems, progress=False)
    allowed = LogitsProcessorList([AllowedTokensOnly(torch.isfinite(solver.projector.penalty))])
    for p in range(len(problems)):
        feed = torch.tensor([contexts[int(problems.classes[p])]])
        with torch.no_grad():
            greedy = lm.model.generate(
                feed,
                attention_mask=torch.ones_like(feed),
                min_new_tokens=cfg.length,
                max_new_tokens=cfg.length,
                do_sample=False,
                logits_processor=allowed,
                pad_token_id=lm.tokenizer.eos_token_id,
            )[0, feed.shape[1] :]
        for text in solution.ids[p]:
            assert torch.equal(text, greedy)


def test_chat_context_needs_a_chat_template(model_dirs, release_dir):
    from gradmm.errors import UserError

    lm, rel = lm_and_release(model_dirs, release_dir)
    assert not getattr(lm.tokenizer, "chat_template", None)  # the fixture's tokenizer
    with pytest.raises(UserError, match="--projection-context chat"):
        build_solver(lm, rel, small(projection_context="chat"))
