"""Gradient-matched subset selection: the Gram-matrix loss of a set equals MatchingLoss of that
batch, and every greedy pick is the one a brute-force search over the pool makes."""

import itertools

import pytest
import torch
from conftest import build_model

from gradmm.core.gradients import GradientSpace
from gradmm.core.lm import output_layer
from gradmm.core.matching import MatchingLoss
from gradmm.core.subset import greedy_select, pool_gradients
from gradmm.core.tokens import LabelTokens

WORDS = [[5], [7, 2, 9]]  # class 0: a one-token label word; class 1: three tokens


def setting(kind: str, space_kind: str, seed: int = 3):
    model = build_model(kind, vocab=50).double()
    out = output_layer(model)
    vocab, dim = out.weight.shape
    space = GradientSpace.of(space_kind, WORDS, vocab, dim, sketch_dim=6, sketch_seed=4)
    r1, r2 = space.shape(vocab, dim)
    gen = torch.Generator().manual_seed(seed)
    tw = torch.randn(2, r1, r2, generator=gen, dtype=torch.float64)
    tb = torch.randn(2, r1, generator=gen, dtype=torch.float64) if out.bias is not None else None
    loss = MatchingLoss(tw, tb, out, LabelTokens.of(WORDS, "mean"), space)
    h = torch.randn(7, 3, dim, generator=gen, dtype=torch.float64)  # a pool of 7, K = 3
    return loss, h


CASES = [("phi", "output"), ("llama", "output"), ("phi", "label-rows"), ("gpt2", "sketch")]


@pytest.mark.parametrize("kind, space_kind", CASES)
@pytest.mark.parametrize("c", [0, 1])
def test_set_loss_from_inner_products_equals_the_matching_loss(kind, space_kind, c):
    loss, h = setting(kind, space_kind)
    pool = pool_gradients(loss, h, c)
    for size in (1, 2, 4):
        for chosen in itertools.islice(itertools.combinations(range(7), size), 6):
            direct = loss(h[list(chosen)][None], torch.tensor([c]))[0]
            assert pool.rec(list(chosen)) == pytest.approx(float(direct), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind, space_kind", CASES)
def test_greedy_picks_what_brute_force_picks(kind, space_kind):
    """Each step adds the text whose addition a direct MatchingLoss over every candidate scores
    lowest; ineligible texts are never picked; one pick is the exhaustive optimum."""
    loss, h = setting(kind, space_kind)
    c = 1
    pool = pool_gradients(loss, h, c)
    eligible = torch.tensor([True, True, False, True, True, True, True])
    chosen = greedy_select(pool, 4, eligible)
    assert 2 not in chosen and len(set(chosen)) == 4
    for step in range(4):
        before = chosen[:step]
        options = [j for j in range(7) if eligible[j] and j not in before]
        scores = [float(loss(h[before + [j]][None], torch.tensor([c]))[0]) for j in options]
        assert chosen[step] == options[min(range(len(options)), key=scores.__getitem__)]
    with pytest.raises(ValueError):
        greedy_select(pool, 7, eligible)
