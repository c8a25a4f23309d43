"""Fine-tuning and evaluation: learning a separable task, class prior of a constant model, dev-only
selection, LoRA leaves the base weights alone, k-shot prompts."""

import json
import warnings

import pytest
import torch

from gradmm.core.tokens import tokenize_prompt
from gradmm.data.tasks import BUILTIN_TASKS, dev_indices, load_examples
from gradmm.models.loading import load_model
from gradmm.stages.configs import FinetuneConfig
from gradmm.stages.evaluate import accuracy, demonstrations, eval_sets
from gradmm.stages.finetune import finetune

TASK = BUILTIN_TASKS["sst2"]


@pytest.fixture()
def train_file(data_dir, tmp_path):
    """The training split minus its dev slice, as a JSONL training file."""
    ex = load_examples(TASK, "train", data_dir)
    dev = set(dev_indices(ex, TASK.dev_size))
    path = tmp_path / "train.jsonl"
    path.write_text(
        "".join(
            json.dumps({"text": t, "label": y}) + "\n"
            for i, (t, y) in enumerate(zip(ex.texts, ex.labels, strict=True))
            if i not in dev
        )
    )
    return path


def test_finetuning_learns_a_separable_task(model_dirs, data_dir, train_file, tmp_path):
    cfg = FinetuneConfig(
        model=str(model_dirs["llama"]),
        task="sst2",
        train=str(train_file),
        data_dir=str(data_dir),
        lr=3e-3,
        steps=40,
        batch_size=8,
        eval_every=10,
        save_model=True,
    )
    result = finetune(cfg, tmp_path / "ft", progress=False)
    history = result["history"]
    task = TASK
    dev, test = eval_sets(task, str(data_dir), None, 0)

    def score(model_dir, examples) -> float:
        lm = load_model(str(model_dir))
        prompt = tokenize_prompt(task, lm.tokenizer)
        return accuracy(lm, prompt, examples, task.label_names)["accuracy"]

    assert history[0]["step"] == 0 and result["test_accuracy"] >= 0.9
    assert result["test_accuracy"] > score(model_dirs["llama"], test)
    best = max(history, key=lambda r: (r["dev"]["accuracy"], -r["step"]))
    assert result["selected_step"] == best["step"]
    # the reported figures are the saved (dev-selected) weights', scored independently
    saved = tmp_path / "ft" / "model"
    assert result["dev_accuracy"] == score(saved, dev)
    assert result["test_accuracy"] == score(saved, test)
    assert (
        json.loads((tmp_path / "ft" / "results.json").read_text())["selected_step"] == best["step"]
    )


def test_lora_trains_adapters_only(model_dirs, data_dir, train_file, monkeypatch):
    """The model in memory after LoRA training: adapters moved, base weights exactly as loaded."""
    import gradmm.stages.finetune as finetune_module

    loaded = []

    def load_and_keep(name):
        loaded.append(load_model(name))
        return loaded[-1]

    monkeypatch.setattr(finetune_module, "load_model", load_and_keep)
    before = {
        k: v.clone() for k, v in load_model(str(model_dirs["llama"])).model.state_dict().items()
    }
    cfg = FinetuneConfig(
        model=str(model_dirs["llama"]),
        task="sst2",
        train=str(train_file),
        data_dir=str(data_dir),
        method="lora",
        lr=1e-2,
        steps=5,
        selection="last",  # the trained adapters stay in the model
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune(cfg, progress=False)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]  # peft's, silenced
    peft_model = loaded[0].model
    adapters = [v for k, v in peft_model.named_parameters() if "lora_B" in k]
    assert adapters and any(v.abs().max() > 0 for v in adapters)  # B starts at zero
    after = peft_model.unload().state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_constant_model_scores_the_class_prior(model_dirs, data_dir):
    lm = load_model(str(model_dirs["phi"]))
    prompt = tokenize_prompt(TASK, lm.tokenizer)
    head = lm.model.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[prompt.label_ids[1]] = 10.0  # always " great" (one token)
    test = load_examples(TASK, "validation", data_dir)
    result = accuracy(lm, prompt, test, TASK.label_names)
    assert result["accuracy"] == pytest.approx(sum(test.labels) / len(test.labels))
    assert result["per_class_accuracy"] == {"negative": 0.0, "positive": 1.0}


def test_k_shot_prompt_has_k_demonstrations_per_class(model_dirs, data_dir):
    """k dev examples per class, none from test; accuracy reads the test texts after them."""
    lm = load_model(str(model_dirs["llama"]))
    prompt = tokenize_prompt(TASK, lm.tokenizer)
    dev, test = eval_sets(TASK, str(data_dir), None, 0)
    ids = demonstrations(lm, prompt, dev, 2, seed=0)
    text = lm.tokenizer.decode(ids)
    assert text.count(" It was bad\n") == 2 and text.count(" It was great\n") == 2
    assert sum(t in text for t in dev.texts) == 4 and not any(t in text for t in test.texts)
    with_demos = accuracy(lm, prompt, test, TASK.label_names, prefix=ids)
    # the same predictions, one text at a time with the demonstrations written in front of it
    right = 0
    for text, label in zip(test.texts, test.labels, strict=True):
        feed = ids + prompt.encode(lm.tokenizer, text)
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([feed])).logits[0, -1]
        words = [word[0] for word in prompt.label_ids]  # sst2's label words are one token each
        right += int(logits[words].argmax()) == label
    assert with_demos["accuracy"] == pytest.approx(right / len(test.texts))
    assert with_demos != accuracy(lm, prompt, test, TASK.label_names)  # the prefix matters


