import pytest

from gradmm.errors import UserError
from gradmm.tasks import BUILTIN_TASKS, Task, load_examples, load_task, tokenize_prompt


def test_prompt_pieces_match_whole_string_tokenisation(tokenizer):
    task = BUILTIN_TASKS["sst2"]
    prompt = tokenize_prompt(task, tokenizer)
    text = "the movie was dull"
    assert prompt.head == []
    assert prompt.tail == tokenizer(" It was", add_special_tokens=False).input_ids
    assert prompt.encode(tokenizer, text) == tokenizer(text + " It was").input_ids
    words = [tokenizer.decode([i]) for i in prompt.label_ids]
    assert words == [" bad", " great"]


def test_paper_tokens_trailing_space_and_unspaced_label_words(tokenizer):
    task = BUILTIN_TASKS["sst2"].with_paper_tokens()
    prompt = tokenize_prompt(task, tokenizer)
    assert task.template == "{text} It was "
    assert tokenizer.decode(prompt.tail) == " It was "
    assert len(prompt.tail) == 3  # " It", " was", " " as in the authors' code
    ids = tokenizer("great", add_special_tokens=False).input_ids
    assert prompt.label_ids[1] == ids[0]
    assert task.label_token_policy == "first"


def test_multi_token_label_word_is_refused_unless_policy_first(tokenizer):
    word = " zqxwv"  # not in the test vocabulary: several byte-level tokens
    assert len(tokenizer(word, add_special_tokens=False).input_ids) > 1
    task = BUILTIN_TASKS["sst2"].model_copy(update={"label_words": (" bad", word)})
    with pytest.raises(UserError, match="not a single token"):
        tokenize_prompt(task, tokenizer)
    first = task.model_copy(update={"label_token_policy": "first"})
    ids = tokenize_prompt(first, tokenizer).label_ids
    assert ids[1] == tokenizer(word, add_special_tokens=False).input_ids[0]


def test_label_words_sharing_a_first_token_are_refused(tokenizer):
    task = BUILTIN_TASKS["sst2"].model_copy(
        update={"label_words": (" zqa", " zqb"), "label_token_policy": "first"}
    )
    with pytest.raises(UserError, match="distinct tokens"):
        tokenize_prompt(task, tokenizer)


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
