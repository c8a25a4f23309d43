"""ADMM over token embeddings, for many independent problems at once.

A *problem* is one class target matched by ``B`` synthetic sequences of ``L`` positions:
``head`` template ids, ``G`` free positions, ``tail`` template ids, then the class's label word
but its last token (``LabelTokens.feed``; nothing for one-token label words). All problems of a
run are stacked in one variable ``x ∈ R^{P×B×L×d}`` and optimised together. That equals solving
them one by one because the loss is a sum over problems, Adam is elementwise, and everything that
couples entries (gradient clipping, best-iterate bookkeeping, the init) is done per problem.

Per outer iteration (scaled dual ``u = λ/ρ``, docs/authors-code.md, "The ADMM loop")::

    z = Proj(x + u)                          # z-step, tokens
    I × Adam on rec(x) + ρ/2 ‖x − z + u‖²    # x-step (:meth:`ADMMSolver.x_update`)
    u += x − z                               # dual step

What is returned is chosen by a :class:`Selection` rule. ``x``, ``u`` and Adam's state are fp32
on the model's device whatever the model's dtype; only the transformer passes run in it.
"""

from __future__ import annotations

import os
import pickle
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from gradmm.core.lm import loss_dtype
from gradmm.core.matching import AutogradMatchingLoss, MatchingLoss
from gradmm.core.projection import Projector
from gradmm.core.settings import SolverConfig
from gradmm.errors import UserError


@dataclass(frozen=True)
class Layout:
    """Positions of one sequence: ``head`` ids, ``n_free`` free slots, ``tail`` ids, then
    ``suffixes[c]`` for a sequence of class ``c`` (all of one length)."""

    head: list[int]
    n_free: int
    tail: list[int]
    suffixes: list[list[int]]

    def __post_init__(self):
        if len({len(s) for s in self.suffixes}) != 1:
            raise ValueError("every class's suffix must have the same length")

    @property
    def length(self) -> int:
        return len(self.head) + self.n_free + len(self.tail) + len(self.suffixes[0])

    @property
    def free(self) -> slice:
        return slice(len(self.head), len(self.head) + self.n_free)

    def fixed_mask(self) -> Tensor:
        mask = torch.ones(self.length, dtype=torch.bool)
        mask[self.free] = False
        return mask

    def fixed_ids(self) -> Tensor:
        """(C, L - G) the ids of every position but the free ones, per class, in order."""
        return torch.tensor([self.head + self.tail + s for s in self.suffixes], dtype=torch.long)

    def full_ids(self, free_ids: Tensor, classes: Tensor) -> Tensor:
        """(P, B, G) free token ids of problems of ``classes`` (P,) -> (P, B, L) ids."""
        n_problems, batch = free_ids.shape[:2]
        fixed = self.fixed_ids().to(free_ids.device)[classes.to(free_ids.device)]
        fixed = fixed[:, None].expand(n_problems, batch, -1)
        n_head = len(self.head)
        return torch.cat([fixed[..., :n_head], free_ids, fixed[..., n_head:]], -1)


@dataclass(frozen=True)
class Problems:
    classes: Tensor  # (P,) class index
    seeds: list[int]  # init RNG seed of each problem

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: slice) -> Problems:
        return Problems(self.classes[index], self.seeds[index])


@dataclass
class Solution:
    ids: Tensor  # (P, B, G) free token ids
    rec: Tensor  # (P,) matching loss of the returned tokens
    timings: dict[str, float] = field(default_factory=dict)
    # per outer iteration: seconds since the solve started, mean best rec (select: projected)
    history: list[tuple[float, float]] = field(default_factory=list)


def problem_seed(seed: int, problem: int) -> int:
    """Independent, reproducible RNG seed of one problem (whatever else runs alongside it)."""
    return int(np.random.SeedSequence([seed, problem]).generate_state(1)[0])


