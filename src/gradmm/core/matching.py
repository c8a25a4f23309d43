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

import torch
from torch import Tensor

from gradmm.core.gradients import GradientSpace, residuals
from gradmm.core.lm import OutputLayer, final_hidden
from gradmm.core.tokens import LabelTokens


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
        self.maps = [
            space.map_weight_grad
            if n == weight
            else space.map_bias_grad
            if n == bias
            else (lambda g: g)
            for n in self.names
        ]

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
