import json

import numpy as np
import pytest
import torch
from conftest import ARCHITECTURES

from gradmm.core.tokens import tokenize_prompt
from gradmm.data.pools import private_pool_exclusions, sample_per_class
from gradmm.data.tasks import BUILTIN_TASKS, load_examples
from gradmm.errors import UserError
from gradmm.models.loading import load_model
from gradmm.stages.configs import ReleaseConfig
from gradmm.stages.record import load_release
from gradmm.stages.release import release_targets


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_targets_equal_per_example_autograd_loop(kind, model_dirs, data_dir, tmp_path):
    cfg = ReleaseConfig(
        task="sst2",
        model=str(model_dirs[kind]),
        n_per_class=6,
        data_dir=str(data_dir),
        seed=3,
        batch_size=4,
    )
    rel = release_targets(cfg, tmp_path / "rel")

    # Oracle: one example at a time, no padding, autograd w.r.t. the output layer.
    lm = load_model(str(model_dirs[kind]))
    head = lm.model.get_output_embeddings()
    head.requires_grad_(True)
    task = BUILTIN_TASKS["sst2"]
    prompt = tokenize_prompt(task, lm.tokenizer)
    ex = load_examples(task, "train", data_dir)
    picked = sample_per_class(ex.labels, task.label_names, 6, 3, pool_exclusions(task, ex))
    for c, indices in enumerate(picked):
        gw = torch.zeros_like(head.weight)
        gb = None if head.bias is None else torch.zeros_like(head.bias)
        for i in indices:
            assert ex.labels[i] == c
            ids = torch.tensor([prompt.encode(lm.tokenizer, ex.texts[i])])
            # detached input embeddings: for a tied head only its output-layer use counts
            emb = lm.model.get_input_embeddings()(ids).detach()
            logits = lm.model(inputs_embeds=emb).logits[0, -1]
            ce = torch.nn.functional.cross_entropy(logits[None], torch.tensor(prompt.label_ids[c]))
            params = [head.weight] + ([head.bias] if head.bias is not None else [])
            grads = torch.autograd.grad(ce, params)
            gw += grads[0] / len(indices)
            if gb is not None:
                gb += grads[1] / len(indices)
        torch.testing.assert_close(rel.target_weight[c], gw, rtol=1e-4, atol=1e-6)
        if gb is not None:
            torch.testing.assert_close(rel.target_bias[c], gb, rtol=1e-4, atol=1e-6)
    assert (rel.target_bias is None) == (kind != "phi")  # phi: the only head with a bias


def test_release_files_hold_no_text_and_reload(model_dirs, data_dir, tmp_path):
    cfg = ReleaseConfig(
        task="sst2", model=str(model_dirs["llama"]), n_per_class=4, data_dir=str(data_dir)
    )
    rel = release_targets(cfg, tmp_path / "rel")
    raw = (tmp_path / "rel" / "release.json").read_text()
    ex = load_examples(BUILTIN_TASKS["sst2"], "train", data_dir)
    assert not any(text in raw for text in ex.texts)
    meta = json.loads(raw)
    assert meta["counts"] == [4, 4] and meta["mechanism"]["type"] == "none"
    again = load_release(tmp_path / "rel")
    torch.testing.assert_close(again.target_weight, rel.target_weight)
    assert again.task == BUILTIN_TASKS["sst2"]
    with pytest.raises(UserError, match="already holds a release"):
        release_targets(cfg, tmp_path / "rel")


def test_sampling_is_stratified_seeded_and_checked():
    labels = [0] * 10 + [1] * 3
    a = sample_per_class(labels, ("neg", "pos"), 3, seed=5)
    assert a == sample_per_class(labels, ("neg", "pos"), 3, seed=5)
    assert a != sample_per_class(labels, ("neg", "pos"), 3, seed=6)
    assert [sorted({labels[i] for i in ix}) for ix in a] == [[0], [1]]
    with pytest.raises(UserError, match=r"class 1 \('pos'\) has 3 examples"):
        sample_per_class(labels, ("neg", "pos"), 4, seed=0)


def test_text_longer_than_context_is_refused(model_dirs, tmp_path):
    from conftest import write_split

    long_text = " ".join(["the movie was great"] * 60)  # > 128 positions of the tiny model
    rows = [(f"fine film {i}", 1) for i in range(8)] + [(f"{long_text} {i}", 0) for i in range(8)]
    write_split(tmp_path / "sst2", "train", rows)  # half of them the dev slice
    cfg = ReleaseConfig(
        task="sst2", model=str(model_dirs["llama"]), n_per_class=1, data_dir=str(tmp_path)
    )
    with pytest.raises(UserError, match="longer than the model's context"):
        release_targets(cfg, tmp_path / "rel")
    assert not (tmp_path / "rel").exists()


