"""Label words of several tokens, on a tokenizer that splits " optimism", " anger" and " sadness":
every closed form against a computation written out one sequence at a time, and every built-in
task through every stage."""

import json
import random

import pytest
import torch
from conftest import NEGATIVE, POSITIVE, build_model, cli, sentence, write_split

from gradmm.core.gradients import example_gradients, per_example_grad_norms
from gradmm.core.lm import final_hidden
from gradmm.core.matching import MatchingLoss
from gradmm.core.tokens import LabelTokens, tokenize_prompt
from gradmm.data.pools import private_pool_exclusions, sample_per_class
from gradmm.data.tasks import BUILTIN_TASKS, load_examples
from gradmm.models.loading import load_model
from gradmm.stages.configs import GenerateConfig, ReleaseConfig
from gradmm.stages.evaluate import label_log_probs
from gradmm.stages.filtering import per_example_rec
from gradmm.stages.generate import build_solver
from gradmm.stages.record import load_release_model
from gradmm.stages.release import release_targets

EMOTION_WORDS = {"anger": NEGATIVE, "joy": POSITIVE, "optimism": POSITIVE, "sadness": NEGATIVE}


@pytest.fixture(scope="module")
def split_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny Llama (untied) and Phi (output bias) models whose tokenizer never saw the emotion
    words: a sentiment-only corpus, 300 merges."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    lines = [sentence(rng, POSITIVE + NEGATIVE) + " It was great" for _ in range(300)]
    lines += [sentence(rng, NEGATIVE) + " It was bad" for _ in range(300)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=300, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    for word in (" optimism", " anger", " sadness", " joy"):
        assert len(tok(word, add_special_tokens=False).input_ids) > 1, word
    dirs = {}
    for kind in ("llama", "phi"):
        path = tmp_path_factory.mktemp(f"split-{kind}")
        build_model(kind, len(tok)).save_pretrained(path)
        tok.save_pretrained(path)
        dirs[kind] = str(path)
    return dirs


@pytest.fixture(scope="module")
def tasks_data(tmp_path_factory) -> str:
    """Every built-in task's private and test splits, laid out like shared/data."""
    root = tmp_path_factory.mktemp("tasks-data")
    rng = random.Random(2)
    for task in BUILTIN_TASKS.values():
        words = list(EMOTION_WORDS.values()) if task.num_classes == 4 else [NEGATIVE, POSITIVE]
        for split in (task.private_split, task.test_split):
            # 20 per class: the dev slice (half of a small split, by hash) leaves each class 4+
            rows = [(sentence(rng, w), c) for c, w in enumerate(words) for _ in range(20)]
            write_split(root / task.local_dir, split, rows)
        (root / task.local_dir / "labels.json").write_text(json.dumps(list(task.label_names)))
    return str(root)


def word_log_probs(lm, ids: list[int], word: list[int]) -> torch.Tensor:
    """Log-probabilities of ``word``'s tokens after ``ids``: one unpadded sequence, each token
    read at its own position."""
    logits = lm.model(input_ids=torch.tensor([ids + word])).logits[0]
    logp = torch.log_softmax(logits, -1)
    return torch.stack([logp[len(ids) - 1 + k, t] for k, t in enumerate(word)])


@pytest.mark.parametrize("kind, score", [("llama", "sum"), ("llama", "mean"), ("phi", "mean")])
def test_class_scores_are_whole_word_log_probs(split_dirs, kind, score):
    """Batched, padded, the demonstrations run once and cached, the output layer applied at the
    scored positions only: equal to the model's own logits on each unpadded sequence."""
    lm = load_model(split_dirs[kind])
    task = BUILTIN_TASKS["tweet_emotion"].model_copy(update={"label_score": score})
    prompt = tokenize_prompt(task, lm.tokenizer)
    assert sorted(map(len, prompt.label_ids))[-1] > 1
    texts = ["the movie was sad", "a great plot", "this cast is bright and funny indeed"]
    prefix = prompt.demonstrations(lm.tokenizer, list(task.demonstrations))
    with torch.no_grad():
        batched = label_log_probs(lm, prompt, texts, prefix, batch_size=2)
        for i, text in enumerate(texts):
            ids = prefix + prompt.encode(lm.tokenizer, text)
            for c, word in enumerate(prompt.label_ids):
                per_token = word_log_probs(lm, ids, word)
                expected = per_token.mean() if score == "mean" else per_token.sum()
                torch.testing.assert_close(batched[i, c], expected, rtol=1e-4, atol=1e-5)
    # demonstrations carry the whole label word
    word = prompt.label_ids[2]
    assert prompt.demonstrations(lm.tokenizer, [("x", 2)])[-len(word) - 1 : -1] == word


@pytest.mark.parametrize("kind, method", [("phi", "lora"), ("phi", "full"), ("gpt2", "full")])
def test_class_scores_and_their_gradients_equal_the_models_own(model_dirs, kind, method):
    """Fine-tuning's loss: the decoder (under the PEFT wrapper, LoRA layers included) and the
    output layer applied outside it give the model's own scores and gradients, for LoRA and for
    every parameter of full fine-tuning, the output layer's included (Phi: untied with a bias;
    GPT-2: tied to the input embeddings)."""
    from peft import LoraConfig, get_peft_model

    lm = load_model(str(model_dirs[kind]))
    if method == "lora":
        lm.model = get_peft_model(lm.model, LoraConfig(r=2, target_modules="all-linear"))
        torch.manual_seed(0)
        trained = [p for name, p in lm.model.named_parameters() if "lora_" in name]
        for p in trained:  # B starts at zero, which would make the adapters invisible
            torch.nn.init.normal_(p, std=0.3)
    else:
        trained = list(lm.model.requires_grad_(True).parameters())
        assert any(p is lm.output.weight for p in trained)
    prompt = tokenize_prompt(BUILTIN_TASKS["sst2"], lm.tokenizer)
    texts = ["the movie was sad", "a great plot and a bright cast"]
    scores = label_log_probs(lm, prompt, texts)
    reduce = torch.mean if prompt.label_score == "mean" else torch.sum
    expected = torch.stack(
        [
            torch.stack(
                [
                    reduce(word_log_probs(lm, prompt.encode(lm.tokenizer, t), w))
                    for w in prompt.label_ids
                ]
            )
            for t in texts
        ]
    )
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(scores[:, 1].sum(), trained)
    oracle = torch.autograd.grad(expected[:, 1].sum(), trained)
    for g, o in zip(grads, oracle, strict=True):
        torch.testing.assert_close(g, o, rtol=1e-4, atol=1e-6)
    moved = [bool(g.abs().sum() > 0) for g in grads]
    head = [p is lm.output.weight for p in trained]
    assert all(moved) if method == "lora" else moved[head.index(True)]


def test_release_targets_and_norms_equal_a_per_example_autograd_loop(
    split_dirs, tasks_data, tmp_path
):
    cfg = ReleaseConfig(
        task="tweet_emotion",
        model=split_dirs["phi"],
        n_per_class=4,
        data_dir=tasks_data,
        batch_size=3,
    )
    rel = release_targets(cfg, tmp_path / "rel")
    lm = load_model(split_dirs["phi"])
    task = BUILTIN_TASKS["tweet_emotion"]
    prompt = tokenize_prompt(task, lm.tokenizer)
    assert rel.prompt.label_ids == prompt.label_ids
    ex = load_examples(task, "train", tasks_data)
    exclude = private_pool_exclusions(task, "train", ex)
    head = lm.model.get_output_embeddings().requires_grad_(True)
    labels = LabelTokens.of(prompt.label_ids, prompt.label_score)
    for c, ix in enumerate(sample_per_class(ex.labels, task.label_names, 4, 0, exclude)):
        word = prompt.label_ids[c]
        gw, gb, norms = 0, 0, []
        for i in ix:  # oracle: the unpadded sequence, summed CE of the word's tokens, autograd
            seq = prompt.encode(lm.tokenizer, ex.texts[i])
            emb = lm.embeddings[torch.tensor([seq + word[:-1]])].detach()
            logits = lm.model(inputs_embeds=emb).logits[0, len(seq) - 1 :]
            ce = torch.nn.functional.cross_entropy(logits, torch.tensor(word), reduction="sum")
            w_i, b_i = torch.autograd.grad(ce, [head.weight, head.bias])
            gw, gb = gw + w_i / len(ix), gb + b_i / len(ix)
            norms.append(torch.cat([w_i.flatten(), b_i]).norm())
        torch.testing.assert_close(rel.target_weight[c], gw, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(rel.target_bias[c], gb, rtol=1e-4, atol=1e-6)
        seqs = [prompt.encode(lm.tokenizer, ex.texts[i]) for i in ix]
        r, h, w = example_gradients(lm, seqs, [c] * len(ix), labels, batch_size=3)
        ours = per_example_grad_norms(r, h, w, has_bias=True)
        torch.testing.assert_close(ours, torch.stack(norms), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("space", ["label-rows", "sketch"])
def test_mapped_release_clips_and_sums_in_its_space(
    space, split_dirs, tasks_data, tmp_path, monkeypatch
):
    """A label-rows or sketch release (DP with a tiny σ, clip binding for some examples): each
    class's target equals the oracle loop's per-example autograd gradients mapped into the space
    (``G[rows]`` / ``A G Bᵀ``), clipped by their norm there, averaged. (ε = 10⁶ makes the noise
    negligible: the test lifts the bound on ε, a policy, to check the maths.)"""
    import gradmm.privacy.accounting

    monkeypatch.setattr(gradmm.privacy.accounting, "MAX_EPSILON", 1e7)
    sketch = {"sketch_dim": 6, "sketch_seed": 3} if space == "sketch" else {}
    cfg = ReleaseConfig(
        task="tweet_emotion",
        model=split_dirs["phi"],
        n_per_class=4,
        data_dir=tasks_data,
        match_params=space,
        epsilon=1e6,
        delta=1e-5,
        clip=0.05,
        noise_seed=1,
        **sketch,
    )
    rel = release_targets(cfg, tmp_path / "rel")
    mapped = rel.space
    lm = load_release_model(rel)
    task = BUILTIN_TASKS["tweet_emotion"]
    prompt = rel.prompt
    ex = load_examples(task, "train", tasks_data)
    exclude = private_pool_exclusions(task, "train", ex)
    head = lm.model.get_output_embeddings().requires_grad_(True)
    rows = sorted({t for word in prompt.label_ids for t in word})
    clipped = 0
    for c, ix in enumerate(sample_per_class(ex.labels, task.label_names, 4, 0, exclude)):
        word = prompt.label_ids[c]
        gw, gb = 0, 0
        for i in ix:
            seq = prompt.encode(lm.tokenizer, ex.texts[i])
            emb = lm.embeddings[torch.tensor([seq + word[:-1]])].detach()
            logits = lm.model(inputs_embeds=emb).logits[0, len(seq) - 1 :]
            ce = torch.nn.functional.cross_entropy(logits, torch.tensor(word), reduction="sum")
            w_i, b_i = torch.autograd.grad(ce, [head.weight, head.bias])
            if space == "label-rows":
                w_i, b_i = w_i[rows], b_i[rows]
            else:
                w_i, b_i = mapped.a @ w_i @ mapped.b.T, mapped.a @ b_i
            norm = torch.cat([w_i.flatten(), b_i]).norm()
            scale = min(1.0, 0.05 / float(norm))
            clipped += scale < 1
            gw, gb = gw + scale * w_i / len(ix), gb + scale * b_i / len(ix)
        assert rel.target_weight[c].shape == gw.shape
        noise = 6 * rel.meta.mechanism.sigma_target  # ~2e-5, against entries of ~2e-3
        torch.testing.assert_close(rel.target_weight[c], gw, rtol=0, atol=noise)
        torch.testing.assert_close(rel.target_bias[c], gb, rtol=0, atol=noise)
    assert 0 < clipped
    assert ("label words' tokens" if space == "label-rows" else "sketched") in rel.meta.description


@pytest.mark.parametrize("space", ["output", "label-rows", "sketch"])
def test_solver_and_filter_losses_equal_the_release_path(space, split_dirs, tasks_data, tmp_path):
    sketch = {"sketch_dim": 5} if space == "sketch" else {}
    cfg = ReleaseConfig(
        task="tweet_emotion",
        model=split_dirs["llama"],
        n_per_class=3,
        data_dir=tasks_data,
        match_params=space,
        **sketch,
    )
    rel = release_targets(cfg, tmp_path / "rel")
    lm = load_release_model(rel)
    options = {
        "per_class": 2,
        "batch": 2,
        "length": 4,
        "steps": 1,
        "inner_steps": 2,
        "init_candidates": 3,
        "topk": 5,
    }
    solver, problems, _ = build_solver(lm, rel, GenerateConfig(**options))
    labels = LabelTokens.of(rel.prompt.label_ids, rel.prompt.label_score)
    loss = MatchingLoss(rel.target_weight, rel.target_bias, lm.output, labels, rel.space)
    free = torch.randint(
        3, len(lm.tokenizer), (len(problems), 2, 4), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        via_layout = solver.rec(solver.embed(free, problems), problems)
        # the reference engine's loss (autograd, the gradient mapped explicitly) agrees
        authors, _, _ = build_solver(lm, rel, GenerateConfig(**{**options, "engine": "reference"}))
        torch.testing.assert_close(
            authors.rec(authors.embed(free, problems), problems), via_layout, rtol=1e-4, atol=1e-6
        )
        for p, c in enumerate(problems.classes.tolist()):
            # the same sequences built as the release builds real ones (prompt + feed, padded)
            prompts = [rel.prompt.head + s.tolist() + rel.prompt.tail for s in free[p]]
            ids, mask, pos = labels.batch(prompts, [c, c])
            h = final_hidden(lm.model, input_ids=ids, attention_mask=mask)[
                torch.arange(2)[:, None], pos
            ]
            torch.testing.assert_close(via_layout[p], loss(h[None], torch.tensor([c]))[0])
    # problems of label words of different lengths, solved together and one at a time
    together = solver.solve(problems, progress=False)
    for p in range(len(problems)):
        alone = solver.solve(problems[p : p + 1], progress=False)
        assert torch.equal(alone.ids[0], together.ids[p])
    # filter: each text alone, a batch of one
    texts = ["the film was sad", "so happy today"]
    ours = per_example_rec(lm, rel, texts, [3, 2])
    for i, (text, c) in enumerate(zip(texts, [3, 2], strict=True)):
        seq = rel.prompt.encode(lm.tokenizer, text) + labels.feed(c)
        x = lm.embeddings[torch.tensor(seq)][None, None]
        torch.testing.assert_close(
            ours[i], loss.rec(lm.model, x, torch.tensor([c]))[0], rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("task", sorted(BUILTIN_TASKS))
def test_every_builtin_task_runs_on_a_tokenizer_that_splits_label_words(
    task, split_dirs, tasks_data, tmp_path
):
    model, rel, run = split_dirs["llama"], tmp_path / "rel", tmp_path / "run"
    r = cli(
        "release",
        "--task",
        task,
        "--model",
        model,
        "--data-dir",
        tasks_data,
        "--out",
        rel,
        "--n-per-class",
        3,
    )
    assert r.exit_code == 0, r.output
    label_ids = json.loads((rel / "release.json").read_text())["prompt_tokens"]["label_ids"]
    assert (max(map(len, label_ids)) > 1) == (task == "tweet_emotion")
    r = cli(
        "generate",
        "--release",
        rel,
        "--out",
        run,
        "--per-class",
        2,
        "--batch",
        2,
        "--length",
        4,
        "--steps",
        1,
        "--inner-steps",
        1,
        "--init-candidates",
        2,
        "--topk",
        5,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    r = cli("filter", run, "--keep-per-class", 2)
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (run / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * BUILTIN_TASKS[task].num_classes
    r = cli(
        "finetune",
        "--model",
        model,
        "--task",
        task,
        "--train",
        run / "synthetic.jsonl",
        "--data-dir",
        tasks_data,
        "--out",
        tmp_path / "ft",
        "--steps",
        2,
        "--batch-size",
        4,
        "--eval-every",
        1,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert all(loss > 0 for loss in result["train_loss"])
    r = cli(
        "evaluate",
        "--model",
        model,
        "--task",
        task,
        "--data-dir",
        tasks_data,
        "--few-shot",
        1,
        "--out",
        tmp_path / "eval.json",
    )
    assert r.exit_code == 0, r.output
