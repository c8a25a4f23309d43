"""Closed-form output-layer matching vs the authors' autograd computation, for label words of
one token and of several."""

import pytest
import torch
from conftest import build_model

from gradmm.core.gradients import GradientSpace, per_example_grad_norms, residuals, summed_grads
from gradmm.core.lm import matched_parameters, output_layer
from gradmm.core.matching import AutogradMatchingLoss, MatchingLoss
from gradmm.core.tokens import LabelTokens

# class 0: a one-token label word; class 1: a three-token one
WORDS = [[5], [7, 2, 9]]


def autograd_rec(model, prompts, word, tw, tb, score, space=None):
    """The authors' rec, for a label word of any length, written out with no padding: each
    (B, Lp, d) prompt continued by the embeddings of ``word[:-1]``; the loss is the batch mean of
    each sequence's summed (or mean) cross-entropy over the word's tokens; autograd.grad w.r.t.
    (W, b) with create_graph=True, mapped by ``space`` (explicitly: rows ``G[rows]``, sketch
    ``A G Bᵀ``), then cosine with the targets."""
    head = model.get_output_embeddings()
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    for p in params:
        p.requires_grad_(True)
    batch, n_prompt = prompts.shape[:2]
    feed = model.get_input_embeddings().weight[word[:-1]].detach()
    x = torch.cat([prompts, feed.expand(batch, -1, -1)], 1)
    logits = model(inputs_embeds=x).logits
    ce = 0
    for k, token in enumerate(word):  # position n_prompt - 1 + k predicts the k-th token
        ce = ce + torch.nn.functional.cross_entropy(
            logits[:, n_prompt - 1 + k], torch.full((batch,), token)
        ) / (len(word) if score == "mean" else 1)
    grads = torch.autograd.grad(ce, params, create_graph=True)
    for p in params:
        p.requires_grad_(False)
    if space is not None and space.rows is not None:
        grads = [g[space.rows] for g in grads]
    elif space is not None and space.a is not None:
        a, b = space.a.double(), space.b.double()
        grads = [a @ grads[0] @ b.T] + [a @ g for g in grads[1:]]
    targets = [tw] + ([tb] if tb is not None else [])
    cos = [
        torch.nn.functional.cosine_similarity(g.flatten(), t.flatten(), dim=0)
        for g, t in zip(grads, targets, strict=True)
    ]
    return torch.stack([1 - c for c in cos]).mean()


def with_feeds(model, prompts: torch.Tensor, labels: LabelTokens, classes) -> torch.Tensor:
    """(P, B, Lp, d) prompts -> (P, B, Lp + K - 1, d): each followed by its class's padded feed."""
    emb = model.get_input_embeddings().weight.detach()
    feeds = torch.stack([emb[labels.feed(c)] for c in classes.tolist()])  # (P, K - 1, d)
    return torch.cat([prompts, feeds[:, None].expand(-1, prompts.shape[1], -1, -1)], 2)


@pytest.mark.parametrize(
    "kind, score", [("gpt2", "sum"), ("llama", "mean"), ("phi", "sum"), ("phi", "mean")]
)
def test_closed_form_loss_and_x_gradient_equal_autograd(kind, score):
    model = build_model(kind, vocab=50).double()
    out = output_layer(model)
    gen = torch.Generator().manual_seed(0)
    vocab, dim = out.weight.shape
    tw = torch.randn(2, vocab, dim, generator=gen, dtype=torch.float64)
    tb = torch.randn(2, vocab, generator=gen, dtype=torch.float64) if out.bias is not None else None
    labels = LabelTokens.of(WORDS, score)
    loss = MatchingLoss(tw, tb, out, labels)
    classes = torch.tensor([1, 0])
    prompts = torch.randn(2, 3, 7, dim, generator=gen, dtype=torch.float64, requires_grad=True)

    ours = loss.rec(model, with_feeds(model, prompts, labels, classes), classes)
    (g_ours,) = torch.autograd.grad(ours.sum(), prompts)
    for p, c in enumerate(classes.tolist()):
        ref = autograd_rec(model, prompts[p], WORDS[c], tw[c], None if tb is None else tb[c], score)
        (g_ref,) = torch.autograd.grad(ref, prompts)
        torch.testing.assert_close(ours[p], ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_ours[p], g_ref[p], rtol=1e-8, atol=1e-12)
    assert out.tied == (kind == "gpt2")


