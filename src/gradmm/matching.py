"""Closed-form output-layer gradients and the GRADMM matching loss.

For one sequence with final hidden state ``h ∈ R^d`` (at the last position), probabilities
``p = softmax(W h + b)`` and label token ``y``, the cross-entropy gradient w.r.t. the output layer
is ``g_W = r hᵀ`` and ``g_b = r`` with ``r = p − e_y``. For a batch of ``B`` sequences matched
together, ``G = (1/B) Σ_b g_b`` and::

    ⟨T_W, G_W⟩ = (1/B) Σ_b r_bᵀ (T_W h_b)
    ‖G_W‖²    = (1/B²) Σ_{b,b'} (r_b·r_b') (h_b·h_b')

so the loss ``rec = mean over {W, b} of (1 − cos(T, G))`` is an ordinary function of ``(h, p)``:
one forward and one backward per step, no V×d synthetic gradient, no double backward.
The equivalence with autograd is tested in ``tests/test_matching.py``. :class:`AutogradMatchingLoss`
is the general (and the authors') computation: ``autograd.grad(..., create_graph=True)`` for any
set of parameters, then a second backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradmm.models import OutputLayer, final_hidden


def residuals(logits: Tensor, label_ids: Tensor) -> Tensor:
    """(..., V) logits, (...) label token ids -> (..., V) ``r = softmax(logits) − onehot(y)``."""
    r = torch.softmax(logits, dim=-1)
    return r - torch.nn.functional.one_hot(label_ids, r.shape[-1]).to(r.dtype)


def per_example_grad_norms(r: Tensor, h: Tensor, has_bias: bool) -> Tensor:
    """(N, V) residuals, (N, d) hidden -> (N,) joint norm of ``(g_W, g_b)``: ‖r‖·sqrt(‖h‖² + 1)."""
    hh = (h * h).sum(-1) + (1.0 if has_bias else 0.0)
    return r.norm(dim=-1) * hh.sqrt()


def summed_grads(r: Tensor, h: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Σ_i w_i g_i from (N, V) residuals and (N, d) hidden: ((V, d) ``Rᵀ diag(w) H``, (V,))."""
    if weights is not None:
        r = r * weights[:, None]
    return r.T @ h, r.sum(0)


class MatchingLoss:
    """``rec`` of batches of synthetic sequences against per-class targets.

    Args:
        target_weight: (C, V, d) per-class target gradient of the output weight.
        target_bias: (C, V) per-class target gradient of the bias, or None for bias-free heads.
        output: the model's output layer.
    """

    def __init__(self, target_weight: Tensor, target_bias: Tensor | None, output: OutputLayer):
        if (target_bias is None) != (output.bias is None):
            raise ValueError("target bias must be given exactly when the output layer has a bias")
        self.tw = target_weight
        self.tb = target_bias
        self.output = output
        self.tw_norm = target_weight.flatten(1).norm(dim=1)  # (C,)
        self.tb_norm = None if target_bias is None else target_bias.norm(dim=1)

    def rec(self, model, x: Tensor, classes: Tensor, label_ids: Tensor) -> Tensor:
        """(P, B, L, d) input embeddings -> (P,) ``rec`` (one forward through ``model``)."""
        n_problems, batch, length, dim = x.shape
        h = final_hidden(model, inputs_embeds=x.reshape(-1, length, dim))[:, -1]
        return self(h.reshape(n_problems, batch, dim), classes, label_ids)

    def __call__(self, h: Tensor, classes: Tensor, label_ids: Tensor) -> Tensor:
        """Matching loss per problem.

        Args:
            h: (P, B, d) final hidden states at the last position of each sequence.
            classes: (P,) class index of each problem (selects the target).
            label_ids: (P,) label token of each problem.
        Returns:
            (P,) ``rec`` in [0, 2].
        """
        n_problems, batch, _ = h.shape
        logits = self.output.logits(h)  # (P, B, V)
        r = residuals(logits, label_ids[:, None].expand(n_problems, batch))  # (P, B, V)
        # ⟨T_W, G_W⟩: one (B, d) x (d, V) product per problem, grouped by class.
        dot_w = torch.empty(n_problems, dtype=h.dtype, device=h.device)
        for c in classes.unique().tolist():
            sel = (classes == c).nonzero(as_tuple=True)[0]
            t_h = h[sel] @ self.tw[c].T  # (p, B, V)
            dot_w[sel] = (r[sel] * t_h).sum((1, 2)) / batch
        rr = r @ r.transpose(1, 2)  # (P, B, B)
        hh = h @ h.transpose(1, 2)
        g_w_norm = ((rr * hh).sum((1, 2))).sqrt() / batch
        cos_w = dot_w / (self.tw_norm[classes] * g_w_norm)
        if self.tb is None:
            return 1.0 - cos_w
        g_b = r.mean(1)  # (P, V)
        cos_b = (g_b * self.tb[classes]).sum(-1) / (self.tb_norm[classes] * g_b.norm(dim=-1))
        return 1.0 - 0.5 * (cos_w + cos_b)


class AutogradMatchingLoss:
    """``rec`` for any set of parameters, by differentiating the loss gradient (double backward).

    Args:
        params: the model's matched parameters by name (see ``models.matched_parameters``).
        targets: per-class target gradient of each, by the same names, shape (C, *param.shape).
    """

    def __init__(self, params: dict[str, Tensor], targets: dict[str, Tensor]):
        if params.keys() != targets.keys():
            raise ValueError("targets must cover exactly the matched parameters")
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        self.targets = [targets[n] for n in self.names]

    def rec(self, model, x: Tensor, classes: Tensor, label_ids: Tensor) -> Tensor:
        """(P, B, L, d) input embeddings -> (P,) ``rec``; differentiable in ``x``."""
        n_problems, batch, length, dim = x.shape
        recs = []
        with torch.enable_grad():
            for p in self.params:
                p.requires_grad_(True)
            try:
                logits = model(inputs_embeds=x.reshape(-1, length, dim)).logits[:, -1]
                logits = logits.reshape(n_problems, batch, -1)
                for i in range(n_problems):
                    ce = torch.nn.functional.cross_entropy(logits[i], label_ids[i].expand(batch))
                    grads = torch.autograd.grad(
                        ce,
                        self.params,
                        create_graph=x.requires_grad,
                        retain_graph=x.requires_grad or i + 1 < n_problems,  # shared forward
                    )
                    c = int(classes[i])
                    cos = [
                        torch.nn.functional.cosine_similarity(g.flatten(), t[c].flatten(), dim=0)
                        for g, t in zip(grads, self.targets, strict=True)
                    ]
                    recs.append(1 - torch.stack(cos).mean())
            finally:
                for p in self.params:
                    p.requires_grad_(False)
        return torch.stack(recs)
