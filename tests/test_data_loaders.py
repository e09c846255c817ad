"""Training batches and evaluation batches: what the model is taught, and what each rank sees.

Real tokenizers (Qwen3's and SmolLM2's), real demo data from ``spellxfer data build``, and a real
Lightning ``Trainer`` for the hooks Lightning itself calls (``set_epoch``, batch transfer).
"""

from __future__ import annotations

import json
import random
import shutil

import lightning as L
import pytest
import torch
from conftest import read_jsonl

from spellxfer.core.errors import SpellxferError
from spellxfer.models.registry import load_tokenizer
from spellxfer.tasks.chat import end_of_turn_ids, format_prompt
from spellxfer.tasks.questions import Item
from spellxfer.training.datamodule import (
    LengthGroupedBatchSampler,
    SpellingCollator,
    SpellingDataModule,
    read_training_rows,
    tokenize_example,
    tokenize_examples,
)

QUESTION = "Spell 'noisy' backwards, letter by letter, separated by dashes."
ANSWER = "y-s-i-o-n"


@pytest.fixture(scope="module", params=["tiny-qwen3", "smollm2-135m"])
def tok(request):
    return load_tokenizer(request.param)


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer("tiny-qwen3")


@pytest.fixture(scope="module")
def qwen_lengths(demo_data, qwen) -> list[int]:
    rows = read_training_rows(demo_data / "spelling_train.jsonl")
    examples = tokenize_examples(qwen, [r["question"] for r in rows], [r["answer"] for r in rows])
    return [len(e["input_ids"]) for e in examples]


@pytest.fixture(scope="module")
def demo_module(demo_data) -> SpellingDataModule:
    dm = SpellingDataModule(str(demo_data), "tiny-qwen3", build_profile=None, batch_size=8)
    dm.setup("fit")
    return dm


# --- tokenize_example -------------------------------------------------------------------------


def test_example_is_prompt_then_answer_then_end_of_turn(tok):
    ex = tokenize_example(tok, QUESTION, ANSWER)
    prompt = format_prompt(tok, QUESTION)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)

    assert tok.decode(ex["input_ids"]) == prompt + ANSWER + "<|im_end|>"
    # The prompt ids are exactly what the generation engine feeds the model at evaluation time.
    assert ex["input_ids"][:n] == prompt_ids
    assert len(ex["labels"]) == len(ex["input_ids"])
    assert ex["labels"][:n] == [-100] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]  # every completion token supervised, none masked
    assert tok.decode(ex["labels"][n:]) == ANSWER + "<|im_end|>"
    # The last supervised token is the end-of-turn id itself, appended as an id.
    assert ex["labels"][-1] == end_of_turn_ids(tok)[0] == tok.convert_tokens_to_ids("<|im_end|>")


def test_qwen3_prompt_ends_in_the_empty_think_block_and_the_answer_follows_it(qwen):
    ex = tokenize_example(qwen, QUESTION, ANSWER)
    n_prompt = ex["labels"].count(-100)
    assert qwen.decode(ex["input_ids"][:n_prompt]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ex["input_ids"][-1] == 151_645  # <|im_end|>, not <|endoftext|>
    assert 151_667 not in ex["labels"] and 151_668 not in ex["labels"]  # no <think> tag is ever taught


def test_batched_tokenization_equals_one_by_one(tok, demo_data):
    rows = read_jsonl(demo_data / "spelling_train.jsonl")[:6]
    batched = tokenize_examples(tok, [r["question"] for r in rows], [r["answer"] for r in rows])
    assert batched == [tokenize_example(tok, r["question"], r["answer"]) for r in rows]


# --- SpellingCollator -------------------------------------------------------------------------


def test_collator_right_pads_and_masks_padding_only(tok):
    questions = ["Spell 'cat'.", QUESTION, "Which word is spelled o, b, t, a, i, n, i, n, g?"]
    answers = ["c a t", ANSWER, "obtaining"]
    examples = tokenize_examples(tok, questions, answers)
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) == 3

    batch = SpellingCollator(tok.pad_token_id)(examples)
    width = max(lengths)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (3, width) and batch[key].dtype == torch.long
    for row, (e, n) in enumerate(zip(examples, lengths)):
        assert batch["input_ids"][row, :n].tolist() == e["input_ids"]
        assert batch["labels"][row, :n].tolist() == e["labels"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (batch["labels"][row, n:] == -100).all()
        # SmolLM2 pads with <|im_end|> itself: the real one at the end of the answer stays taught.
        assert batch["labels"][row, n - 1] == end_of_turn_ids(tok)[0]
    assert batch["n_real_tokens"] == sum(lengths) == int(batch["attention_mask"].sum())


# --- LengthGroupedBatchSampler ----------------------------------------------------------------


def padding_waste(batches: list[list[int]], lengths: list[int]) -> float:
    """Pad tokens / all tokens when each batch is padded to its longest example."""
    total = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / total


def test_every_example_once_per_epoch_and_far_less_padding_than_random(qwen_lengths):
    sampler = LengthGroupedBatchSampler(qwen_lengths, batch_size=8, seed=0)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(qwen_lengths)))
        assert len(batches) == len(sampler) == 150  # 1,200 demo rows / 8

    order = list(range(len(qwen_lengths)))
    random.Random(0).shuffle(order)
    random_batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    grouped, shuffled = (
        padding_waste(list(sampler), qwen_lengths),
        padding_waste(random_batches, qwen_lengths),
    )
    # Measured on the demo file with the Qwen3 tokenizer: 2.0% against 38% (seed 0).
    assert grouped < 0.5 * shuffled and grouped < 0.1