def test_problems_are_scored_independently():
    model = build_model("phi", vocab=50).double()
    out = output_layer(model)
    gen = torch.Generator().manual_seed(1)
    tw = torch.randn(2, 50, 32, generator=gen, dtype=torch.float64)
    tb = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    loss = MatchingLoss(tw, tb, out, LabelTokens.of(WORDS))
    h = torch.randn(3, 4, 3, 32, generator=gen, dtype=torch.float64)
    classes = torch.tensor([0, 1, 1])
    together = loss(h, classes)
    alone = torch.cat([loss(h[p : p + 1], classes[p : p + 1]) for p in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)
    # a one-token word reads its first position only: the padding rows do not count
    h2 = h.clone()
    h2[:, :, 1:] = torch.randn(3, 4, 2, 32, generator=gen, dtype=torch.float64)
    assert torch.equal(loss(h2, classes)[0], together[0])
    assert not torch.isclose(loss(h2, classes)[1], together[1])


def test_per_example_norms_and_sums_equal_explicit_gradients():
    gen = torch.Generator().manual_seed(2)
    labels = LabelTokens.of(WORDS, "mean")
    classes = [0, 1, 1, 0, 1]
    h = torch.randn(5, 3, 8, generator=gen, dtype=torch.float64)
    logits = torch.randn(5, 3, 11, generator=gen, dtype=torch.float64)
    r = residuals(logits, labels.ids[classes])
    w = labels.weights[classes].double()
    explicit = []
    for i, c in enumerate(classes):  # Σ_k over the word's own tokens only
        k = len(WORDS[c])
        g_w = sum(torch.outer(r[i, j], h[i, j]) for j in range(k)) / k
        explicit.append((g_w, sum(r[i, j] for j in range(k)) / k))
    norms = per_example_grad_norms(r, h, w, has_bias=True)
    expected = [torch.cat([g_w.flatten(), g_b]).norm() for g_w, g_b in explicit]
    torch.testing.assert_close(norms, torch.stack(expected))
    no_bias = per_example_grad_norms(r, h, w, has_bias=False)
    torch.testing.assert_close(no_bias, torch.stack([g.norm() for g, _ in explicit]))
    clip = torch.rand(5, generator=gen, dtype=torch.float64)
    sw, sb = summed_grads(r, h, w * clip[:, None])
    torch.testing.assert_close(sw, sum(clip[i] * explicit[i][0] for i in range(5)))
    torch.testing.assert_close(sb, sum(clip[i] * explicit[i][1] for i in range(5)))


@pytest.mark.parametrize("kind", ["gpt2", "phi"])
def test_autograd_loss_on_output_params_equals_closed_form(kind):
    model = build_model(kind, vocab=50).double()
    out = output_layer(model)
    params = matched_parameters(model, "output")
    gen = torch.Generator().manual_seed(3)
    targets = {
        n: torch.randn(2, *p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()
    }
    names = list(params)
    labels = LabelTokens.of(WORDS, "mean")
    tb = targets[names[1]] if len(names) > 1 else None
    closed = MatchingLoss(targets[names[0]], tb, out, labels)
    auto = AutogradMatchingLoss(params, targets, labels)
    x = torch.randn(2, 3, 6, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    classes = torch.tensor([1, 0])
    a, b = closed.rec(model, x, classes), auto.rec(model, x, classes)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    ga, gb = (torch.autograd.grad(v.sum(), x)[0] for v in (a, b))
    torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-12)
    assert all(p.grad is None and not p.requires_grad for p in params.values())


def test_label_tokens_pad_and_feed():
    labels = LabelTokens.of(WORDS)
    assert labels.length == 3
    assert labels.feed(1) == [7, 2] and labels.feed(0) == [5, 0]  # then padding
    torch.testing.assert_close(labels.weights, torch.tensor([[1.0, 0, 0], [1.0] * 3]))  # sum
    mean = LabelTokens.of(WORDS, "mean").weights
    torch.testing.assert_close(mean, torch.tensor([[1.0, 0, 0], [1 / 3] * 3]))
    ids, mask, pos = labels.batch([[1, 2, 3], [4]], [1, 0])
    # the label word's k-th token is predicted at position len(prompt) - 1 + k
    assert ids[0].tolist() == [1, 2, 3, 7, 2] and pos[0].tolist() == [2, 3, 4]
    assert ids[1, :3].tolist() == [4, 5, 0] and pos[1].tolist() == [0, 1, 2]
    assert mask.sum(1).tolist() == [5, 3]


@pytest.mark.parametrize(
    "kind, space_kind",
    [("phi", "label-rows"), ("llama", "label-rows"), ("phi", "sketch"), ("gpt2", "sketch")],
)
def test_closed_form_in_a_released_space_equals_autograd(kind, space_kind):
    """The matched loss and its x-gradient in the label-rows and sketch spaces: closed form on
    (A r, B h) vs autograd's full gradient mapped explicitly, and the generic autograd loss."""
    model = build_model(kind, vocab=50).double()
    out = output_layer(model)
    vocab, dim = out.weight.shape
    space = GradientSpace.of(space_kind, WORDS, vocab, dim, sketch_dim=6, sketch_seed=4)
    r1, r2 = space.shape(vocab, dim)
    assert (r1, r2) == ((4, dim) if space_kind == "label-rows" else (6, 6))
    gen = torch.Generator().manual_seed(5)
    tw = torch.randn(2, r1, r2, generator=gen, dtype=torch.float64)
    tb = torch.randn(2, r1, generator=gen, dtype=torch.float64) if out.bias is not None else None
    labels = LabelTokens.of(WORDS, "sum")
    loss = MatchingLoss(tw, tb, out, labels, space)
    classes = torch.tensor([1, 0])
    prompts = torch.randn(2, 3, 5, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    x = with_feeds(model, prompts, labels, classes)
    ours = loss.rec(model, x, classes)
    (g_ours,) = torch.autograd.grad(ours.sum(), prompts)
    for p, c in enumerate(classes.tolist()):
        ref = autograd_rec(
            model, prompts[p], WORDS[c], tw[c], None if tb is None else tb[c], "sum", space
        )
        (g_ref,) = torch.autograd.grad(ref, prompts)
        torch.testing.assert_close(ours[p], ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_ours[p], g_ref[p], rtol=1e-8, atol=1e-12)
    params = matched_parameters(model, "output")
    names = list(params)
    targets = dict(zip(names, [tw] + ([tb] if tb is not None else []), strict=True))
    generic = AutogradMatchingLoss(
        params, targets, labels, space, (names[0], names[1] if len(names) > 1 else None)
    )
    torch.testing.assert_close(generic.rec(model, x, classes), ours, rtol=1e-10, atol=1e-12)


def test_sketch_is_public_seeded_and_norm_preserving():
    a = GradientSpace.of("sketch", WORDS, 500, 40, sketch_dim=64, sketch_seed=9)
    b = GradientSpace.of("sketch", WORDS, 500, 40, sketch_dim=64, sketch_seed=9)
    c = GradientSpace.of("sketch", WORDS, 500, 40, sketch_dim=64, sketch_seed=10)
    assert torch.equal(a.a, b.a) and torch.equal(a.b, b.b) and not torch.equal(a.a, c.a)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(500, 40, generator=gen)
    ratio = a.map_weight_grad(g).norm() / g.norm()  # E‖A G Bᵀ‖² = ‖G‖²
    assert 0.8 < float(ratio) < 1.2


def test_per_example_norms_in_a_space_equal_mapped_gradients():
    gen = torch.Generator().manual_seed(6)
    labels = LabelTokens.of(WORDS, "mean")
    classes = [0, 1, 1]
    h = torch.randn(3, 3, 8, generator=gen, dtype=torch.float64)
    logits = torch.randn(3, 3, 11, generator=gen, dtype=torch.float64)
    r = residuals(logits, labels.ids[classes])
    w = labels.weights[classes].double()
    for kind in ("label-rows", "sketch"):
        space = GradientSpace.of(kind, WORDS, 11, 8, sketch_dim=5, sketch_seed=1).to(
            "cpu", torch.float64
        )
        norms = per_example_grad_norms(space.map_r(r), space.map_h(h), w, has_bias=True)
        for i in range(3):
            g_w, g_b = summed_grads(r[i : i + 1], h[i : i + 1], w[i : i + 1])
            mapped = torch.cat([space.map_weight_grad(g_w).flatten(), space.map_bias_grad(g_b)])
            torch.testing.assert_close(norms[i], mapped.norm())
