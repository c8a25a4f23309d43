import pytest

from gradmm.core.tokens import tokenize_prompt
from gradmm.data.paper import paper_task
from gradmm.data.tasks import BUILTIN_TASKS, Task, load_examples, load_task
from gradmm.errors import UserError


def test_prompt_pieces_match_whole_string_tokenisation(tokenizer):
    task = BUILTIN_TASKS["sst2"]
    prompt = tokenize_prompt(task, tokenizer)
    text = "the movie was dull"
    assert prompt.head == []
    assert prompt.tail == tokenizer(" It was", add_special_tokens=False).input_ids
    assert prompt.encode(tokenizer, text) == tokenizer(text + " It was").input_ids
    assert [tokenizer.decode(w) for w in prompt.label_ids] == [" bad", " great"]
    assert all(len(w) == 1 for w in prompt.label_ids)


def test_paper_tokens_trailing_space_and_unspaced_label_words(tokenizer):
    task = paper_task(BUILTIN_TASKS["sst2"])
    prompt = tokenize_prompt(task, tokenizer)
    assert task.template == "{text} It was "
    assert tokenizer.decode(prompt.tail) == " It was "
    assert len(prompt.tail) == 3  # " It", " was", " " as in the authors' code
    ids = tokenizer("great", add_special_tokens=False).input_ids
    assert prompt.label_ids[1] == ids[:1]
    assert task.label_token_policy == "first"


def test_multi_token_label_word_keeps_all_its_tokens_unless_policy_first(tokenizer):
    word = " zqxwv"  # not in the test vocabulary: several byte-level tokens
    ids = tokenizer(word, add_special_tokens=False).input_ids
    assert len(ids) > 1
    task = BUILTIN_TASKS["sst2"].model_copy(update={"label_words": (" bad", word)})
    assert tokenize_prompt(task, tokenizer).label_ids[1] == ids
    first = task.model_copy(update={"label_token_policy": "first"})
    assert tokenize_prompt(first, tokenizer).label_ids[1] == ids[:1]


def test_label_words_sharing_a_first_token_are_refused(tokenizer):
    task = BUILTIN_TASKS["sst2"].model_copy(
        update={"label_words": (" zqa", " zqb"), "label_token_policy": "first"}
    )
    with pytest.raises(UserError, match="distinct first tokens"):
        tokenize_prompt(task, tokenizer)
    tokenize_prompt(task.model_copy(update={"label_token_policy": "all"}), tokenizer)


def test_template_without_slot_is_invalid():
    with pytest.raises(ValueError, match="text slot"):
        Task(
            name="x",
            label_names=("a", "b"),
            label_words=(" a", " b"),
            template="no slot",
            local_dir="x",
        )


def test_custom_task_from_yaml_and_multiclass_loading(tmp_path, data_dir):
    spec = tmp_path / "emo.yaml"
    spec.write_text(
        f"label_names: [anger, joy, optimism, sadness]\n"
        f"label_words: [' anger', ' joy', ' optimism', ' sadness']\n"
        f"template: 'Tweet: {{text}} Feeling:'\n"
        f"local_dir: {data_dir / 'tweet_eval_emotion'}\n"
    )
    task = load_task(str(spec))
    assert task.name == "emo" and task.num_classes == 4
    ex = load_examples(task, "train")
    assert sorted(set(ex.labels)) == [0, 1, 2, 3]


def test_hub_source_maps_fields(monkeypatch):
    import datasets

    rows = [{"sentence": "a fine film", "label": 1}, {"sentence": "a dull film", "label": 0}]
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.delenv("GRADMM_DATA_DIR", raising=False)
    ex = load_examples(BUILTIN_TASKS["sst2"], "train")
    assert calls == [("stanfordnlp/sst2", None, "train")]
    assert ex.texts == ["a fine film", "a dull film"] and ex.labels == [1, 0]


def test_hub_failure_says_why(monkeypatch):
    """A failed hub download reports the library's reason, not only its exception's type."""
    import datasets

    def offline(path, name=None, split=None):
        raise ConnectionError(
            "Couldn't reach 'stanfordnlp/sst2' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("GRADMM_DATA_DIR", raising=False)
    with pytest.raises(UserError) as err:
        load_examples(BUILTIN_TASKS["sst2"], "train")
    message = str(err.value)
    assert "Couldn't reach 'stanfordnlp/sst2' on the Hub" in message and "--data-dir" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "malformed JSON line"),
        ('{"text": "ok", "label": 7}', "outside the task's 2 classes"),
        ('{"text": "  ", "label": 0}', "empty text"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    folder = tmp_path / "sst2"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "fine", "label": 1}\n' + line + "\n")
    with pytest.raises(UserError, match=message) as err:
        load_examples(BUILTIN_TASKS["sst2"], "train", tmp_path)
    assert "train.jsonl:2" in str(err.value)


