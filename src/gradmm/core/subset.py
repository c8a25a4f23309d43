"""Gradient-matched subset selection: from a pool of texts of one class, the ``n`` whose mean
output-layer gradient best matches the class's released target, picked greedily.

Each text's gradient is ``g_i = Σ_k w_k r_ik h_ikᵀ`` (rank one per label position, see
:mod:`gradmm.core.matching`), so everything the greedy step needs is, in the release's space::

    t_i      = ⟨T, g_i⟩      = Σ_k w_k r_ikᵀ (T h_ik)
    M_ij     = ⟨g_i, g_j⟩    = Σ_{k,k'} w_k w_k' (r_ik·r_jk')(h_ik·h_jk')

and the loss of a set ``S`` is ``1 − cos(T, Σ_S g_i) = 1 − Σ_S t_i / (‖T‖ √(Σ_{S×S} M_ij))``
(averaged with the bias term's when the head has a bias): the same ``rec`` as
:class:`gradmm.core.matching.MatchingLoss` of the batch ``S`` (tested against it), from forward
passes only, with no V×d matrix. Adding ``j`` to ``S`` changes the sums by ``t_j`` and
``2 Σ_S M_ij + M_jj``: one greedy step costs O(pool).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradmm.core.gradients import residuals
from gradmm.core.matching import MatchingLoss


@dataclass
class PoolGradients:
    """The inner products of a pool's gradients with the target and with each other.

    ``target_dot``: (N,) ``t_i`` per term (weight, and bias if any) stacked as (T, N);
    ``gram``: (T, N, N) ``M_ij`` per term; ``target_norm``: (T,) ``‖T‖`` per term.
    """

    target_dot: Tensor
    gram: Tensor
    target_norm: Tensor

    def rec(self, chosen: list[int]) -> float:
        """``rec`` of the set ``chosen`` (a text may not appear twice)."""
        ix = torch.tensor(chosen)
        dot = self.target_dot[:, ix].sum(1)
        norm = self.gram[:, ix][:, :, ix].sum((1, 2)).sqrt()
        return float(1 - (dot / (self.target_norm * norm)).mean())


@torch.no_grad()
def pool_gradients(loss: MatchingLoss, h: Tensor, c: int) -> PoolGradients:
    """The :class:`PoolGradients` of texts of class ``c`` with hidden states ``h``: (N, K, d) at
    their label positions (:func:`gradmm.core.tokens.label_hidden`)."""
    n, k, dim = h.shape
    h = h.to(loss.tw.dtype)
    y = loss.labels.ids[c].expand(n, k)
    w = loss.labels.weights[c].to(h.dtype)  # (K,)
    r = loss.space.map_r(residuals(loss.output.logits(h), y)) * w[None, :, None]  # (N, K, R1)
    hm = loss.space.map_h(h)  # (N, K, R2)
    t_w = torch.einsum("nkr,nkr->n", r, hm @ loss.tw[c].T)
    rr = torch.einsum("ikr,jlr->ijkl", r, r) if k > 1 else (r[:, 0] @ r[:, 0].T)[..., None, None]
    hh = (
        torch.einsum("ikd,jld->ijkl", hm, hm) if k > 1 else (hm[:, 0] @ hm[:, 0].T)[..., None, None]
    )
    dots, grams, norms = [t_w], [(rr * hh).sum((2, 3))], [loss.tw_norm[c]]
    if loss.tb is not None:
        g_b = r.sum(1)  # (N, R1)
        dots.append(g_b @ loss.tb[c])
        grams.append(g_b @ g_b.T)
        norms.append(loss.tb_norm[c])
    return PoolGradients(torch.stack(dots), torch.stack(grams), torch.stack(norms))


def greedy_select(pool: PoolGradients, n: int, eligible: Tensor | None = None) -> list[int]:
    """Indices of ``n`` texts picked one at a time, each the one whose addition gives the lowest
    ``rec``; ``eligible`` (N,) bool leaves the others out. Ties go to the lower index."""
    size = pool.gram.shape[-1]
    eligible = torch.ones(size, dtype=torch.bool) if eligible is None else eligible.cpu().clone()
    if n > int(eligible.sum()):
        raise ValueError(f"{n} texts asked for, {int(eligible.sum())} eligible")
    diag = pool.gram.diagonal(dim1=1, dim2=2)  # (T, N)
    dot = torch.zeros_like(pool.target_norm)  # (T,) Σ_S t_i
    sq = torch.zeros_like(pool.target_norm)  # (T,) ‖Σ_S g_i‖²
    cross = torch.zeros_like(diag)  # (T, N) Σ_S M_ij
    chosen = []
    for _ in range(n):
        new_sq = sq[:, None] + 2 * cross + diag
        cos = (dot[:, None] + pool.target_dot) / (pool.target_norm[:, None] * new_sq.sqrt())
        rec = 1 - cos.mean(0)
        rec[~eligible] = float("inf")
        j = int(rec.argmin())
        chosen.append(j)
        eligible[j] = False
        dot, sq = dot + pool.target_dot[:, j], new_sq[:, j]
        cross += pool.gram[:, j]
    return chosen