def flipped_train_file(train_file, tmp_path):
    """The training file with every label flipped: training makes the model worse on dev."""
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    path = tmp_path / "flipped.jsonl"
    path.write_text("".join(json.dumps({**r, "label": 1 - r["label"]}) + "\n" for r in rows))
    return path


def test_selected_weights_are_restored_under_python_O(model_dirs, data_dir, train_file, tmp_path):
    """Training on flipped labels: dev keeps step 0, so the test score must be the untrained
    model's. Run under `python -O`, where an assert (and anything inside it) is skipped."""
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from gradmm.stages.finetune import FinetuneConfig, finetune\n"
        "cfg = FinetuneConfig(model=sys.argv[1], task='sst2', train=sys.argv[2],\n"
        "    data_dir=sys.argv[3], lr=3e-3, steps=30, batch_size=8, eval_every=10)\n"
        "r = finetune(cfg, progress=False)\n"
        "print(json.dumps([r['selected_step'], r['test_accuracy']]))\n"
    )
    flipped = flipped_train_file(train_file, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-O", "-c", script, str(model_dirs["llama"]), str(flipped), str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    step, test_accuracy = json.loads(proc.stdout.strip().splitlines()[-1])
    lm = load_model(str(model_dirs["llama"]))
    untrained = accuracy(
        lm,
        tokenize_prompt(TASK, lm.tokenizer),
        eval_sets(TASK, str(data_dir), None, 0)[1],
        TASK.label_names,
    )
    assert step == 0 and test_accuracy == untrained["accuracy"]


def test_selections_that_read_no_private_data(
    model_dirs, data_dir, train_file, tmp_path, monkeypatch
):
    import gradmm.stages.evaluate
    import gradmm.stages.finetune

    base = dict(
        model=str(model_dirs["llama"]),
        task="sst2",
        train=str(train_file),
        data_dir=str(data_dir),
        lr=3e-3,
        steps=6,
        batch_size=8,
        eval_every=3,
    )
    result = finetune(FinetuneConfig(**base), progress=False)
    (entry,) = [d for d in result["data_read"] if "dev slice" in d["data"]]
    assert entry["private"] and not entry["covered_by_dp"]

    real_load = gradmm.stages.evaluate.load_examples

    def public_only(task, split, data_dir=None):
        if split == task.private_split:
            raise AssertionError("the private split was read")
        return real_load(task, split, data_dir)

    monkeypatch.setattr(gradmm.stages.evaluate, "load_examples", public_only)
    last = finetune(FinetuneConfig(**base, selection="last"), progress=False)
    assert last["selected_step"] == 6 and last["dev_accuracy"] is None
    assert not any(d.get("private") is True for d in last["data_read"])
    dev = tmp_path / "public_dev.jsonl"
    dev.write_text(
        '{"text": "the film was great", "label": 1}\n{"text": "the plot was dull", "label": 0}\n'
    )
    chosen = finetune(FinetuneConfig(**base, dev_file=str(dev)), progress=False)
    assert chosen["dev_examples"] == 2 and chosen["history"][0]["dev"]["n"] == 2
    assert any("public dev file" in d["data"] for d in chosen["data_read"])
    assert gradmm.stages.finetune.dev_set is gradmm.stages.evaluate.dev_set  # one dev set


def test_untrained_dev_accuracy_is_computed_once(model_dirs, data_dir, train_file, monkeypatch):
    """Step 0 is the untrained model for every run on the same dev set: an experiment computes it
    once. The cached figure equals an independent scoring of the loaded model on that dev set."""
    import gradmm.stages.finetune
    from gradmm.stages.evaluate import dev_set

    monkeypatch.setattr(gradmm.stages.finetune, "_UNTRAINED_DEV", {})
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return accuracy(*args, **kwargs)

    monkeypatch.setattr(gradmm.stages.finetune, "accuracy", counted)
    base = dict(
        model=str(model_dirs["llama"]),
        task="sst2",
        train=str(train_file),
        data_dir=str(data_dir),
        method="lora",
        lr=1e-2,
        steps=2,
        batch_size=4,
        eval_every=2,
        max_dev=40,
    )
    first = finetune(FinetuneConfig(**base), progress=False)
    scored_first = len(calls)  # step 0, step 2, test
    second = finetune(FinetuneConfig(**base, seed=1), progress=False)
    assert scored_first == 3 and len(calls) - scored_first == 2
    dev = dev_set(TASK, str(data_dir), None, 40)
    full = dev_set(TASK, str(data_dir))
    assert first["dev_examples"] == 40 and set(dev.texts) <= set(full.texts)
    lm = load_model(str(model_dirs["llama"]))
    untrained = accuracy(lm, tokenize_prompt(TASK, lm.tokenizer), dev, TASK.label_names)
    assert second["history"][0]["dev"] == first["history"][0]["dev"] == untrained