def test_dp_release_cuts_texts_to_the_context_instead_of_stopping(
    model_dirs, tmp_path, monkeypatch
):
    """Whether a DP release stops must not depend on which rows it read: it cuts every text to
    the longest that fits, the same release (noise aside) as asking for that cut explicitly."""
    from conftest import write_split

    import gradmm.privacy.noise

    def no_noise(sizes, sigma, random_bytes):
        return [np.zeros(n) for n in sizes]

    monkeypatch.setattr(gradmm.privacy.noise, "gaussian_noise", no_noise)

    long_text = " ".join(["the movie was great"] * 60)  # > 128 positions of the tiny model
    rows = [(f"fine film {i}", 1) for i in range(8)] + [(f"{long_text} {i}", 0) for i in range(8)]
    write_split(tmp_path / "sst2", "train", rows)  # half of them the dev slice
    dp = dict(
        task="sst2",
        model=str(model_dirs["llama"]),
        n_per_class=1,
        data_dir=str(tmp_path),
        epsilon=1.0,
        delta=1e-5,
        noise_seed=3,
    )
    cut = release_targets(ReleaseConfig(**dp), tmp_path / "rel")
    fitting = cut.meta.task.max_text_tokens
    assert fitting is not None and fitting < 60 * 4
    explicit = release_targets(ReleaseConfig(**dp, max_text_tokens=fitting), tmp_path / "rel2")
    torch.testing.assert_close(cut.target_weight, explicit.target_weight)
    plain = {k: v for k, v in dp.items() if k not in ("epsilon", "delta", "noise_seed")}
    release_targets(ReleaseConfig(**plain, max_text_tokens=fitting), tmp_path / "rel3")
    with pytest.raises(UserError, match="longer than the model's context"):  # the longest cut
        release_targets(ReleaseConfig(**plain, max_text_tokens=fitting + 1), tmp_path / "rel4")


def test_model_without_linear_output_layer_is_refused():
    from gradmm.core.lm import output_layer

    class Encoder(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(UserError, match="no linear output layer"):
        output_layer(Encoder())


def test_last_block_targets_equal_per_example_loop(model_dirs, data_dir, tmp_path):
    from gradmm.core.lm import matched_parameters

    cfg = ReleaseConfig(
        task="sst2",
        model=str(model_dirs["phi"]),
        n_per_class=4,
        data_dir=str(data_dir),
        match_params="last-block",
        batch_size=3,
    )
    rel = release_targets(cfg, tmp_path / "rel")
    lm = load_model(str(model_dirs["phi"]))
    params = matched_parameters(lm.model, "last-block")
    assert list(rel.targets) == list(params) == rel.meta.parameters
    assert any(".layers.1." in n for n in params) and "lm_head.bias" in params
    task = BUILTIN_TASKS["sst2"]
    prompt = tokenize_prompt(task, lm.tokenizer)
    ex = load_examples(task, "train", data_dir)
    for p in params.values():
        p.requires_grad_(True)
    exclude = pool_exclusions(task, ex)
    for c, indices in enumerate(sample_per_class(ex.labels, task.label_names, 4, 0, exclude)):
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for i in indices:
            ids = torch.tensor([prompt.encode(lm.tokenizer, ex.texts[i])])
            logits = lm.model(inputs_embeds=lm.embeddings[ids].detach()).logits[0, -1]
            ce = torch.nn.functional.cross_entropy(logits[None], torch.tensor(prompt.label_ids[c]))
            for n, g in zip(params, torch.autograd.grad(ce, list(params.values())), strict=True):
                total[n] += g / len(indices)
        for n in params:
            torch.testing.assert_close(rel.targets[n][c], total[n], rtol=1e-4, atol=1e-6)
    # the output layer's part equals the closed form of an `output` release
    out = release_targets(cfg.model_copy(update={"match_params": "output"}), tmp_path / "out")
    torch.testing.assert_close(out.target_weight, rel.target_weight, rtol=1e-4, atol=1e-6)


def pool_exclusions(task, ex):
    return private_pool_exclusions(task, task.private_split, ex)


def test_private_pool_never_touches_the_dev_slice():
    from gradmm.data.tasks import Examples, dev_indices

    labels = [i % 2 for i in range(100)]
    dev = dev_indices(Examples([f"text {i}" for i in range(100)], labels, ""), 30)
    assert len(dev) == 30
    for seed in range(5):
        picked = sample_per_class(labels, ("a", "b"), 30, seed, exclude=dev)
        assert not set(sum(picked, [])) & set(dev)


def test_the_rows_a_pool_may_use_differ_by_one_row_between_neighbouring_splits():
    """A guarantee for the whole split (Poisson releases) needs the rows outside the dev slice of
    two splits that differ by one row to differ by one row too, wherever the rows sit."""
    from collections import Counter

    from gradmm.data.tasks import Examples, dev_indices

    def eligible(rows: list[tuple[str, int]]) -> Counter:
        dev = set(dev_indices(Examples([t for t, _ in rows], [y for _, y in rows], ""), 20))
        return Counter(r for i, r in enumerate(rows) if i not in dev)

    rows = [(f"review number {i}", i % 2) for i in range(40)] + [("a duplicate", 1)] * 3
    base = eligible(rows)
    assert sum(base.values()) == len(rows) - 20
    rng = np.random.default_rng(0)
    assert eligible([rows[i] for i in rng.permutation(len(rows))]) == base  # positions don't matter

    def rows_changed(other: Counter) -> int:
        return sum(((base - other) + (other - base)).values())

    for i in range(len(rows)):  # remove any one row
        assert rows_changed(eligible(rows[:i] + rows[i + 1 :])) == 1
    for row in [*rows, ("a new review", 0), ("a duplicate", 0)]:  # add a copy of any row, or a
        for at in (0, 20, len(rows)):  # new one, anywhere (the boundary's row among them)
            assert rows_changed(eligible(rows[:at] + [row] + rows[at:])) == 1