@dataclass
class SolverState:
    """Everything an interrupted solve resumes from (one checkpoint file)."""

    x: Tensor  # (P, B, L, d) continuous iterate, fp32
    u: Tensor  # (P, B, L, d) scaled dual variable
    best_rec: Tensor  # (P,) loss of best_ids
    best_ids: Tensor  # (P, B, G) tokens kept by the selection rule so far
    best_obj: Tensor  # (P,) augmented objective of best_x (select: augmented)
    best_x: Tensor  # (P, B, L, d) iterate kept by the augmented rule
    step: int = 0  # outer iterations done
    adam: dict | None = None
    stalled: int = 0  # outer iterations since any problem's best_rec improved
    history: list[tuple[float, float]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Write atomically (a temporary file, then a rename)."""
        tmp = path.with_name(path.name + ".tmp")
        torch.save({f.name: getattr(self, f.name) for f in fields(self)}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, device: torch.device) -> SolverState:
        """The state saved at ``path``; a truncated or foreign file is a :class:`UserError`."""
        try:
            return cls(**torch.load(path, map_location=device))
        except (RuntimeError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
            raise UserError(
                f"{path} is not a readable checkpoint ({type(e).__name__}): pass "
                "--overwrite to start the run again"
            ) from None


class Selection(Protocol):
    """Which tokens a solve returns: sees every projection and every x-update."""

    def observe_projection(
        self, solver: ADMMSolver, state: SolverState, problems: Problems, ids: Tensor
    ) -> None: ...

    def observe_iterate(self, state: SolverState, objective: Tensor) -> None: ...

    def finish(self, solver: ADMMSolver, state: SolverState, problems: Problems) -> None: ...


class ProjectedSelection:
    """Ours: the tokens of lowest ``rec`` among every projection ``z`` (and the last one)."""

    def observe_projection(self, solver, state, problems, ids):
        with solver.timed("selection"), torch.no_grad():
            rec = solver.rec(solver.embed(ids, problems), problems)
        better = rec < state.best_rec
        if bool(better.any()):
            state.stalled = 0
        state.best_ids = torch.where(better[:, None, None], ids, state.best_ids)
        state.best_rec = torch.where(better, rec, state.best_rec)

    def observe_iterate(self, state, objective):
        pass

    def finish(self, solver, state, problems):
        self.observe_projection(
            solver, state, problems, solver.project(state.x + state.u, problems)
        )


class AugmentedSelection:
    """The authors': the x iterate of lowest augmented objective (ties go to the later one),
    projected once at the end."""

    def observe_projection(self, solver, state, problems, ids):
        pass

    def observe_iterate(self, state, objective):
        better = objective <= state.best_obj
        state.best_obj = torch.where(better, objective, state.best_obj)
        state.best_x[better] = state.x.detach()[better]

    def finish(self, solver, state, problems):
        state.best_ids = solver.project(state.best_x, problems)
        with torch.no_grad():
            state.best_rec = solver.rec(solver.embed(state.best_ids, problems), problems)


SELECTIONS: dict[str, Selection] = {
    "projected": ProjectedSelection(),
    "augmented": AugmentedSelection(),
}


class SolverHooks:
    """Extra work a solve does (nothing here); :class:`AuthorsOverhead` is the reference's."""

    def inner_extra(self, solver: ADMMSolver, x: Tensor, z_ids: Tensor, problems: Problems):
        return 0.0

    def after_iteration(self, solver: ADMMSolver, step: int, x: Tensor, problems: Problems):
        pass


class ADMMSolver:
    """Solves a batch of GRADMM problems. See the module docstring.

    Args:
        model: the frozen causal LM.
        loss: matching loss against the release's targets.
        projector: the z-step.
        layout: sequence layout shared by all problems.
        batch: ``B``, sequences per problem.
        config: solver settings.
        embeddings: (V, d) the model's input embedding rows (``LoadedModel.embeddings``).
        hooks: extra work per step (the reference engine's logging work).
        sequential: solve problems, and score init candidates, one at a time (the authors' way).
        init_sampler: with ``config.init == "lm"``, ``(problems, K) -> (P, K, B, G)`` free token
            ids of K candidate batches per problem (the LM's own text, sampled by the caller).
    """

    INIT_CHUNK = 16  # init candidates scored per forward pass (fixed: part of the RNG stream)

    def __init__(
        self,
        model: torch.nn.Module,
        loss: MatchingLoss | AutogradMatchingLoss,
        projector: Projector,
        layout: Layout,
        batch: int,
        config: SolverConfig,
        embeddings: Tensor,
        hooks: SolverHooks | None = None,
        sequential: bool = False,
        init_sampler: Callable[[Problems, int], Tensor] | None = None,
    ):
        if config.init == "lm" and init_sampler is None:
            raise ValueError("init: lm needs an init_sampler")
        self.init_sampler = init_sampler
        self.model = model
        self.loss = loss
        self.projector = projector
        self.layout = layout
        self.batch = batch
        self.cfg = config
        self.hooks = hooks or SolverHooks()
        self.sequential = sequential
        self.selection = SELECTIONS[config.select]
        self.emb = embeddings.detach()  # (V, d): rows are valid inputs_embeds
        self.device = self.emb.device
        self.dtype = loss_dtype(self.emb.dtype)  # of x, u and Adam's state
        self.fixed = layout.fixed_mask().to(self.device)
        # (C, L - G, d) in position order
        self.fixed_emb = self.emb[layout.fixed_ids().to(self.device)].to(self.dtype)
        allowed = torch.isfinite(projector.penalty)
        self.init_scale = (
            config.init_scale
            if config.init_scale is not None
            else float(self.emb[allowed].to(self.dtype).norm(dim=-1).mean())
        )
        self.timings: dict[str, float] = defaultdict(float)

    # ----------------------------------------------------------------------------- pieces

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[stage]``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] += time.perf_counter() - started

    def rec(self, x: Tensor, problems: Problems) -> Tensor:
        """(P, B, L, d) embeddings -> (P,) matching loss."""
        return self.loss.rec(self.model, x, problems.classes.to(self.device))

    def embed(self, free_ids: Tensor, problems: Problems) -> Tensor:
        """(P, B, G) free ids -> (P, B, L, d) embeddings with the template, in ``self.dtype``."""
        ids = self.layout.full_ids(free_ids.to(self.device), problems.classes)
        return self.emb[ids].to(self.dtype)

    def project(self, x: Tensor, problems: Problems) -> Tensor:
        """(P, B, L, d) -> (P, B, G) free token ids."""
        with self.timed("projection"):
            n_problems, batch = x.shape[:2]
            v = x[:, :, self.layout.free].reshape(n_problems * batch, self.layout.n_free, -1)
            ids = self.projector(v, problems.classes.repeat_interleave(batch))
        return ids.reshape(n_problems, batch, -1).to(self.device)

    def _with_template(self, x: Tensor, classes: Tensor) -> Tensor:
        """Set the fixed positions of (P, B, L, d) ``x`` of problems of ``classes`` (P,)."""
        x[:, :, self.fixed] = self.fixed_emb[classes.to(self.device)][:, None]
        return x

    def _rescale(self, x: Tensor) -> Tensor:
        return torch.nn.functional.normalize(x, dim=-1) * self.init_scale

    def _score_candidates(self, cand: Tensor, single: Problems) -> Tensor:
        """(n, B, L, d) candidate batches of one problem -> (n,) rec."""
        if self.sequential:
            return torch.cat([self.rec(c[None], single) for c in cand])
        n = cand.shape[0]
        return self.rec(cand, Problems(single.classes.expand(n), [0] * n))

    @torch.no_grad()
    def initialise(self, problems: Problems) -> Tensor:
        """Best of K random N(0, I) batches per problem (by ``rec``), rescaled per position.

        Draws come from one CPU generator per problem, so they do not depend on the device."""
        length, dim = self.layout.length, self.emb.shape[1]
        out = torch.empty(
            len(problems), self.batch, length, dim, dtype=self.dtype, device=self.device
        )
        with self.timed("init"):
            for p in range(len(problems)):
                gen = torch.Generator().manual_seed(problems.seeds[p])
                single = problems[p : p + 1]
                best_rec, best = float("inf"), None
                for start in range(0, self.cfg.candidates, self.INIT_CHUNK):
                    n = min(self.INIT_CHUNK, self.cfg.candidates - start)
                    cand = torch.randn(n, self.batch, length, dim, generator=gen, dtype=self.dtype)
                    cand = cand.to(self.device)
                    if self.cfg.score_init_scaled:
                        cand = self._rescale(cand)
                    rec = self._score_candidates(self._with_template(cand, single.classes), single)
                    i = int(rec.argmin())
                    if float(rec[i]) < best_rec:
                        best_rec, best = float(rec[i]), cand[i].clone()
                out[p] = best
            return self._with_template(self._rescale(out), problems.classes)

    @torch.no_grad()
    def sampled_start(self, problems: Problems) -> tuple[Tensor, Tensor]:
        """``init: lm``: per problem, the best (lowest ``rec``) of K sampled batches of text:
        (P, B, G) free token ids and (P,) their ``rec``."""
        best_ids, best_rec = [], []
        with self.timed("init"):
            for p in range(len(problems)):
                single = problems[p : p + 1]
                cand = self.init_sampler(single, self.cfg.candidates)[0].to(self.device)
                recs = []
                for start in range(0, len(cand), self.INIT_CHUNK):
                    chunk = cand[start : start + self.INIT_CHUNK]
                    n = len(chunk)
                    x = self.embed(chunk, Problems(single.classes.expand(n), [0] * n))
                    recs.append(self._score_candidates(x, single))
                rec = torch.cat(recs)
                i = int(rec.argmin())
                best_ids.append(cand[i])
                best_rec.append(rec[i])
        return torch.stack(best_ids), torch.stack(best_rec).to(self.dtype)

    def initial_state(self, problems: Problems) -> SolverState:
        """x₀ (random or the LM's text) and u₀ = 0. From sampled text, x₀ = z₀ = that text's
        embeddings, and it is the best seen so far: a solve never returns worse text."""
        n_problems = len(problems)
        inf = torch.full((n_problems,), float("inf"), dtype=self.dtype, device=self.device)
        if self.cfg.init == "lm":
            best_ids, best_rec = self.sampled_start(problems)
            x = self.embed(best_ids, problems)
        else:
            x = self.initialise(problems)
            best_rec = inf
            best_ids = torch.zeros(
                n_problems, self.batch, self.layout.n_free, dtype=torch.long, device=self.device
            )
        return SolverState(
            x=x,
            u=torch.zeros_like(x),
            best_rec=best_rec,
            best_ids=best_ids,
            best_obj=inf.clone(),
            best_x=x.clone(),
        )

    def x_update(
        self,
        state: SolverState,
        opt: torch.optim.Optimizer,
        z: Tensor,
        z_ids: Tensor,
        problems: Problems,
    ) -> Tensor:
        """``I`` Adam steps on ``rec(x) + ρ/2 ‖x − z + u‖²``; returns the last (P,) objective."""
        x, u, rho = state.x, state.u, self.cfg.rho
        with self.timed("x_steps"):
            for _ in range(self.cfg.inner_steps):
                opt.zero_grad(set_to_none=True)
                obj = self.rec(x, problems) + 0.5 * rho * (x - z + u).pow(2).sum((1, 2, 3))
                extra = self.hooks.inner_extra(self, x, z_ids, problems)
                # autograd.grad, not backward: nothing accumulates into the model's parameters
                (x.grad,) = torch.autograd.grad(obj.sum() + extra, x)
                self._condition_gradient(x.grad)
                opt.step()
        return obj.detach()

    # ------------------------------------------------------------------------------ solve

    def solve(
        self,
        problems: Problems,
        checkpoint: Path | None = None,
        checkpoint_every: int = 5,
        progress: bool = True,
    ) -> Solution:
        """Run ADMM on all problems; resumes from ``checkpoint`` if that file exists."""
        if self.sequential:
            parts = [
                self._solve_part(problems, p, checkpoint, checkpoint_every, progress)
                for p in range(len(problems))
            ]
            return Solution(
                ids=torch.cat([s.ids for s in parts]),
                rec=torch.cat([s.rec for s in parts]),
                timings=dict(self.timings),
                history=_sequential_history([s.history for s in parts]),
            )
        return self._solve(problems, checkpoint, checkpoint_every, progress)

    def _solve_part(self, problems, p: int, checkpoint, checkpoint_every, progress) -> Solution:
        """Problem ``p`` alone (the reference engine's order), resumable: its unfinished state
        in ``checkpoint.partP.pt``, its answer, once found, in ``checkpoint.partP.done.pt``."""
        if checkpoint is None:
            return self._solve(problems[p : p + 1], None, checkpoint_every, progress)
        state_file = checkpoint.with_name(f"{checkpoint.stem}.part{p}{checkpoint.suffix}")
        done_file = state_file.with_name(f"{state_file.stem}.done{state_file.suffix}")
        if done_file.exists():
            return Solution(**torch.load(done_file, map_location=self.device))
        part = self._solve(problems[p : p + 1], state_file, checkpoint_every, progress)
        answer = {"ids": part.ids, "rec": part.rec, "history": part.history}
        torch.save(answer, done_file.with_name(done_file.name + ".tmp"))
        os.replace(done_file.with_name(done_file.name + ".tmp"), done_file)
        state_file.unlink(missing_ok=True)
        return part

    def _solve(self, problems, checkpoint, checkpoint_every, progress) -> Solution:
        cfg, started = self.cfg, time.perf_counter()
        if checkpoint is not None and checkpoint.exists():
            state = SolverState.load(checkpoint, self.device)
        else:
            state = self.initial_state(problems)
        elapsed = state.history[-1][0] if state.history else 0.0
        state.x.requires_grad_(True)
        opt = torch.optim.Adam([state.x], lr=cfg.lr)
        if state.adam is not None:
            opt.load_state_dict(state.adam)

        bar = tqdm(
            range(state.step, cfg.steps),
            desc="generate: ADMM",
            unit="iter",
            initial=state.step,
            total=cfg.steps,
            disable=not progress,
        )
        for step in bar:
            with torch.no_grad():
                self._with_template(state.x, problems.classes)
            z_ids = self.project(state.x.detach() + state.u, problems)
            self.selection.observe_projection(self, state, problems, z_ids)
            z = self.embed(z_ids, problems)
            objective = self.x_update(state, opt, z, z_ids, problems)
            self.hooks.after_iteration(self, step, state.x.detach(), problems)
            with torch.no_grad():
                state.u += state.x - z
                self._with_template(state.x, problems.classes)
            self.selection.observe_iterate(state, objective)
            state.step, state.stalled = step + 1, state.stalled + 1
            state.history.append(
                (elapsed + time.perf_counter() - started, float(state.best_rec.mean()))
            )
            if cfg.select == "projected":
                bar.set_postfix(rec=f"{state.history[-1][1]:.4f}")
            if cfg.patience is not None and state.stalled >= cfg.patience:
                break
            due = state.step % checkpoint_every == 0 and state.step < cfg.steps
            if checkpoint is not None and due:
                state.adam = opt.state_dict()
                state.save(checkpoint)
        bar.close()
        state.x = state.x.detach()
        if not (cfg.init == "lm" and cfg.steps == 0):  # T = 0 returns the sampled text itself
            self.selection.finish(self, state, problems)
        return Solution(
            ids=state.best_ids,
            rec=state.best_rec,
            timings=dict(self.timings),
            history=state.history,
        )

    @torch.no_grad()
    def _condition_gradient(self, grad: Tensor) -> None:
        if self.cfg.freeze_template:
            grad[:, :, self.fixed] = 0
        if self.cfg.grad_clip is not None:
            norm = grad.flatten(1).norm(dim=1)
            scale = torch.where(
                norm > self.cfg.grad_clip, self.cfg.grad_clip / (norm + 1e-6), torch.ones_like(norm)
            )
            grad.mul_(scale[:, None, None, None])


