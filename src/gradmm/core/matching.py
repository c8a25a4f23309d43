"""Closed-form output-layer gradients and the GRADMM matching loss.

For one sequence with final hidden states ``h_k ∈ R^d`` at its ``K`` label positions (one per
token of its label word, see :class:`LabelTokens`), probabilities ``p_k = softmax(W h_k + b)``,
label tokens ``y_k`` and position weights ``w_k`` (``1/K``: the loss is the mean cross-entropy
over the word's tokens), the gradient w.r.t. the output layer is ``g_W = Σ_k w_k r_k h_kᵀ`` and
``g_b = Σ_k w_k r_k`` with ``r_k = p_k − e_{y_k}``. For a batch of ``B`` sequences matched
together, ``G = (1/B) Σ_b g_b``; over its ``N = B·K`` rows ``n`` with weights ``a_n = w_n / B``::

    ⟨T_W, G_W⟩ = Σ_n a_n r_nᵀ (T_W h_n)
    ‖G_W‖²    = Σ_{n,n'} a_n a_n' (r_n·r_n') (h_n·h_n')

so the loss ``rec = mean over {W, b} of (1 − cos(T, G))`` is an ordinary function of ``(h, p)``:
one forward and one backward per step, no V×d synthetic gradient, no double backward.
The equivalence with autograd is tested in ``tests/test_matching.py``. :class:`AutogradMatchingLoss`
is the general (and the authors') computation: ``autograd.grad(..., create_graph=True)`` for any
set of parameters, then a second backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradmm.core.lm import OutputLayer, final_hidden, right_padded
from gradmm.data.tasks import LabelScore


@dataclass(frozen=True)
class LabelTokens:
    """Every class's label word as next-token targets, right-padded to the longest (``K`` tokens).

    A sequence of class ``c`` is followed by :meth:`feed` ``(c)``, its label word but the last
    token (teacher forcing), padded to ``K − 1`` ids. Its last ``K`` positions then predict
    ``ids[c]``, position ``k`` the word's ``k``-th token, and its loss is the cross-entropy of
    the word's ``K_c`` tokens, summed or (``score="mean"``) averaged: ``weights[c, k]`` is 1 or
    ``1/K_c``, and 0 at padding (causal attention: padding never changes an earlier position).
    With one-token label words (``K = 1``) both are the next-token loss at the last position.
    """

    ids: Tensor  # (C, K) label token ids, padded with 0
    weights: Tensor  # (C, K) 1 or 1/K_c at the class's label positions, 0 at padding

    @classmethod
    def of(cls, label_ids: Sequence[Sequence[int]], score: LabelScore = "sum") -> LabelTokens:
        """From the label words' token ids and score (``PromptTokens.label_ids/label_score``)."""
        length = max(map(len, label_ids))
        ids = torch.zeros(len(label_ids), length, dtype=torch.long)
        weights = torch.zeros(len(label_ids), length)
        for c, word in enumerate(label_ids):
            ids[c, : len(word)] = torch.tensor(list(word))
            weights[c, : len(word)] = 1.0 / len(word) if score == "mean" else 1.0
        return cls(ids, weights)

    @property
    def length(self) -> int:
        """``K``, the label positions of every sequence."""
        return self.ids.shape[1]

    def to(self, device: torch.device | str) -> LabelTokens:
        return LabelTokens(self.ids.to(device), self.weights.to(device))

    def feed(self, c: int) -> list[int]:
        """The ``K − 1`` ids that follow a sequence of class ``c``."""
        return self.ids[c, :-1].tolist()

    def batch(self, prompts: list[list[int]], classes: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Each prompt followed by its class's :meth:`feed`: (N, L) right-padded ids, (N, L)
        attention mask and (N, K) positions of the label tokens' predictions."""
        ids, mask, last = right_padded([p + self.feed(c) for p, c in zip(prompts, classes,
                                                                         strict=True)])  # fmt: skip
        return ids, mask, last[:, None] - (self.length - 1) + torch.arange(self.length)


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
    def of(cls, kind: str, label_ids: Sequence[Sequence[int]], vocab_rows: int, hidden: int,
           sketch_dim: int | None = None, sketch_seed: int = 0) -> GradientSpace:  # fmt: skip
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


class MatchingLoss:
    """``rec`` of batches of synthetic sequences against per-class targets.

    Args:
        target_weight: (C, R1, R2) per-class target gradient of the output weight in ``space``
            ((C, V, d) in the paper's space).
        target_bias: (C, R1) per-class target gradient of the bias, or None for bias-free heads.
        output: the model's output layer.
        labels: the label words (every sequence ends with its class's ``feed``).
        space: where the targets live (default: the full output layer).
    """

    def __init__(
        self,
        target_weight: Tensor,
        target_bias: Tensor | None,
        output: OutputLayer,
        labels: LabelTokens,
        space: GradientSpace | None = None,
    ):
        if (target_bias is None) != (output.bias is None):
            raise ValueError("target bias must be given exactly when the output layer has a bias")
        self.tw = target_weight
        self.tb = target_bias
        self.output = output
        self.labels = labels.to(target_weight.device)
        space = space or GradientSpace("output")
        self.space = space.to(target_weight.device, target_weight.dtype)
        self.tw_norm = target_weight.flatten(1).norm(dim=1)  # (C,)
        self.tb_norm = None if target_bias is None else target_bias.norm(dim=1)

    def rec(self, model, x: Tensor, classes: Tensor) -> Tensor:
        """(P, B, L, d) input embeddings -> (P,) ``rec`` (one forward through ``model``)."""
        n_problems, batch, length, dim = x.shape
        k = self.labels.length
        h = final_hidden(model, inputs_embeds=x.reshape(-1, length, dim))[:, -k:]
        return self(h.reshape(n_problems, batch, k, dim), classes)

    def __call__(self, h: Tensor, classes: Tensor) -> Tensor:
        """Matching loss per problem.

        Args:
            h: (P, B, K, d) final hidden states at the label positions of each sequence.
            classes: (P,) class index of each problem (selects the target and label word).
        Returns:
            (P,) ``rec`` in [0, 2].
        """
        n_problems, batch, k, dim = h.shape
        h = h.to(self.tw.dtype)  # the loss is fp32 whatever the model's dtype
        y = self.labels.ids[classes][:, None].expand(n_problems, batch, k)
        a = (self.labels.weights[classes].to(h.dtype) / batch)[:, None].expand(-1, batch, -1)
        r = residuals(self.output.logits(h), y).flatten(1, 2)  # (P, N, V), N = B·K rows
        r = self.space.map_r(r)  # (P, N, R1)
        ra = r * a.reshape(n_problems, -1, 1)
        h = self.space.map_h(h.reshape(n_problems, -1, dim))  # (P, N, R2)
        # ⟨T_W, G_W⟩: one (N, R2) x (R2, R1) product per problem, grouped by class.
        dot_w = torch.empty(n_problems, dtype=h.dtype, device=h.device)
        for c in classes.unique().tolist():
            sel = (classes == c).nonzero(as_tuple=True)[0]
            t_h = h[sel] @ self.tw[c].T  # (p, N, R1)
            dot_w[sel] = (ra[sel] * t_h).sum((1, 2))
        rr = ra @ ra.transpose(1, 2)  # (P, N, N)
        hh = h @ h.transpose(1, 2)
        g_w_norm = (rr * hh).sum((1, 2)).sqrt()
        cos_w = dot_w / (self.tw_norm[classes] * g_w_norm)
        if self.tb is None:
            return 1.0 - cos_w
        g_b = ra.sum(1)  # (P, R1)
        cos_b = (g_b * self.tb[classes]).sum(-1) / (self.tb_norm[classes] * g_b.norm(dim=-1))
        return 1.0 - 0.5 * (cos_w + cos_b)


class AutogradMatchingLoss:
    """``rec`` for any set of parameters, by differentiating the loss gradient (double backward).

    Args:
        params: the model's matched parameters by name (see ``models.matched_parameters``).
        targets: per-class target gradient of each, by the same names, shape (C, *param.shape),
            or, for the output layer's, (C, R1, R2) and (C, R1) in ``space``.
        labels: the label words (every sequence ends with its class's ``feed``).
        space: where the output layer's targets live (default: the full layer).
        output_names: names of the output layer's weight and bias (None: no bias) in ``params``,
            needed with a ``space`` other than the identity.
    """

    def __init__(
        self,
        params: dict[str, Tensor],
        targets: dict[str, Tensor],
        labels: LabelTokens,
        space: GradientSpace | None = None,
        output_names: tuple[str, str | None] | None = None,
    ):
        if params.keys() != targets.keys():
            raise ValueError("targets must cover exactly the matched parameters")
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        self.targets = [targets[n] for n in self.names]
        self.labels = labels.to(self.params[0].device)
        space = (space or GradientSpace("output")).to(self.params[0].device)
        weight, bias = output_names or (None, None)
        self.maps = [space.map_weight_grad if n == weight else
                     space.map_bias_grad if n == bias else (lambda g: g)
                     for n in self.names]  # fmt: skip

    def rec(self, model, x: Tensor, classes: Tensor) -> Tensor:
        """(P, B, L, d) input embeddings -> (P,) ``rec``; differentiable in ``x``."""
        n_problems, batch, length, dim = x.shape
        k = self.labels.length
        recs = []
        with torch.enable_grad():
            for p in self.params:
                p.requires_grad_(True)
            try:
                embeds = x.reshape(-1, length, dim).to(model.dtype)
                logits = model(inputs_embeds=embeds).logits[:, -k:].to(x.dtype)
                logits = logits.reshape(n_problems, batch, k, -1)
                for i in range(n_problems):
                    c = int(classes[i])
                    ce = torch.nn.functional.cross_entropy(
                        logits[i].flatten(0, 1), self.labels.ids[c].repeat(batch), reduction="none"
                    )  # (B·K,)
                    loss = (ce.reshape(batch, k) * self.labels.weights[c]).sum(1).mean()
                    grads = torch.autograd.grad(
                        loss,
                        self.params,
                        create_graph=x.requires_grad,
                        retain_graph=x.requires_grad or i + 1 < n_problems,  # shared forward
                    )
                    cos = [
                        torch.nn.functional.cosine_similarity(m(g).flatten(), t[c].flatten(), dim=0)
                        for g, t, m in zip(grads, self.targets, self.maps, strict=True)
                    ]
                    recs.append(1 - torch.stack(cos).mean())
            finally:
                for p in self.params:
                    p.requires_grad_(False)
        return torch.stack(recs)
