"""Fine-tuning and evaluation: learning a separable task, class prior of a constant model, dev-only
selection, LoRA leaves the base weights alone, k-shot prompts."""

import json

import pytest
import torch

from gradmm.evaluate import accuracy, demonstrations, eval_sets
from gradmm.finetune import FinetuneConfig, finetune
from gradmm.models import load_model
from gradmm.tasks import BUILTIN_TASKS, dev_indices, load_examples, tokenize_prompt

TASK = BUILTIN_TASKS["sst2"]


@pytest.fixture()
def train_file(data_dir, tmp_path):
    """The training split minus its dev slice, as a JSONL training file."""
    ex = load_examples(TASK, "train", data_dir)
    dev = set(dev_indices(len(ex.texts), TASK.dev_size))
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


def test_lora_trains_adapters_only(model_dirs, data_dir, train_file):
    lm = load_model(str(model_dirs["llama"]))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cfg = FinetuneConfig(
        model=str(model_dirs["llama"]),
        task="sst2",
        train=str(train_file),
        data_dir=str(data_dir),
        method="lora",
        lr=1e-2,
        steps=5,
        eval_every=5,
    )
    result = finetune(cfg, progress=False)
    assert result["selected_step"] in (0, 5)
    again = load_model(str(model_dirs["llama"]))
    assert all(torch.equal(before[k], v) for k, v in again.model.state_dict().items())


def test_constant_model_scores_the_class_prior(model_dirs, data_dir):
    lm = load_model(str(model_dirs["phi"]))
    prompt = tokenize_prompt(TASK, lm.tokenizer)
    head = lm.model.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[prompt.label_ids[1]] = 10.0  # always " great"
    test = load_examples(TASK, "validation", data_dir)
    result = accuracy(lm, prompt, test, TASK.label_names)
    assert result["accuracy"] == pytest.approx(sum(test.labels) / len(test.labels))
    assert result["per_class_accuracy"] == {"negative": 0.0, "positive": 1.0}


def test_k_shot_prompt_has_k_demonstrations_per_class(model_dirs, data_dir):
    lm = load_model(str(model_dirs["llama"]))
    prompt = tokenize_prompt(TASK, lm.tokenizer)
    dev, test = eval_sets(TASK, str(data_dir), None, 0)
    ids = demonstrations(lm, prompt, dev, 2, seed=0)
    text = lm.tokenizer.decode(ids)
    assert text.count(" It was bad\n") == 2 and text.count(" It was great\n") == 2
    assert set(dev.texts).isdisjoint(test.texts) or TASK.test_split != TASK.private_split
    with_demos = accuracy(lm, prompt, test, TASK.label_names, prefix=ids)
    assert 0 <= with_demos["accuracy"] <= 1 and with_demos["n"] == len(test.texts)