def test_same_seed_and_epoch_same_batches_otherwise_different(qwen_lengths):
    def batches(seed, epoch):
        s = LengthGroupedBatchSampler(qwen_lengths, batch_size=8, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert batches(0, 3) == batches(0, 3)
    assert batches(0, 3) != batches(0, 4)
    assert batches(0, 3) != batches(1, 3)
    # The longest example leads every epoch: an out-of-memory batch fails on step 1.
    assert all(max(qwen_lengths[i] for i in batches(0, e)[0]) == max(qwen_lengths) for e in range(3))


def test_ranks_get_disjoint_batches_that_cover_the_epoch(qwen_lengths):
    # 150 batches of 8 split evenly over 2 ranks.
    ranks = [LengthGroupedBatchSampler(qwen_lengths, 8, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(2)
    seen = [[i for b in s for i in b] for s in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 75
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(qwen_lengths)))
    # Sharding does not change what the epoch is: together the ranks run the one-rank batches.
    single = LengthGroupedBatchSampler(qwen_lengths, 8, seed=5)
    single.set_epoch(2)
    assert sorted(map(tuple, list(ranks[0]) + list(ranks[1]))) == sorted(map(tuple, single))


def test_uneven_batch_counts_repeat_or_drop_so_ranks_step_together(qwen_lengths):
    # 1,200 / 16 = 75 batches: one too many for 2 ranks.
    n = len(qwen_lengths)
    padded = [list(LengthGroupedBatchSampler(qwen_lengths, 16, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(padded[0]) == len(padded[1]) == 38
    flat = [i for r in padded for b in r for i in b]
    assert set(flat) == set(range(n)) and len(flat) == n + 16  # the first batch runs twice
    assert padded[1][-1] == padded[0][0]

    dropped = [
        list(LengthGroupedBatchSampler(qwen_lengths, 16, num_replicas=2, rank=r, drop_last=True))
        for r in (0, 1)
    ]
    assert len(dropped[0]) == len(dropped[1]) == 37
    flat = [i for r in dropped for b in r for i in b]
    assert len(flat) == len(set(flat)) == n - 16  # each example at most once


# --- SpellingDataModule -----------------------------------------------------------------------


def test_fit_setup_gives_token_batches_and_position_then_count_items(demo_module):
    batch = next(iter(demo_module.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 8
    assert ((batch["labels"] == -100) | (batch["attention_mask"] == 1)).all()
    assert len(demo_module.train_examples) == 1200 and demo_module.n_dropped == 0

    position, count = demo_module.val_dataloader()
    # val_limit null (the default): every row of each file
    assert len(position.dataset) == len(count.dataset) == 80
    for loader, task in ((position, "position"), (count, "count")):
        items = [item for b in loader for item in b]
        assert all(isinstance(i, Item) and i.task == task for i in items)
        assert items[0].file.endswith(f"{task}_val.jsonl")
        # data.eval_batch_size auto (the default): the whole shard in one batch, which the
        # generation engine sorts by length and cuts into batches that fit the device's memory
        assert len(next(iter(loader))) == 80


def test_an_integer_eval_batch_size_caps_the_loader_batches(demo_data):
    dm = SpellingDataModule(
        str(demo_data), "tiny-qwen3", build_profile=None, eval_batch_size=24, val_limit=50
    )
    dm.setup("validate")
    for loader in dm.val_dataloader():
        assert [len(b) for b in loader] == [24, 24, 2]
    for bad in (0, "big", 2.5, True):
        with pytest.raises(SpellxferError, match="eval_batch_size"):
            SpellingDataModule(str(demo_data), "tiny-qwen3", build_profile=None, eval_batch_size=bad)


def test_test_stage_reads_the_test_files_in_full(demo_data):
    dm = SpellingDataModule(str(demo_data), "tiny-qwen3", build_profile=None)
    dm.setup("test")
    position, count = dm.test_dataloader()
    assert len(position.dataset) == len(count.dataset) == 200
    assert {i.task for i in position.dataset} == {"position"} and {i.task for i in count.dataset} == {"count"}
    assert dm.train_examples is None  # testing does not tokenize the training file


def test_overlong_examples_are_dropped_and_counted(demo_data, qwen_lengths):
    dm = SpellingDataModule(str(demo_data), "tiny-qwen3", build_profile=None, max_length=40)
    with pytest.warns(UserWarning, match=r"dropped as longer than 40 tokens"):
        dm.setup("fit")
    assert dm.n_dropped == sum(n > 40 for n in qwen_lengths) > 0
    assert max(len(e["input_ids"]) for e in dm.train_examples) <= 40

    with pytest.raises(SpellxferError, match="max_length 5 drops every training row"):
        SpellingDataModule(str(demo_data), "tiny-qwen3", build_profile=None, max_length=5).setup("fit")


def test_missing_data_without_a_build_profile_names_the_directory(tmp_path):
    dm = SpellingDataModule(str(tmp_path / "nowhere"), "tiny-qwen3", build_profile=None)
    for step in (dm.prepare_data, lambda: dm.setup("fit")):
        with pytest.raises(SpellxferError, match=r"nowhere: missing spelling_train.jsonl.*build_profile"):
            step()


def copy_data(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


def replace_line(path, line: int, row: dict) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


def test_a_position_row_in_the_training_file_is_refused_with_file_and_line(demo_data, tmp_path):
    data = copy_data(demo_data, tmp_path / "leaky")
    replace_line(data / "spelling_train.jsonl", 7, read_jsonl(data / "position_val.jsonl")[0])
    dm = SpellingDataModule(str(data), "tiny-qwen3", build_profile=None, train_limit=3)
    # Line 7 is past train_limit: the whole file is still checked.
    with pytest.raises(
        SpellxferError, match=r"spelling_train\.jsonl:7: task 'position' in the training file"
    ):
        dm.setup("fit")


def test_training_rows_go_through_datasets_and_nothing_is_written_beside_them(demo_data, tmp_path, qwen):
    import datasets

    from spellxfer.data.schema import FEATURES

    data = copy_data(demo_data, tmp_path / "ro")
    before = {f.name: f.stat().st_mtime_ns for f in data.iterdir()}
    rows = read_training_rows(data / "spelling_train.jsonl", limit=100)
    assert isinstance(rows, datasets.Dataset) and rows.features == FEATURES
    expected = read_jsonl(demo_data / "spelling_train.jsonl")
    assert rows.to_list() == [{c: r.get(c) for c in FEATURES} for r in expected[:100]]

    dm = SpellingDataModule(str(data), "tiny-qwen3", build_profile=None)
    dm.setup("fit")
    # the same examples, in the same order, as tokenizing the file's rows directly
    direct = tokenize_examples(qwen, [r["question"] for r in expected], [r["answer"] for r in expected])
    assert isinstance(dm.train_examples, datasets.Dataset)
    assert dm.train_examples[:]["input_ids"] == [e["input_ids"] for e in direct]
    assert dm.train_examples[:]["labels"] == [e["labels"] for e in direct]
    assert dm.train_examples[:]["length"] == [len(e["input_ids"]) for e in direct]
    # no Arrow cache, lock or index file left in the data directory
    assert {f.name: f.stat().st_mtime_ns for f in data.iterdir()} == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"source": "web"},
            r"spelling_train\.jsonl:5: unknown field 'source' \(the data schema's fields: id, task",
        ),
        ({"word": 7}, r"spelling_train\.jsonl:5: 'word' must be text or null, got int 7"),
        (
            {"position": True},
            r"spelling_train\.jsonl:5: 'position' must be an integer or null, got bool True",
        ),
    ],
    ids=["unknown-field", "number-as-word", "bool-as-position"],
)
def test_a_training_row_outside_the_schema_is_refused_with_file_and_line(
    demo_data, tmp_path, change, message
):
    data = copy_data(demo_data, tmp_path / "off-schema")
    replace_line(data / "spelling_train.jsonl", 5, read_jsonl(data / "spelling_train.jsonl")[4] | change)
    with pytest.raises(SpellxferError, match=message):
        SpellingDataModule(str(data), "tiny-qwen3", build_profile=None).setup("fit")


def test_a_count_row_in_a_position_file_is_refused_with_file_and_line(demo_data, tmp_path):
    data = copy_data(demo_data, tmp_path / "mixed")
    replace_line(data / "position_val.jsonl", 2, read_jsonl(data / "count_val.jsonl")[0])
    with pytest.raises(SpellxferError, match=r"position_val\.jsonl:2: a count question in position_val"):
        SpellingDataModule(str(data), "tiny-qwen3", build_profile=None).setup("validate")


def test_prepare_data_builds_an_absent_directory_once(tmp_path):
    out = tmp_path / "fresh"
    dm = SpellingDataModule(str(out), "tiny-qwen3", build_profile="demo", seed=0)
    with pytest.raises(SpellxferError, match="call prepare_data"):
        dm.setup("fit")
    dm.prepare_data()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["profile"] == "demo" and manifest["rows"]["spelling_train.jsonl"]["total"] == 1200
    built = (out / "spelling_train.jsonl").stat().st_mtime_ns
    dm.prepare_data()  # complete data is left alone
    assert (out / "spelling_train.jsonl").stat().st_mtime_ns == built
    dm.setup("validate")
    assert len(dm.val_dataloader()[0].dataset) == 80  # every validation row (val_limit null)


def test_bad_arguments_name_the_cli_key():
    with pytest.raises(SpellxferError, match=r"--data\.batch_size must be ≥ 1, got 0"):
        SpellingDataModule("d", "tiny-qwen3", batch_size=0)
    with pytest.raises(SpellxferError, match=r"--data\.build_profile must be demo, full or null"):
        SpellingDataModule("d", "tiny-qwen3", build_profile="huge")


class Recorder(L.LightningModule):
    """Stands in for the training module: records what Lightning hands to each step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.first_batches: dict[int, torch.Tensor] = {}
        self.val_items: dict[int, list] = {0: [], 1: []}

    def training_step(self, batch, batch_idx):
        self.first_batches.setdefault(self.current_epoch, batch["input_ids"])
        return (self.w - 1) ** 2

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_items[dataloader_idx].extend(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_reshuffles_each_epoch_and_delivers_items_untouched(demo_module):
    model = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=demo_module)

    # Lightning's set_epoch reached the sampler: each epoch began with that epoch's batch.
    collate = SpellingCollator(demo_module.tokenizer.pad_token_id)
    sampler = LengthGroupedBatchSampler([len(e["input_ids"]) for e in demo_module.train_examples], 8)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        expected = collate([demo_module.train_examples[i] for i in next(iter(sampler))])["input_ids"]
        assert torch.equal(model.first_batches[epoch], expected)
    assert not torch.equal(model.first_batches[0], model.first_batches[1])
    # Evaluation batches crossed Lightning's device transfer as the loaded Items themselves.
    position, count = demo_module.eval_items["val"]["position"], demo_module.eval_items["val"]["count"]
    assert model.val_items[0][:16] == position[:16] and model.val_items[1][:16] == count[:16]