def test_csv_split_is_read_like_jsonl(tmp_path):
    folder = tmp_path / "sst2"
    folder.mkdir()
    (folder / "train.csv").write_text('text,label\n"a fine, warm film",1\nflat,0\n')
    ex = load_examples(BUILTIN_TASKS["sst2"], "train", tmp_path)
    assert ex.texts == ["a fine, warm film", "flat"] and ex.labels == [1, 0]
    (folder / "train.csv").write_text("text,label\nok,1\nbad row,x\n")
    with pytest.raises(UserError, match=r"train.csv:3: label 'x' is not an integer"):
        load_examples(BUILTIN_TASKS["sst2"], "train", tmp_path)


def test_demonstrations_belong_to_the_task(tmp_path, data_dir, model_dirs):
    """A custom 4-class task never gets the sentiment demonstrations: without its own, the
    methods that need them are a one-line error before anything runs; with them, they are used."""
    import json

    from conftest import cli

    from gradmm.data.tasks import BUILTIN_TASKS, load_task

    assert {y for _, y in BUILTIN_TASKS["tweet_emotion"].demonstrations} == {0, 1, 2, 3}
    spec = tmp_path / "emo.yaml"
    spec.write_text(
        "label_names: [anger, joy, optimism, sadness]\n"
        "label_words: [' anger', ' joy', ' optimism', ' sadness']\n"
        f"local_dir: {data_dir / 'tweet_eval_emotion'}\nprivate_split: train\ntest_split: train2\n"
    )
    assert load_task(str(spec)).demonstrations is None
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"model: {model_dirs['llama']}\ntasks: [{spec}]\nmethods: [lm_prompted]\n")
    r = cli("run", "--config", exp, "--out", tmp_path / "out")
    assert r.exit_code == 2 and "has no demonstrations" in r.stderr and "lm_prompted" in r.stderr
    assert not (tmp_path / "out").exists()
    exp.write_text(f"model: {model_dirs['llama']}\ntasks: [{spec}]\nmethods: [gradmm]\n")
    r = cli("run", "--config", exp, "--out", tmp_path / "out")
    assert r.exit_code == 2 and "few-shot classifier" in r.stderr

    spec.write_text(
        spec.read_text() + "demonstrations: [[grr, 0], [yay, 1], [soon, 2], [sigh, 3]]\n"
    )
    task = load_task(str(spec))
    assert task.require_demonstrations("x")[2] == ("soon", 2)
    spec.write_text(spec.read_text().replace("[sigh, 3]", "[sigh, 7]"))
    r = cli("release", "--task", spec, "--model", model_dirs["llama"], "--out", tmp_path / "r")
    assert r.exit_code == 2 and "demonstrations" in r.stderr
    assert json.dumps(list(task.demonstrations))


def test_experiment_file_typos_are_one_line_before_any_cell(tmp_path, model_dirs):
    from conftest import cli

    cases = [
        ("generate: {stpes: 3}", "stpes"),
        ("filter: {keep: 3}", "keep"),
        ("finetune: {lr: -1}", "lr"),
        ("finetune: {seed: 3}", "seed"),
    ]
    for section, message in cases:
        exp = tmp_path / "exp.yaml"
        exp.write_text(f"model: {model_dirs['llama']}\ntasks: [sst2]\n{section}\n")
        r = cli("run", "--config", exp, "--out", tmp_path / "out")
        assert r.exit_code == 2 and message in r.stderr, (section, r.output)
        assert "Traceback" not in r.output and not (tmp_path / "out").exists()


def test_long_texts_are_cut_only_when_asked(model_dirs, data_dir, tmp_path):
    """The reference-LM situation on IMDB: a text longer than the context is an error that names
    the option; --max-text-tokens cuts it, and the release records the cut."""
    import json

    from conftest import cli, write_split

    long_text = " ".join(["the film was great and"] * 60)  # > 128 tokens of the tiny models
    rows = [(f"{long_text} {i}", 1) for i in range(30)] + [(f"dull plot {i}", 0) for i in range(30)]
    write_split(tmp_path / "data" / "sst2", "train", rows)
    args = [
        "release",
        "--task",
        "sst2",
        "--model",
        model_dirs["gpt2"],
        "--data-dir",
        tmp_path / "data",
        "--n-per-class",
        3,
    ]
    r = cli(*args, "--out", tmp_path / "r1")
    assert r.exit_code == 2 and "longer than the model's context" in r.stderr
    assert "--max-text-tokens" in r.stderr
    r = cli(*args, "--out", tmp_path / "r2", "--max-text-tokens", 100)
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "r2" / "release.json").read_text())
    assert (
        meta["task"]["max_text_tokens"] == 100 and meta["prompt_tokens"]["max_text_tokens"] == 100
    )
