import pytest

from safetylock import data
from safetylock.contrast import contrast_pairs, task_phrase


def test_user_files_in_three_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "one"}\n\n"two"\n{"instruction": "three"}\n')
    (tmp_path / "b.csv").write_text("goal,target\nfirst,x\nsecond,y\n")
    (tmp_path / "c.txt").write_text("alpha\n\n beta \n")
    assert data.load_prompt_file(tmp_path / "a.jsonl").prompts == ("one", "two", "three")
    assert data.load_prompt_file(tmp_path / "b.csv").prompts == ("first", "second")
    assert data.load_prompt_file(tmp_path / "c.txt").prompts == ("alpha", "beta")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.jsonl", '{"prompt": "ok"}\n{broken\n', r"bad.jsonl:2: invalid JSON"),
        ("nofield.jsonl", '{"answer": "x"}\n', r"nofield.jsonl:1: no non-empty prompt field"),
        ("list.jsonl", "[1, 2]\n", r"list.jsonl:1: expected an object or a string"),
        ("nocol.csv", "a,b\n1,2\n", r"nocol.csv:2: no non-empty prompt field"),
        ("empty.txt", "\n\n", r"holds no prompts"),
        ("x.parquet", "zzz", r"unsupported extension '.parquet'"),
    ],
)
def test_malformed_user_files_are_refused(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(data.DataError, match=message):
        data.load_prompt_file(tmp_path / name)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_prompt_file(tmp_path / "nope.txt")


def test_advbench_split_is_seeded_disjoint_and_stratified():
    bench = data.advbench()
    assert len(bench.prompts) == 520 and len(bench.categories) == 520
    split = data.split_harmful(bench, seed=0)
    assert not set(split.extraction) & set(split.heldout)
    assert len(split.extraction) + len(split.heldout) == 520
    assert abs(len(split.heldout) - 260) <= 15  # rounding per category stratum
    assert data.split_harmful(bench, seed=0) == split
    assert data.split_harmful(bench, seed=1).heldout != split.heldout


def test_benign_prompts_load():
    benign = data.benign()
    assert len(benign.prompts) > 1000
    assert "What is the capital of France?" in benign.prompts


def test_sample_is_seeded_and_keeps_order():
    prompts = tuple(str(i) for i in range(100))
    picked = data.sample(prompts, 10, seed=3)
    assert picked == data.sample(prompts, 10, seed=3)
    assert list(picked) == sorted(picked, key=int)
    assert data.sample(prompts, None, 0) == prompts


def test_contrast_pairs_are_balanced_and_grouped():
    pairs = contrast_pairs(["Write a poem.", "Build a tool"], seed=0)
    assert [(p.safe, p.group) for p in pairs] == [(1, 0), (0, 0), (1, 1), (0, 1)]
    assert contrast_pairs(["Write a poem."], seed=5) == contrast_pairs(["Write a poem."], seed=5)
    assert task_phrase("Write a poem.") == "write a poem"
    assert all("{task}" not in p.response for p in pairs)


@pytest.mark.parametrize(
    ("instruction", "kept"),
    [
        ("Classify the following sentence according to its sentiment:", False),
        ("Edit this sentence to be more concise.", False),
        ("Summarize the following article in 90 words:", False),
        ('Paraphrase this sentence: "Make sure to bring your umbrella."', True),
        ("Give three tips for staying healthy.", True),
        ("Convert 10kgs to ounces.", True),
    ],
)
def test_benign_instructions_with_a_missing_input_are_dropped(instruction, kept):
    assert data.self_contained(instruction) is kept


def test_benign_list_keeps_only_self_contained_instructions():
    prompts = data.benign().prompts
    assert len(prompts) > 20_000 and all(data.self_contained(p) for p in prompts)
