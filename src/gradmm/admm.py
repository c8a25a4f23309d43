"""ADMM over token embeddings, for many independent problems at once.

A *problem* is one class target matched by ``B`` synthetic sequences of ``L`` positions:
``head`` template ids, ``G`` free positions, ``tail`` template ids, then the class's label word
but its last token (``LabelTokens.feed``; nothing for one-token label words). All problems of a
run are stacked in one variable ``x ∈ R^{P×B×L×d}`` and optimised together. That equals solving
them one by one because the loss is a sum over problems, Adam is elementwise, and everything that
couples entries (gradient clipping, best-iterate bookkeeping, the init) is done per problem.

Per outer iteration (scaled dual ``u = λ/ρ``, REFERENCE.md §2.3–2.6)::

    z = Proj(x + u)                          # z-step, tokens
    I × Adam on rec(x) + ρ/2 ‖x − z + u‖²    # x-step, gradient clipped per problem
    u += x − z                               # dual step
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from gradmm.matching import AutogradMatchingLoss, MatchingLoss
from gradmm.models import input_embedding_matrix
from gradmm.projection import Projector


@dataclass(frozen=True)
class SolverConfig:
    steps: int = 30  # T, outer iterations
    inner_steps: int = 50  # I, Adam steps per x-update
    rho: float = 1.0
    lr: float = 0.008
    grad_clip: float | None = 1.0  # max x-gradient norm per problem
    init_candidates: int = 500  # K random batches, best kept
    init_scale: float | None = None  # per-position norm of the init; None: mean token norm
    score_init_scaled: bool = True  # score init candidates at the scale they are used at
    freeze_template: bool = True  # zero the template positions' x-gradient
    select: Literal["projected", "augmented"] = "projected"


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
        fixed = self.fixed_ids()[classes][:, None].expand(n_problems, batch, -1)
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


def problem_seed(seed: int, problem: int) -> int:
    """Independent, reproducible RNG seed of one problem (whatever else runs alongside it)."""
    return int(np.random.SeedSequence([seed, problem]).generate_state(1)[0])


class ADMMSolver:
    """Solves a batch of GRADMM problems. See the module docstring.

    Args:
        model: the frozen causal LM.
        loss: matching loss against the release's targets.
        projector: the z-step.
        layout: sequence layout shared by all problems.
        batch: ``B``, sequences per problem.
        config: solver settings.
        embeddings: (V, d) the model's input embedding rows (:func:`input_embedding_matrix`).
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
        embeddings: Tensor | None = None,
    ):
        self.model = model
        self.loss = loss
        self.projector = projector
        self.layout = layout
        self.batch = batch
        self.cfg = config
        # (V, d): rows are valid inputs_embeds (computed once by the caller when it has them)
        self.emb = input_embedding_matrix(model) if embeddings is None else embeddings.detach()
        self.fixed = layout.fixed_mask()
        self.fixed_emb = self.emb[layout.fixed_ids()]  # (C, L - G, d), in position order
        allowed = torch.isfinite(projector.penalty)
        self.init_scale = (
            config.init_scale
            if config.init_scale is not None
            else float(self.emb[allowed].norm(dim=-1).mean())
        )
        self.timings: dict[str, float] = defaultdict(float)

    # ----------------------------------------------------------------------------- pieces

    def rec(self, x: Tensor, problems: Problems) -> Tensor:
        """(P, B, L, d) embeddings -> (P,) matching loss."""
        return self.loss.rec(self.model, x, problems.classes)

    def embed(self, free_ids: Tensor, problems: Problems) -> Tensor:
        """(P, B, G) free ids -> (P, B, L, d) embeddings with the template."""
        return self.emb[self.layout.full_ids(free_ids, problems.classes)]

    def project(self, x: Tensor, problems: Problems) -> Tensor:
        """(P, B, L, d) -> (P, B, G) free token ids."""
        n_problems, batch = x.shape[:2]
        v = x[:, :, self.layout.free].reshape(n_problems * batch, self.layout.n_free, -1)
        ids = self.projector(v, problems.classes.repeat_interleave(batch))
        return ids.reshape(n_problems, batch, -1)

    def _timed_project(self, x: Tensor, problems: Problems) -> Tensor:
        started = time.perf_counter()
        ids = self.project(x, problems)
        self.timings["projection"] += time.perf_counter() - started
        return ids

    def _with_template(self, x: Tensor, classes: Tensor) -> Tensor:
        """Set the fixed positions of (P, B, L, d) ``x`` of problems of ``classes`` (P,)."""
        x[:, :, self.fixed] = self.fixed_emb[classes][:, None]
        return x

    def _rescale(self, x: Tensor) -> Tensor:
        return torch.nn.functional.normalize(x, dim=-1) * self.init_scale

    def _score_candidates(self, cand: Tensor, single: Problems) -> Tensor:
        """(n, B, L, d) candidate batches of one problem -> (n,) rec, in one forward pass."""
        n = cand.shape[0]
        return self.rec(cand, Problems(single.classes.expand(n), [0] * n))

    def _inner_extra(self, x: Tensor, z_ids: Tensor, problems: Problems) -> Tensor | float:
        """Extra term of the x-step objective (nothing here; see ReferenceSolver)."""
        return 0.0

    def _log_iteration(self, step: int, x: Tensor, problems: Problems) -> None:
        """Work after each outer iteration (nothing here; see ReferenceSolver)."""

    @torch.no_grad()
    def initialise(self, problems: Problems) -> Tensor:
        """Best of K random N(0, I) batches per problem (by ``rec``), rescaled per position."""
        started = time.perf_counter()
        length, dim = self.layout.length, self.emb.shape[1]
        dtype = self.emb.dtype
        out = torch.empty(len(problems), self.batch, length, dim, dtype=dtype)
        for p in range(len(problems)):
            gen = torch.Generator().manual_seed(problems.seeds[p])
            single = problems[p : p + 1]
            best_rec, best = float("inf"), None
            for start in range(0, self.cfg.init_candidates, self.INIT_CHUNK):
                n = min(self.INIT_CHUNK, self.cfg.init_candidates - start)
                cand = torch.randn(n, self.batch, length, dim, generator=gen, dtype=dtype)
                if self.cfg.score_init_scaled:
                    cand = self._rescale(cand)
                rec = self._score_candidates(self._with_template(cand, single.classes), single)
                i = int(rec.argmin())
                if float(rec[i]) < best_rec:
                    best_rec, best = float(rec[i]), cand[i].clone()
            out[p] = best
        out = self._with_template(self._rescale(out), problems.classes)
        self.timings["init"] += time.perf_counter() - started
        return out

    # ------------------------------------------------------------------------------ solve

    def solve(
        self,
        problems: Problems,
        checkpoint: Path | None = None,
        checkpoint_every: int = 5,
        progress: bool = True,
    ) -> Solution:
        """Run ADMM on all problems; resumes from ``checkpoint`` if that file exists."""
        cfg = self.cfg
        n_problems = len(problems)
        state = torch.load(checkpoint) if checkpoint is not None and checkpoint.exists() else None
        if state is None:
            x = self.initialise(problems)
            u = torch.zeros_like(x)
            best_rec = torch.full((n_problems,), float("inf"), dtype=x.dtype)
            best_ids = torch.zeros(n_problems, self.batch, self.layout.n_free, dtype=torch.long)
            best_obj = torch.full((n_problems,), float("inf"), dtype=x.dtype)
            best_x = x.clone()
            start_step = 0
        else:
            x, u = state["x"], state["u"]
            best_rec, best_ids = state["best_rec"], state["best_ids"]
            best_obj, best_x = state["best_obj"], state["best_x"]
            start_step = state["step"]
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr)
        if state is not None:
            opt.load_state_dict(state["adam"])

        bar = tqdm(
            range(start_step, cfg.steps),
            desc="generate: ADMM",
            unit="iter",
            initial=start_step,
            total=cfg.steps,
            disable=not progress,
        )
        for step in bar:
            with torch.no_grad():
                self._with_template(x, problems.classes)
            z_ids = self._timed_project(x.detach() + u, problems)
            z = self.embed(z_ids, problems)
            if cfg.select == "projected":
                best_rec, best_ids = self._keep_best(problems, z_ids, z, best_rec, best_ids)

            started = time.perf_counter()
            for _ in range(cfg.inner_steps):
                opt.zero_grad(set_to_none=True)
                obj = self.rec(x, problems) + 0.5 * cfg.rho * (x - z + u).pow(2).sum((1, 2, 3))
                # autograd.grad, not backward: nothing accumulates into the model's parameters
                extra = self._inner_extra(x, z_ids, problems)
                (x.grad,) = torch.autograd.grad(obj.sum() + extra, x)
                self._condition_gradient(x.grad)
                opt.step()
                last_obj = obj.detach()
            self.timings["x_steps"] += time.perf_counter() - started

            self._log_iteration(step, x.detach(), problems)
            with torch.no_grad():
                u += x - z
                self._with_template(x, problems.classes)
                if cfg.select == "augmented":  # the authors' rule; ties go to the later iterate
                    better = last_obj <= best_obj
                    best_obj = torch.where(better, last_obj, best_obj)
                    best_x[better] = x[better]
            if cfg.select == "projected":
                bar.set_postfix(rec=f"{float(best_rec.mean()):.4f}")
            last = step + 1 == cfg.steps
            if checkpoint is not None and (step + 1) % checkpoint_every == 0 and not last:
                _save_atomic(
                    {
                        "x": x.detach(),
                        "u": u,
                        "adam": opt.state_dict(),
                        "best_rec": best_rec,
                        "best_ids": best_ids,
                        "best_obj": best_obj,
                        "best_x": best_x,
                        "step": step + 1,
                    },
                    checkpoint,
                )

        x = x.detach()
        if cfg.select == "projected":
            final_ids = self._timed_project(x + u, problems)
            best_rec, best_ids = self._keep_best(
                problems, final_ids, self.embed(final_ids, problems), best_rec, best_ids
            )
        else:
            best_ids = self._timed_project(best_x, problems)
            with torch.no_grad():
                best_rec = self.rec(self.embed(best_ids, problems), problems)
        return Solution(ids=best_ids, rec=best_rec, timings=dict(self.timings))

    @torch.no_grad()
    def _keep_best(self, problems, ids, emb, best_rec, best_ids):
        started = time.perf_counter()
        rec = self.rec(emb, problems)
        self.timings["selection"] += time.perf_counter() - started
        better = rec < best_rec
        best_ids = best_ids.clone()
        best_ids[better] = ids[better]
        return torch.where(better, rec, best_rec), best_ids

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


