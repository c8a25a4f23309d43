"""Fine-tune a causal LM as a verbalizer classifier and evaluate it with honest model selection.

Loss (as in the reference): for each example, the log-probabilities of the label words after
``template(text)`` are the class scores, and the loss is the cross-entropy of their softmax
against the label. First-order AdamW, linear decay to 0, gradient clip 1.0; full fine-tuning or
LoRA (``peft``). Every ``eval_every`` steps (and before training) the model is scored on the dev
set; only the weights of the step with the best **dev** accuracy are scored on the test split
(the test set never selects anything).

The dev set is, by default, a fixed slice of the *private* split that private pools never draw
from: reading it is outside any DP release (``results.json`` says so under ``data_read``). Two
selections read no private data: ``dev_file`` (a public ``{"text","label"}`` JSONL) and
``selection: last`` (no selection: the last step's weights).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gradmm.core.lm import Runtime, fingerprint, place
from gradmm.core.tokens import tokenize_prompt
from gradmm.data.tasks import examples_from_rows, load_task
from gradmm.errors import UserError
from gradmm.files import OutputKind, check_output_dir, read_jsonl_numbered, staged_dir, write_json
from gradmm.models.loading import load_model
from gradmm.stages.configs import FinetuneConfig
from gradmm.stages.evaluate import accuracy, dev_data_read, dev_set, label_log_probs, test_set

FINETUNE_DIR = OutputKind("finetune", "results.json", ("results.json", "model"))


# Dev accuracy of the untrained model per (weights, task, dev set, device), computed once per
# process: an experiment fine-tunes the same model on the same dev set dozens of times.
_UNTRAINED_DEV: dict[tuple, dict] = {}


def finetune(
    config: FinetuneConfig,
    out: Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    runtime: Runtime | None = None,
) -> dict:
    """Train on ``config.train``, select the step on dev, report test; writes ``out``
    (``results.json``, and ``model/`` with ``save_model``)."""
    started = time.time()
    task = load_task(config.task)
    if out is not None and check_output_dir(Path(out), FINETUNE_DIR) and not overwrite:
        raise UserError(f"{out} already holds fine-tuning results (pass --overwrite to replace)")
    train = examples_from_rows(task, read_jsonl_numbered(Path(config.train)), config.train)
    use_dev = config.selection == "dev"
    dev = dev_set(task, config.data_dir, config.dev_file, config.max_dev) if use_dev else None
    test = test_set(task, config.data_dir, config.max_test, config.seed)
    data_read = [
        {"data": f"training file {config.train}", "private": "as the file's origin"},
        {"data": f"test split {task.test_split!r} (scored once)", "private": False},
    ]
    if use_dev:
        data_read.append(dev_data_read(task, config.dev_file, "checkpoint selection"))
    # trained in fp32 (AdamW on lower-precision weights loses updates), on the runtime's device
    lm = place(load_model(config.model), Runtime(device=(runtime or Runtime()).device))
    prompt = tokenize_prompt(task, lm.tokenizer)
    if use_dev:  # what the untrained model's dev accuracy depends on: weights, task, dev set
        dev_digest = hashlib.sha256(json.dumps([dev.texts, dev.labels]).encode()).hexdigest()
        key = (fingerprint(lm.model), task.model_dump_json(), dev_digest, str(lm.device))
    torch.manual_seed(config.seed)
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecates
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            lm.model = get_peft_model(
                lm.model,
                LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=2 * config.lora_rank,
                    target_modules="all-linear",
                    lora_dropout=0.0,
                ),
            )
    else:
        lm.model.requires_grad_(True)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / config.steps)

    def dev_accuracy(step: int) -> dict:
        lm.model.eval()
        if step == 0:  # the loaded model's (LoRA adapters start at zero): the same for every run
            if key not in _UNTRAINED_DEV:
                _UNTRAINED_DEV[key] = accuracy(lm, prompt, dev, task.label_names)
            row = {"step": 0, "dev": _UNTRAINED_DEV[key]}
        else:
            row = {"step": step, "dev": accuracy(lm, prompt, dev, task.label_names)}
        lm.model.train()
        return row

    # Only the selected checkpoint is scored on test: its weights are kept (trainable ones).
    history = [dev_accuracy(0)] if use_dev else []
    losses, best_state = [], _snapshot(lm.model) if use_dev else {}
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(train.texts))
    cursor = 0
    labels = torch.tensor(train.labels, device=lm.device)
    for step in tqdm(range(1, config.steps + 1), desc="finetune", disable=not progress):
        if cursor + config.batch_size > len(order):
            order, cursor = rng.permutation(len(train.texts)), 0
        batch = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        scores = label_log_probs(lm, prompt, [train.texts[i] for i in batch])
        loss = torch.nn.functional.cross_entropy(scores, labels[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if use_dev and (step % config.eval_every == 0 or step == config.steps):
            history.append(dev_accuracy(step))
            if history[-1]["dev"]["accuracy"] > max(r["dev"]["accuracy"] for r in history[:-1]):
                best_state = _snapshot(lm.model)
    if use_dev:
        best = max(history, key=lambda r: (r["dev"]["accuracy"], -r["step"]))
        restored = lm.model.load_state_dict(best_state, strict=False)
        if restored.unexpected_keys:  # not an assert: `python -O` must restore the weights too
            raise RuntimeError(f"could not restore the selected weights: {restored}")
    else:
        history = [{"step": config.steps, "dev": None}]
        best = {"step": config.steps, "dev": {"accuracy": None}}
    lm.model.eval()
    test_result = accuracy(lm, prompt, test, task.label_names)
    result = {
        "config": config.model_dump(mode="json"),
        "train_examples": len(train.texts),
        "dev_examples": None if dev is None else len(dev.texts),
        "test_examples": len(test.texts),
        "selected_step": best["step"],
        "dev_accuracy": best["dev"]["accuracy"],
        "test_accuracy": test_result["accuracy"],
        "test_per_class_accuracy": test_result["per_class_accuracy"],
        "history": history,
        "train_loss": losses,
        "data_read": data_read,
        "seconds": round(time.time() - started, 2),
    }
    if out is not None:
        with staged_dir(Path(out), FINETUNE_DIR) as tmp:
            write_json(tmp / "results.json", result)
            if config.save_model:  # the dev-selected weights
                lm.model.save_pretrained(tmp / "model")
                lm.tokenizer.save_pretrained(tmp / "model")
    return result


def _snapshot(model: torch.nn.Module) -> dict:
    """Copies of the trainable tensors (all weights, or only LoRA's adapters)."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
