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

from gradmm.core.lm import LoadedModel, fingerprint, place
from gradmm.core.settings import Runtime
from gradmm.core.tokens import tokenize_prompt
from gradmm.data.tasks import Task, examples_from_rows, load_task
from gradmm.errors import UserError
from gradmm.files import OutputKind, check_output_dir, read_jsonl_numbered, staged_dir, write_json
from gradmm.models.loading import load_model
from gradmm.stages.configs import FinetuneConfig
from gradmm.stages.evaluate import accuracy, dev_data_read, dev_set, label_log_probs, test_set

FINETUNE_DIR = OutputKind("finetune", "results.json", ("results.json", "model"))


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
    train, dev, test, data_read = _finetune_data(task, config)
    # trained in fp32 (AdamW on lower-precision weights loses updates), on the runtime's device
    lm = place(load_model(config.model), Runtime(device=(runtime or Runtime()).device))
    prompt = tokenize_prompt(task, lm.tokenizer)
    history = [{"step": 0, "dev": _untrained_dev_accuracy(lm, prompt, dev, task)}] if dev else []
    torch.manual_seed(config.seed)
    losses = _train(lm, prompt, train, dev, task, config, history, progress)
    if dev is None:
        history = [{"step": config.steps, "dev": None}]
    best = _select_best(lm, history)
    lm.model.eval()
    test_result = accuracy(lm, prompt, test, task.label_names)
    result = {
        "config": config.model_dump(mode="json"),
        "train_examples": len(train.texts),
        "dev_examples": None if dev is None else len(dev.texts),
        "test_examples": len(test.texts),
        "selected_step": best["step"],
        "dev_accuracy": None if best["dev"] is None else best["dev"]["accuracy"],
        "test_accuracy": test_result["accuracy"],
        "test_per_class_accuracy": test_result["per_class_accuracy"],
        "history": [{k: v for k, v in row.items() if k != "weights"} for row in history],
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


def _finetune_data(task: Task, config: FinetuneConfig) -> tuple:
    """(train, dev or None, test, data_read): the examples and what reading them means."""
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
    return train, dev, test, data_read


def _train(lm, prompt, train, dev, task: Task, config: FinetuneConfig, history, progress) -> list:
    """AdamW on the label cross-entropy for ``config.steps`` steps (full or LoRA); every
    ``eval_every`` steps a dev row is appended to ``history``, and the row that improves on
    all before it keeps a copy of the trainable weights under ``"weights"``. Returns the losses."""
    params = _trainable_parameters(lm, config)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / config.steps)
    if history:  # the loaded weights: selected when no step improves on them
        history[0]["weights"] = _snapshot(lm.model)
    rng = np.random.default_rng(config.seed)
    order, cursor = rng.permutation(len(train.texts)), 0
    labels = torch.tensor(train.labels, device=lm.device)
    losses = []
    lm.model.train()
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
        if dev is not None and (step % config.eval_every == 0 or step == config.steps):
            lm.model.eval()
            row = {"step": step, "dev": accuracy(lm, prompt, dev, task.label_names)}
            lm.model.train()
            if row["dev"]["accuracy"] > max(r["dev"]["accuracy"] for r in history):
                row["weights"] = _snapshot(lm.model)
            history.append(row)
    return losses


def _trainable_parameters(lm: LoadedModel, config: FinetuneConfig) -> list[torch.nn.Parameter]:
    """Wrap ``lm.model`` in LoRA adapters (``method: lora``) or unfreeze it (``full``)."""
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecates
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=2 * config.lora_rank,
                target_modules="all-linear",
                lora_dropout=0.0,
            )
            lm.model = get_peft_model(lm.model, lora)
    else:
        lm.model.requires_grad_(True)
    return [p for p in lm.model.parameters() if p.requires_grad]


def _select_best(lm: LoadedModel, history: list[dict]) -> dict:
    """The dev-best row (earliest on ties), its weights restored into ``lm.model``; the last
    row when there is no dev set. Only the selected weights are ever scored on test."""
    if history[0]["dev"] is None:
        return history[0]
    best = max(history, key=lambda r: (r["dev"]["accuracy"], -r["step"]))
    restored = lm.model.load_state_dict(best["weights"], strict=False)
    if restored.unexpected_keys:  # not an assert: `python -O` must restore the weights too
        raise RuntimeError(f"could not restore the selected weights: {restored}")
    return best


# Dev accuracy of the untrained model per (weights, task, dev set, device), computed once per
# process: an experiment fine-tunes the same model on the same dev set dozens of times.
_UNTRAINED_DEV: dict[tuple, dict] = {}


def _untrained_dev_accuracy(lm: LoadedModel, prompt, dev, task: Task) -> dict:
    """Dev accuracy of the loaded weights (LoRA adapters start at zero, so the same for both
    methods), from the process's cache when this model, task and dev set were scored before."""
    dev_digest = hashlib.sha256(json.dumps([dev.texts, dev.labels]).encode()).hexdigest()
    key = (fingerprint(lm.model), task.model_dump_json(), dev_digest, str(lm.device))
    if key not in _UNTRAINED_DEV:
        lm.model.eval()
        _UNTRAINED_DEV[key] = accuracy(lm, prompt, dev, task.label_names)
    return _UNTRAINED_DEV[key]


def _snapshot(model: torch.nn.Module) -> dict:
    """Copies of the trainable tensors (all weights, or only LoRA's adapters)."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