def _sequential_history(histories: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Histories of problems solved one after another, as one run's: after iteration t, the time
    all problems together needed to get there and their mean best rec."""
    steps = min(map(len, histories), default=0)
    return [
        (sum(h[t][0] for h in histories), sum(h[t][1] for h in histories) / len(histories))
        for t in range(steps)
    ]


class AuthorsOverhead(SolverHooks):
    """The work the authors' code does only for logging (docs/authors-code.md, "Logging
    overhead"): a zero-weight perplexity term in every inner step, an extra projection and two
    loss evaluations per outer iteration, a third projection every 10. Part of the reference
    engine, never of ours."""

    def inner_extra(self, solver, x, z_ids, problems):
        n_problems, batch, length, dim = x.shape
        embeds = x.reshape(-1, length, dim).to(solver.model.dtype)
        logits = solver.model(inputs_embeds=embeds).logits[:, :-1].float()
        targets = solver.layout.full_ids(z_ids, problems.classes).reshape(-1, length)[:, 1:]
        ppl = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets)
        return 0.0 * ppl

    @torch.no_grad()
    def after_iteration(self, solver, step, x, problems):
        with solver.timed("logging"):
            ids = solver.projector(
                x[:, :, solver.layout.free].flatten(0, 1),
                problems.classes.repeat_interleave(x.shape[1]),
            ).reshape(x.shape[0], x.shape[1], -1)
            solver.rec(x, problems)
            solver.rec(solver.embed(ids, problems), problems)
            solver.model(input_ids=solver.layout.full_ids(ids, problems.classes).flatten(0, 1))
            if step % 10 == 0:
                solver.projector(
                    x[:, :, solver.layout.free].flatten(0, 1),
                    problems.classes.repeat_interleave(x.shape[1]),
                )
