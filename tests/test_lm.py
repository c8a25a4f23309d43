"""The reference LM recipe: corpus separation, tokenizer requirements, exact resume."""

import json
from pathlib import Path

import pytest
import torch

from gradmm.data.tasks import BUILTIN_TASKS
from gradmm.models.recipe import LMTrainConfig
from gradmm.models.train import CORPUS_FILES, REQUIRED_TOKENS, corpus_documents, train_lm


def test_corpus_holds_no_task_evaluation_or_private_file():
    """No built-in task's private pool, dev or test file may be in the LM corpus. IMDB train is
    the one exception by design (see docs/reference_lm.md): its task must not sample there."""
    used = set(CORPUS_FILES)
    for task in BUILTIN_TASKS.values():
        for split in ("train", "validation", "test"):
            path = f"{task.local_dir}/{split}.jsonl"
            if path == "imdb/train.jsonl":
                continue
            assert path not in used, path
    assert "imdb/test.jsonl" not in used


def tiny_corpus(root: Path) -> None:
    (root / "imdb").mkdir(parents=True)
    (root / "wikitext2").mkdir()
    words = "the film was great and the plot was bad It was a joy anger optimism sadness"
    with (root / "imdb" / "train.jsonl").open("w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"{words} review {i}<br />end.", "label": i % 2}) + "\n")
    for split in ("valid", "test"):
        (root / "wikitext2" / f"{split}.txt").write_text(
            " = Heading = \n" + " The river @-@ bank , it was wide . \n" * 30
        )


def tiny_config(root: Path, **kw) -> LMTrainConfig:
    return LMTrainConfig(
        data_dir=str(root),
        vocab_size=300,
        hidden_size=16,
        layers=1,
        heads=2,
        intermediate_size=32,
        seq_len=16,
        batch_size=4,
        warmup_steps=2,
        checkpoint_every=3,
        log_every=1,
        heldout_fraction=0.1,
        **kw,
    )


def test_corpus_cleaning_and_manifest(tmp_path):
    tiny_corpus(tmp_path)
    docs, manifest = corpus_documents(tmp_path)
    assert [m["path"] for m in manifest] == list(CORPUS_FILES)
    assert all(len(m["sha256"]) == 64 for m in manifest)
    assert not any("<br />" in d or "@-@" in d or d.startswith("=") for d in docs)


def test_training_resumes_exactly(tmp_path, monkeypatch):
    tiny_corpus(tmp_path / "data")
    cfg = tiny_config(tmp_path / "data", max_steps=6)
    full = train_lm(cfg, tmp_path / "full")

    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def failing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        train_lm(cfg, tmp_path / "resumed")
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = train_lm(cfg, tmp_path / "resumed")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = AutoModelForCausalLM.from_pretrained(full).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    tok = AutoTokenizer.from_pretrained(resumed)
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in REQUIRED_TOKENS)
    info = json.loads((resumed / "training.json").read_text())
    assert info["steps"] == 6 and info["corpus"][0]["path"] == "imdb/train.jsonl"


def test_training_loss_predicts_the_next_token():
    from gradmm.models.train import build_model, next_token_loss

    model = build_model(
        LMTrainConfig(data_dir="x", hidden_size=16, layers=1, heads=2, intermediate_size=32),
        vocab=50,
    )
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits
    manual = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(next_token_loss(model, ids), manual)
