"""Training patterns and the non-spelling control: which rows a fit trains on.

What they promise (docs/data.md#training-patterns): the defaults train on today's data, row for
row; each ``--data.variants`` preset keeps exactly its subtasks; ``--data.separator`` one style;
``--data.distinct_words`` N words, the same N for the same seed; ``--data.train_set control`` the
same words and row count with no letter-level structure and no evaluation word; a bad value is
one ``error:`` line and exit 2; a sweep space can vary all four. Real builds, real tokenizer.
Trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import optuna
import pytest
import yaml
from conftest import REPO, read_jsonl

from spellxfer.cli import main
from spellxfer.core.errors import SpellxferError
from spellxfer.data.checks import check_data
from spellxfer.data.patterns import VARIANTS
from spellxfer.sweep.space import load_space, make_sampler
from spellxfer.tasks.names import CONTROL_SUBTASKS
from spellxfer.tasks.templates import CONTROL_CASE, CONTROL_REPEAT, training_template_words
from spellxfer.training.datamodule import SpellingDataModule, tokenize_examples

# sha256 of spelling_train.jsonl (seed 0) as built before rows recorded their separator, and of
# the evaluation files then: the separator field, the control file and its banned words changed
# no training row and no evaluation question.
BEFORE = {
    "demo": {"spelling_train.jsonl": "fb32831491fcaa0db518e03f039c389d3f7b4a12becf01fd7aca94c9f7a6da8c",
             "position_val.jsonl": "3d4f9922308a1787d85e92eaa0ec253582b68253e27b52704dda338b8df9d126",
             "position_test.jsonl": "3cecaaaf4870762d2e730ee773416330fb8dda06dea8592a2cf757875a1fb076",
             "count_val.jsonl": "36b87cbc18bd53db24c8a73e8e6cc1d8bc22440249f61ff0a3e27027a4a2c6a1",
             "count_test.jsonl": "c2397974dd02f446d30cbdcd2548df7fe400268fc1685dacd183f6923cb6e8ba",
             "fewshot_pool.jsonl": "3dea664409040795191a6cbe317a19e26b40e79b337d576742b676b6fde062ec"},
    "full": {"spelling_train.jsonl": "6a4049989cc76d5627881ab22794683f62d339111da167453b81bdcf2af8da12",
             "position_val.jsonl": "d0ba8499d6d4da58e2ffbd9d47ada51d3ea8abdf82b47ff1dadd5dda0c4a39a2",
             "position_test.jsonl": "548916d8e9cbe729dfd01a155a4147a170055e39b01cd3e073765c7348df10d4",
             "count_val.jsonl": "95b4bf17701665076a5a44b6cfe0325b3c63c77de4aed37e5e650c27bc4cadbe",
             "count_test.jsonl": "b0b0fa879d14bdc0bb408bd3e0013ffac434de3a682f0e03f93e8739111e3533",
             "fewshot_pool.jsonl": "3f269b975722e83ec35aaf8298c8654ba78c0ca4d03783e3192f5321abe735df"},
}


def dm(data, **options) -> SpellingDataModule:
    return SpellingDataModule(str(data), "tiny-qwen3", build_profile=None, **options)


def selected(data, **options):
    return dm(data, **options)._training_rows()


def without_separator(path) -> bytes:
    return "".join(
        json.dumps({k: v for k, v in json.loads(line).items() if k != "separator"}, ensure_ascii=False) + "\n"
        for line in path.read_text(encoding="utf-8").splitlines()
    ).encode()


@pytest.mark.parametrize("profile", ["demo", "full"])
def test_the_build_changed_no_training_row_and_no_evaluation_question(profile, request):
    d = request.getfixturevalue(f"{profile}_data")
    for name, digest in BEFORE[profile].items():
        data = without_separator(d / name) if name == "spelling_train.jsonl" else (d / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name


def test_the_default_pattern_trains_on_every_row_in_file_order_byte_for_byte(demo_data):
    rows = read_jsonl(demo_data / "spelling_train.jsonl")
    chosen = selected(demo_data)
    assert chosen["id"][:] == [r["id"] for r in rows]
    assert chosen["question"][:] == [r["question"] for r in rows] and chosen["answer"][:] == [
        r["answer"] for r in rows
    ]
    module = dm(demo_data, max_length=10_000)
    module.setup("fit")
    expected = tokenize_examples(module.tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows])
    assert module.train_examples["input_ids"][:] == [e["input_ids"] for e in expected]
    assert module.train_examples["labels"][:] == [e["labels"] for e in expected]
    # train_limit still cuts the file's first rows
    assert selected(demo_data, train_limit=7)["id"][:] == [r["id"] for r in rows[:7]]


@pytest.mark.parametrize("preset", VARIANTS)
def test_each_variants_preset_trains_on_exactly_its_subtasks(preset, demo_data):
    rows = read_jsonl(demo_data / "spelling_train.jsonl")
    want = {"spell": {"spell"}, "spell+reversed": {"spell", "spell_reversed"},
            "spell+numbered": {"spell", "spell_numbered"}, "spell+inverse": {"spell", "inverse"},
            "all": {"spell", "spell_reversed", "spell_numbered", "inverse"}}[preset]
    chosen = selected(demo_data, variants=preset)
    assert chosen["id"][:] == [r["id"] for r in rows if r["subtask"] in want]
    # the capitals form is part of `spell`: every preset keeps it
    assert any(a.isupper() for a, s in zip(chosen["answer"][:], chosen["subtask"][:]) if s == "spell")


@pytest.mark.parametrize("style", ["spaces", "commas", "dashes", "dots", "arrows"])
def test_a_separator_keeps_its_style_and_the_rows_without_one(style, demo_data):
    rows = read_jsonl(demo_data / "spelling_train.jsonl")
    chosen = selected(demo_data, separator=style)
    assert chosen["id"][:] == [r["id"] for r in rows if r["separator"] in (style, None)]
    seps = {"spaces": " ", "commas": ", ", "dashes": "-", "dots": ".", "arrows": " -> "}
    for r in (r for r in rows if r["separator"] == style and r["subtask"] != "inverse"):
        assert seps[style].join(re.sub("[^A-Za-z]", "", r["answer"])) == r["answer"], r
    assert all(r["subtask"] == "spell_numbered" for r in rows if r["separator"] is None)


def test_distinct_words_takes_n_words_the_same_n_for_the_same_seed(demo_data):
    words = {n: selected(demo_data, distinct_words=n)["word"][:] for n in (1, 50, 120)}
    assert {n: len(set(w)) for n, w in words.items()} == {1: 1, 50: 50, 120: 120}
    assert set(words[50]) < set(words[120])  # a larger N keeps the smaller N's words
    rows = read_jsonl(demo_data / "spelling_train.jsonl")
    assert len(words[50]) == sum(r["word"] in set(words[50]) for r in rows)  # every row of those words
    assert selected(demo_data, distinct_words=50)["word"][:] == words[50]
    assert set(selected(demo_data, distinct_words=50, seed=1)["word"][:]) != set(words[50])
    # after the other options: N words that still have rows
    assert (
        len(set(selected(demo_data, distinct_words=30, separator="arrows", variants="spell")["word"][:]))
        == 30
    )


def test_the_control_has_the_same_words_row_for_row_and_nothing_spelled(demo_data):
    spelling = read_jsonl(demo_data / "spelling_train.jsonl")
    control = read_jsonl(demo_data / "control_train.jsonl")
    assert [r["word"] for r in control] == [r["word"] for r in spelling]
    assert {r["task"] for r in control} == {"control"} and {r["subtask"] for r in control} == set(
        CONTROL_SUBTASKS
    )
    for r in control:
        # the answer is the whole word, repeated or in another case: never letter by letter
        assert [t.lower() for t in r["answer"].split(" ")] == [r["word"]] * len(r["answer"].split(" ")), r
        assert (
            r["answer"] in (r["word"].upper(), r["word"])
            if r["subtask"] == "case"
            else 2 <= len(r["answer"].split(" ")) <= 3
        )
    manifest = json.loads((demo_data / "manifest.json").read_text())
    assert "control" in manifest["control"] and manifest["rows"]["control_train.jsonl"]["total"] == len(
        spelling
    )
    assert "control" in (demo_data / "README.md").read_text()
    # any pattern's control: the same words, as many rows
    for options in ({}, {"variants": "spell", "distinct_words": 40}, {"separator": "dots"}):
        s, c = selected(demo_data, **options), selected(demo_data, train_set="control", **options)
        assert c["word"][:] == s["word"][:] and set(c["task"][:]) == {"control"}


def test_the_control_is_leak_free_and_its_template_words_are_banned_from_evaluation(demo_data):
    templates = " ".join(t for t, _ in CONTROL_REPEAT + CONTROL_CASE)
    assert {w.lower() for w in re.findall(r"[A-Za-z]+", templates)} <= training_template_words()
    evaluated = {
        r["word"]
        for f in ("position_val", "position_test", "count_val", "count_test", "fewshot_pool")
        for r in read_jsonl(demo_data / f"{f}.jsonl")
    }
    for r in read_jsonl(demo_data / "control_train.jsonl"):
        assert (
            not {t.lower() for t in re.findall(r"[A-Za-z]+", f"{r['question']} {r['answer']}")} & evaluated
        ), r
    assert check_data(str(demo_data)) == 0


def test_a_selection_that_leaves_no_rows_or_too_few_words_names_the_option(demo_data, tmp_path):
    d = tmp_path / "numbered_only"
    shutil.copytree(demo_data, d)
    keep = [
        line for line in (d / "spelling_train.jsonl").read_text().splitlines() if '"spell_numbered"' in line
    ]
    (d / "spelling_train.jsonl").write_text("\n".join(keep) + "\n")
    with pytest.raises(
        SpellxferError, match=r"--data\.variants spell with --data\.separator any leaves no rows"
    ):
        selected(d, variants="spell")
    with pytest.raises(SpellxferError, match=r"--data\.distinct_words 601: the selection has only 600"):
        selected(demo_data, distinct_words=601)
    with pytest.raises(SpellxferError, match=r"--data\.train_set control: .* is not row for row the words"):
        selected(d, train_set="control")


BAD_FLAGS = {
    "variants": (
        ["--data.variants", "spell+capitals"],
        "--data.variants must be one of spell, spell+reversed",
    ),
    "separator": (["--data.separator", "pipes"], "--data.separator must be one of any, spaces"),
    "distinct-words-zero": (["--data.distinct_words", "0"], "--data.distinct_words must be null"),
    "train-set": (["--data.train_set", "position"], "--data.train_set must be one of spelling, control"),
    "distinct-words-too-many": (
        ["--data.distinct_words", "5000"],
        "--data.distinct_words 5000: the selection has only 600",
    ),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_a_bad_pattern_option_is_one_error_line_and_exit_2(case, demo_data, tmp_path):
    flags, words = BAD_FLAGS[case]
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "spellxfer",
            "fit",
            "--config",
            str(REPO / "configs/tiny.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--data.data_dir",
            str(demo_data),
            *flags,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)},
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert words in lines[0], lines[0]


def pattern_space(tmp_path, parameters: dict, fixed: dict | None = None):
    raw = yaml.safe_load((REPO / "configs/sweeps/tiny.yaml").read_text())
    raw["parameters"] = parameters
    raw["fixed"] |= fixed or {}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_sweep_space_varies_the_patterns_and_passes_them_to_fit(tmp_path, monkeypatch):
    from spellxfer.sweep.trial import fit_argv

    monkeypatch.chdir(REPO)
    parameters = {"variants": list(VARIANTS), "separator": ["any", "dots"], "distinct_words": [50, None],
                  "train_set": ["spelling", "control"], "lora_r": [4]}
    space = load_space(pattern_space(tmp_path, parameters, {"data.val_limit": 4}))
    assert space.grid_size() == 5 * 2 * 2 * 2
    study = optuna.create_study(direction="maximize", sampler=make_sampler(space, "grid"))
    drawn = []
    study.optimize(lambda t: drawn.append(space.suggest(t)) or 0.0, n_trials=40)
    assert {(d["variants"], d["separator"], d["distinct_words"], d["train_set"]) for d in drawn} == {
        (v, s, n, t)
        for v in VARIANTS
        for s in ("any", "dots")
        for n in (50, None)
        for t in ("spelling", "control")
    }
    ctx = type("Ctx", (), {"space": space, "wandb": False, "study": "s"})()
    argv = fit_argv(
        ctx, tmp_path / "run", {**drawn[0], "distinct_words": None, "variants": "spell+inverse"}, None, 0
    )
    flags = dict(zip(argv[::1], argv[1::1]))
    assert flags["--data.variants"] == "spell+inverse" and flags["--data.distinct_words"] == "null"
    # fixed values too
    fixed = load_space(
        pattern_space(tmp_path, {"lora_r": [4]}, {"data.variants": "spell", "data.train_set": "control"})
    )
    assert fixed.fixed["data.variants"] == "spell"


BAD_PATTERN_SPACES = {
    "variant-name": (
        {"variants": ["spell", "capitals"]},
        None,
        "parameters.variants",
        "'capitals' is not one of",
    ),
    "variants-range": (
        {"variants": {"low": 1, "high": 2}},
        None,
        "parameters.variants",
        "expected a list of values",
    ),
    "distinct-words-zero": ({"distinct_words": [0, None]}, None, "parameters.distinct_words", "≥ 1 or null"),
    "fixed-separator": (
        {"lora_r": [4]},
        {"data.separator": "pipes"},
        "fixed.data.separator",
        "'pipes' is not one of",
    ),
}


@pytest.mark.parametrize("case", BAD_PATTERN_SPACES)
def test_a_bad_pattern_in_a_space_file_is_one_error_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    parameters, fixed, key, words = BAD_PATTERN_SPACES[case]
    path = pattern_space(tmp_path, parameters, fixed)
    rc = main(["sweep", "--space", str(path), "--study", "bad", "--results_dir", str(tmp_path / "results")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and f"{key}:" in lines[0] and words in lines[0], lines