class ReferenceSolver(ADMMSolver):
    """The authors' computation (REFERENCE.md §8), kept as the oracle of the fast engine.

    Same algorithm and random draws as :class:`ADMMSolver`, computed the slow way: ``rec`` by
    ``autograd.grad(create_graph=True)`` w.r.t. the matched parameters and a second backward; the
    projection re-encodes the whole prefix at every position; problems and init candidates one at
    a time; and the work the authors do only for logging (a zero-weight perplexity term in every
    inner step, an extra projection + loss evaluation per outer iteration, a third projection
    every 10). No checkpointing.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector.use_cache = False
        if isinstance(self.loss, MatchingLoss):
            out = self.loss.output
            params = {"weight": out.weight, "bias": out.bias}
            targets = {"weight": self.loss.tw, "bias": self.loss.tb}
            keep = [k for k in params if params[k] is not None]
            self.loss = AutogradMatchingLoss(
                {k: params[k] for k in keep}, {k: targets[k] for k in keep}, self.loss.labels
            )

    def _score_candidates(self, cand: Tensor, single: Problems) -> Tensor:
        return torch.cat([self.rec(c[None], single) for c in cand])

    def _inner_extra(self, x: Tensor, z_ids: Tensor, problems: Problems) -> Tensor:
        n_problems, batch, length, dim = x.shape
        logits = self.model(inputs_embeds=x.reshape(-1, length, dim)).logits[:, :-1]
        targets = self.layout.full_ids(z_ids, problems.classes).reshape(-1, length)[:, 1:]
        ppl = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets)
        return 0.0 * ppl

    @torch.no_grad()
    def _log_iteration(self, step: int, x: Tensor, problems: Problems) -> None:
        started = time.perf_counter()
        ids = self.project(x, problems)
        self.rec(x, problems)
        self.rec(self.embed(ids, problems), problems)
        self.model(input_ids=self.layout.full_ids(ids, problems.classes).flatten(0, 1))
        if step % 10 == 0:
            self.project(x, problems)
        self.timings["logging"] += time.perf_counter() - started

    def solve(self, problems: Problems, checkpoint=None, checkpoint_every=5, progress=True):
        solutions = []
        for p in range(len(problems)):
            solutions.append(super().solve(problems[p : p + 1], None, checkpoint_every, progress))
        return Solution(
            ids=torch.cat([s.ids for s in solutions]),
            rec=torch.cat([s.rec for s in solutions]),
            timings=dict(self.timings),
        )


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
