"""Closed-form output-layer matching vs the authors' autograd computation."""

import pytest
import torch
from conftest import build_model

from gradmm.matching import MatchingLoss, per_example_grad_norms, residuals, summed_grads
from gradmm.models import final_hidden, output_layer


def autograd_rec(model, x, label, tw, tb):
    """The authors' rec: autograd.grad of the batch-mean CE w.r.t. (W, b), create_graph=True."""
    head = model.get_output_embeddings()
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    for p in params:
        p.requires_grad_(True)
    logits = model(inputs_embeds=x).logits[:, -1]
    ce = torch.nn.functional.cross_entropy(logits, torch.full((x.shape[0],), label))
    grads = torch.autograd.grad(ce, params, create_graph=True)
    targets = [tw] + ([tb] if tb is not None else [])
    cos = [
        torch.nn.functional.cosine_similarity(g.flatten(), t.flatten(), dim=0)
        for g, t in zip(grads, targets, strict=True)
    ]
    return torch.stack([1 - c for c in cos]).mean()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "phi"])
def test_closed_form_loss_and_x_gradient_equal_autograd(kind):
    model = build_model(kind, vocab=50).double()
    out = output_layer(model)
    gen = torch.Generator().manual_seed(0)
    vocab, dim = out.weight.shape
    tw = torch.randn(2, vocab, dim, generator=gen, dtype=torch.float64)
    tb = torch.randn(2, vocab, generator=gen, dtype=torch.float64) if out.bias is not None else None
    loss = MatchingLoss(tw, tb, out)
    x = torch.randn(3, 7, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    label, cls = 5, 1

    h = final_hidden(model, inputs_embeds=x)[:, -1]
    ours = loss(h[None], torch.tensor([cls]), torch.tensor([label]))[0]
    (g_ours,) = torch.autograd.grad(ours, x)
    ref = autograd_rec(model, x, label, tw[cls], None if tb is None else tb[cls])
    (g_ref,) = torch.autograd.grad(ref, x)
    assert out.tied == (kind == "gpt2")
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-12)


def test_problems_are_scored_independently():
    model = build_model("phi", vocab=50).double()
    out = output_layer(model)
    gen = torch.Generator().manual_seed(1)
    tw = torch.randn(2, 50, 32, generator=gen, dtype=torch.float64)
    tb = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    loss = MatchingLoss(tw, tb, out)
    h = torch.randn(3, 4, 32, generator=gen, dtype=torch.float64)
    classes, labels = torch.tensor([0, 1, 1]), torch.tensor([3, 4, 9])
    together = loss(h, classes, labels)
    alone = torch.cat([loss(h[p : p + 1], classes[p : p + 1], labels[p : p + 1]) for p in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


def test_per_example_norms_and_sums_equal_explicit_gradients():
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    logits = torch.randn(5, 11, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 3, 3, 10, 7])
    r = residuals(logits, y)
    explicit = [torch.cat([torch.outer(r[i], h[i]).flatten(), r[i]]) for i in range(5)]
    norms = per_example_grad_norms(r, h, has_bias=True)
    torch.testing.assert_close(norms, torch.stack([g.norm() for g in explicit]))
    w = torch.rand(5, generator=gen, dtype=torch.float64)
    sw, sb = summed_grads(r, h, w)
    torch.testing.assert_close(sw, sum(w[i] * torch.outer(r[i], h[i]) for i in range(5)))
    torch.testing.assert_close(sb, (w[:, None] * r).sum(0))


@pytest.mark.parametrize("kind", ["gpt2", "phi"])
def test_autograd_loss_on_output_params_equals_closed_form(kind):
    from gradmm.matching import AutogradMatchingLoss
    from gradmm.models import matched_parameters

    model = build_model(kind, vocab=50).double()
    out = output_layer(model)
    params = matched_parameters(model, "output")
    gen = torch.Generator().manual_seed(3)
    targets = {
        n: torch.randn(2, *p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()
    }
    names = list(params)
    closed = MatchingLoss(targets[names[0]], targets[names[1]] if len(names) > 1 else None, out)
    auto = AutogradMatchingLoss(params, targets)
    x = torch.randn(2, 3, 6, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    classes, labels = torch.tensor([1, 0]), torch.tensor([4, 7])
    a, b = closed.rec(model, x, classes, labels), auto.rec(model, x, classes, labels)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    ga, gb = (torch.autograd.grad(v.sum(), x)[0] for v in (a, b))
    torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-12)
    assert all(p.grad is None and not p.requires_grad for p in params.values())
