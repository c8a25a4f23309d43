"""Output-layer gradients in closed form, and the space they are released and matched in.

For one sequence with final hidden states ``h_k ∈ R^d`` at its ``K`` label positions (one per
token of its label word, :class:`gradmm.core.tokens.LabelTokens`), probabilities
``p_k = softmax(W h_k + b)``, label tokens ``y_k`` and position weights ``w_k``, the gradient of
the (weighted) cross-entropy w.r.t. the output layer is ``g_W = Σ_k w_k r_k h_kᵀ`` and
``g_b = Σ_k w_k r_k`` with residuals ``r_k = p_k − e_{y_k}``: per-example norms and class sums
need ``(r, h)`` only, never a V×d gradient per example (tested against autograd in
``tests/test_matching.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradmm.core.lm import LoadedModel
from gradmm.core.tokens import LabelTokens, label_hidden


@dataclass(frozen=True)
class GradientSpace:
    """The space output-layer gradients are released and matched in: a linear map
    ``(g_W, g_b) ↦ (A g_W Bᵀ, A g_b)`` that acts on the residuals and hidden states separately
    (``g_W = Σ r hᵀ`` becomes ``Σ (A r)(B h)ᵀ``), so the closed forms of this module hold with
    ``r ↦ A r`` and ``h ↦ B h`` and no V×d gradient is ever formed.

    * ``output`` (the paper's): ``A = I_V``, ``B = I_d``;
    * ``label-rows``: ``A`` selects the rows of the label words' tokens (``R``), ``B = I_d``;
    * ``sketch``: ``A`` (R × V) and ``B`` (R × d) with i.i.d. ``N(0, 1/R)`` entries from a public
      seed (norms are preserved in expectation, so a clip bound keeps its meaning).
    """

    kind: str
    rows: Tensor | None = None  # (R,) token ids (label-rows)
    a: Tensor | None = None  # (R, V) (sketch)
    b: Tensor | None = None  # (R, d) (sketch)

    @classmethod
    def of(
        cls,
        kind: str,
        label_ids: Sequence[Sequence[int]],
        vocab_rows: int,
        hidden: int,
        sketch_dim: int | None = None,
        sketch_seed: int = 0,
    ) -> GradientSpace:
        """The space of ``kind`` (``output``, ``last-block``: the identity)."""
        if kind == "label-rows":
            return cls(kind, rows=torch.tensor(sorted({t for word in label_ids for t in word})))
        if kind == "sketch":
            if sketch_dim is None:
                raise ValueError("a sketch needs its dimension")
            gen = torch.Generator().manual_seed(sketch_seed)
            scale = sketch_dim**-0.5
            a = torch.randn(sketch_dim, vocab_rows, generator=gen) * scale
            b = torch.randn(sketch_dim, hidden, generator=gen) * scale
            return cls(kind, a=a, b=b)
        return cls(kind)

    @property
    def identity(self) -> bool:
        return self.rows is None and self.a is None

    def shape(self, vocab_rows: int, hidden: int) -> tuple[int, int]:
        """(R1, R2) of the released weight gradient (the bias gradient has R1 entries)."""
        if self.rows is not None:
            return len(self.rows), hidden
        if self.a is not None:
            return self.a.shape[0], self.b.shape[0]
        return vocab_rows, hidden

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> GradientSpace:
        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device) if t.dtype == torch.long else t.to(device, dtype or t.dtype)

        return GradientSpace(self.kind, move(self.rows), move(self.a), move(self.b))

    def map_r(self, r: Tensor) -> Tensor:
        """(..., V) residuals -> (..., R1)."""
        if self.rows is not None:
            return r[..., self.rows]
        return r if self.a is None else r @ self.a.T.to(r.dtype)

    def map_h(self, h: Tensor) -> Tensor:
        """(..., d) hidden states -> (..., R2)."""
        return h if self.b is None else h @ self.b.T.to(h.dtype)

    def map_weight_grad(self, g: Tensor) -> Tensor:
        """(V, d) full weight gradient -> (R1, R2) (for autograd paths and tests)."""
        if self.rows is not None:
            return g[self.rows]
        return g if self.a is None else self.a.to(g.dtype) @ g @ self.b.T.to(g.dtype)

    def map_bias_grad(self, g: Tensor) -> Tensor:
        """(V,) full bias gradient -> (R1,)."""
        return self.map_r(g)


def residuals(logits: Tensor, label_ids: Tensor) -> Tensor:
    """(..., V) logits, (...) label token ids -> (..., V) ``r = softmax(logits) − onehot(y)``."""
    r = torch.softmax(logits, dim=-1)
    return r - torch.nn.functional.one_hot(label_ids, r.shape[-1]).to(r.dtype)


def per_example_grad_norms(r: Tensor, h: Tensor, weights: Tensor, has_bias: bool) -> Tensor:
    """(N, K, V) residuals, (N, K, d) hidden, (N, K) position weights -> (N,) joint norm of
    ``(g_W, g_b)``: ``sqrt(Σ_{k,k'} w_k w_k' (r_k·r_k') (h_k·h_k' + 1))`` (``+ 1`` with a bias)."""
    rw = r * weights[..., None].to(r.dtype)
    rr = rw @ rw.transpose(1, 2)  # (N, K, K)
    hh = h @ h.transpose(1, 2) + (1.0 if has_bias else 0.0)
    return (rr * hh).sum((1, 2)).sqrt()


def summed_grads(r: Tensor, h: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Σ_{i,k} w_ik r_ik h_ikᵀ and Σ_{i,k} w_ik r_ik from (N, K, V) residuals, (N, K, d) hidden
    and (N, K) weights (position weight × any per-example factor): ((V, d), (V,))."""
    rw = (r * weights[..., None].to(r.dtype)).flatten(0, 1)
    return rw.T @ h.flatten(0, 1), rw.sum(0)


def example_gradients(
    lm: LoadedModel,
    prompts: list[list[int]],
    classes: list[int],
    labels: LabelTokens,
    batch_size: int = 32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form inputs of per-example output-layer gradients.

    Each prompt is followed by its class's label word (teacher-forced) and right-padded (and
    masked): with causal attention the padding never influences a real position, so batching is
    exact. Returns (N, K, V) residuals ``r``, (N, K, d) hidden states ``h`` at the label
    positions and (N, K) position weights ``w``; the gradient of example ``i`` is
    ``(Σ_k w_ik r_ik h_ikᵀ, Σ_k w_ik r_ik)`` (see :mod:`gradmm.core.matching`).
    """
    rs, hs = [], []
    labels = labels.to(lm.device)
    for start in range(0, len(prompts), batch_size):
        cls = classes[start : start + batch_size]
        with torch.no_grad():
            h = label_hidden(lm, labels, prompts[start : start + batch_size], cls)  # (n, K, d)
        rs.append(residuals(lm.output.logits(h), labels.ids[cls]))
        hs.append(h)
    return torch.cat(rs), torch.cat(hs), labels.weights[classes]


def summed_autograd_grads(
    lm: LoadedModel,
    params: dict[str, Tensor],
    prompts: list[list[int]],
    classes: list[int],
    labels: LabelTokens,
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """Σ_i of the per-example gradients w.r.t. ``params``, one backward per batch.

    Inputs are detached embeddings (as for synthetic sequences): for a tied output layer only
    its output use is differentiated.
    """
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    labels = labels.to(lm.device)
    for p in params.values():
        p.requires_grad_(True)
    try:
        for start in range(0, len(prompts), batch_size):
            cls = classes[start : start + batch_size]
            h = label_hidden(
                lm, labels, prompts[start : start + batch_size], cls, detached_embeddings=True
            )
            logits = lm.output.logits(h)  # (n, K, V)
            ce = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.ids[cls].flatten(), reduction="none"
            )
            loss = (ce.reshape(len(cls), -1) * labels.weights[cls]).sum()
            for name, g in zip(
                params, torch.autograd.grad(loss, list(params.values())), strict=True
            ):
                sums[name] += g
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return sums


def zero_gradients(
    params: dict[str, Tensor], head: list[str], space: GradientSpace
) -> dict[str, Tensor]:
    """Zero sums in the released shapes: each matched parameter's own shape, or in a mapped
    ``space`` (R1, R2) for the output weight ``head[0]`` and (R1,) for its bias ``head[1]``."""
    if space.identity:
        return {name: torch.zeros(p.shape) for name, p in params.items()}
    r1, r2 = space.shape(*params[head[0]].shape)
    return dict(zip(head, [torch.zeros(r1, r2), torch.zeros(r1)], strict=False))
