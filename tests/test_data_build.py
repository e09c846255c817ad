"""The dataset rules, each recomputed from the written rows (not from the builder's own state)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import read_jsonl

EVAL_FILES = ("position_val.jsonl", "position_test.jsonl", "count_val.jsonl", "count_test.jsonl")
POOL = "fewshot_pool.jsonl"
POS_COUNT_RE = re.compile(r"\b(how many|count|position|letters? (?:is|comes)|length|first appear)\b", re.I)


def eval_words(d: Path) -> dict[str, set[str]]:
    out = {"val": set(), "test": set()}
    for f in EVAL_FILES:
        out[f.split("_")[1].split(".")[0]] |= {r["word"].lower() for r in read_jsonl(d / f)}
    out["pool"] = {r["word"].lower() for r in read_jsonl(d / POOL)}
    return out


@pytest.mark.parametrize("fixture", ["demo_data", "full_data"])
def test_every_answer_is_right(fixture, request):
    d = request.getfixturevalue(fixture)
    for f in (*EVAL_FILES, POOL):
        for r in read_jsonl(d / f):
            w = r["word"]
            assert f"'{w}'" in r["question"], r
            if r["subtask"] == "nth_letter":
                p = r["position"]
                assert p != 0 and abs(p) <= len(w)
                assert r["answer"] == (w[p - 1] if p > 0 else w[p]), r
            elif r["subtask"] == "letter_index":
                assert r["answer"] == str(w.index(r["letter"]) + 1), r
            elif r["subtask"] == "word_length":
                assert r["answer"] == str(len(w)), r
            elif r["subtask"] == "letter_count":
                assert r["answer"] == str(w.lower().count(r["letter"].lower())), r
            else:
                pytest.fail(f"unexpected subtask {r['subtask']}")
            assert r["task"] == ("position" if r["subtask"] in ("nth_letter", "letter_index") else "count")
            assert f == POOL or r["task"] == ("position" if f.startswith("position") else "count")
    for r in read_jsonl(d / "spelling_train.jsonl"):
        letters = re.sub(r"[^a-z]", "", r["answer"].lower())
        w = r["word"]
        expected = {"spell": w, "spell_numbered": w, "spell_reversed": w[::-1], "inverse": w}[r["subtask"]]
        assert letters == expected, r
        if r["subtask"] == "inverse":
            assert re.sub(r"[^a-z]", "", r["question"].split(" ", 3)[-1].lower()).endswith(w) or w in re.sub(
                r"[^a-z]", "", r["question"].lower()
            )


@pytest.mark.parametrize("fixture", ["demo_data", "full_data"])
def test_no_evaluation_word_reaches_training(fixture, request):
    d = request.getfixturevalue(fixture)
    ev = eval_words(d)
    banned = ev["val"] | ev["test"] | ev["pool"]  # pool words are shown at evaluation: never trained on
    train = read_jsonl(d / "spelling_train.jsonl")
    for r in train:
        text = f"{r['question']} {r['answer']}"
        # as a word in any case, with or without a leading space, quoted or not
        assert not {t.lower() for t in re.findall(r"[A-Za-z]+", text)} & banned, r
        # spelled out: the letters of the answer (forward or reversed), whatever the separator
        letters = re.sub(r"[^a-z]", "", r["answer"].lower())
        assert letters not in banned and letters[::-1] not in banned, r
        # spelled out inside the question (inverse rows give the letters, not the word)
        spelled = re.findall(r"(?:\b[A-Za-z]\b(?:\s*(?:->|[,.\-])?\s*)){2,}", r["question"])
        for s in spelled:
            assert re.sub(r"[^a-z]", "", s.lower()) not in banned, r
        assert r["word"] not in banned
        # no position or count question in training
        template_text = r["question"].replace(f"'{r['word']}'", "")  # the spelled word may be "position"
        assert r["task"] == "spelling" and not POS_COUNT_RE.search(template_text), r
    eval_questions = {r["question"] for f in (*EVAL_FILES, POOL) for r in read_jsonl(d / f)}
    assert not eval_questions & {r["question"] for r in train}


@pytest.mark.parametrize("fixture", ["demo_data", "full_data"])
def test_val_test_and_few_shot_pool_words_are_disjoint(fixture, request):
    d = request.getfixturevalue(fixture)
    ev = eval_words(d)
    assert ev["val"] and ev["test"] and ev["pool"]
    assert not ev["val"] & ev["test"] and not ev["pool"] & (ev["val"] | ev["test"])
    train = {r["word"] for r in read_jsonl(d / "spelling_train.jsonl")}
    assert not train & ev["pool"] and not {w[::-1] for w in train} & ev["pool"]
    pool = read_jsonl(d / POOL)  # one solved question per subtask and pool word
    assert Counter(r["subtask"] for r in pool) == {
        s: len(ev["pool"]) for s in ("nth_letter", "letter_index", "word_length", "letter_count")
    }
    p = _cli("data", "check", "--data", str(d))
    assert p.returncode == 0 and "clean" in p.stdout, p.stdout + p.stderr


def test_data_check_flags_a_pool_word_that_is_a_test_word(tmp_path, demo_data):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(demo_data, d)
    test_row = read_jsonl(d / "count_test.jsonl")[3]
    pool = read_jsonl(d / POOL)
    pool[0] = pool[0] | {"word": test_row["word"]}
    (d / POOL).write_text("".join(json.dumps(r) + "\n" for r in pool))
    p = _cli("data", "check", "--data", str(d))
    assert p.returncode == 1, p.stdout + p.stderr
    out = p.stdout.replace("\n", "")
    assert re.search(
        rf"test word '{test_row['word']}' \((position|count)_test.jsonl:[0-9]+\) is also a few-shot "
        r"pool word \(fewshot_pool.jsonl:1\)",
        out,
    ), out


def _best_count_balance(rows: list[dict]) -> float:
    """The lowest largest answer share letter_count can reach with these words: only a word with a
    letter repeated 3+ times can answer above 2, so 0, 1 and 2 share at least the other words."""
    repeated = sum(max(Counter(r["word"]).values()) >= 3 for r in rows)
    return (len(rows) - repeated) / 3 / len(rows)


@pytest.mark.parametrize("fixture", ["demo_data", "full_data"])
def test_no_constant_answer_dominates_a_subtask(fixture, request):
    d = request.getfixturevalue(fixture)
    for f in (*EVAL_FILES, POOL):
        rows = read_jsonl(d / f)
        groups = {"(file)": rows} | {
            s: [r for r in rows if r["subtask"] == s] for s in {r["subtask"] for r in rows}
        }
        for name, g in groups.items():
            top, n = Counter(r["answer"] for r in g).most_common(1)[0]
            limit = 0.20 if name == "letter_index" else 0.40
            if name == "letter_count":  # within two rows of the best these words allow (≈ 26%)
                limit = (math.ceil(_best_count_balance(g) * len(g)) + 2) / len(g)
            assert n / len(g) <= limit, f"{f} {name}: answer {top!r} is {n}/{len(g)}"
        lc = Counter(r["answer"] for r in rows if r["subtask"] == "letter_count")
        if lc and f != POOL:
            three_plus = sum(v for k, v in lc.items() if int(k) >= 3)
            for share in (lc["0"], lc["1"], lc["2"], three_plus):
                assert share / sum(lc.values()) >= 0.10, (f, lc)


@pytest.mark.parametrize("fixture", ["demo_data", "full_data"])
def test_evaluation_words_span_lengths_tokens_and_kinds(fixture, request, qwen_tok):
    d = request.getfixturevalue(fixture)
    for f in EVAL_FILES:
        rows = read_jsonl(d / f)
        lengths = [len(r["word"]) for r in rows]
        assert min(lengths) <= 3 and max(lengths) >= 15, f
        toks = Counter(min(r["n_tokens"], 4) for r in rows)
        assert all(toks[k] > 0 for k in (1, 2, 3, 4)), (f, toks)
        kinds = Counter(r["word_kind"] for r in rows)
        assert kinds["nonce"] / len(rows) >= 0.10, (f, kinds)
    # n_tokens recomputed from the question text with the real tokenizer's offsets
    for r in read_jsonl(d / "position_val.jsonl")[:200]:
        enc = qwen_tok(r["question"], add_special_tokens=False, return_offsets_mapping=True)
        start = r["question"].index(f"'{r['word']}'") + 1
        end = start + len(r["word"])
        assert r["n_tokens"] == sum(1 for s, e in enc["offset_mapping"] if s < end and e > start), r


def test_full_profile_sizes_and_build_time(full_data):
    train = read_jsonl(full_data / "spelling_train.jsonl")
    assert len(train) >= 50_000 and len({r["word"] for r in train}) >= 10_000
    assert set(Counter(r["subtask"] for r in train)) == {
        "spell",
        "spell_reversed",
        "spell_numbered",
        "inverse",
    }
    for task in ("position", "count"):
        assert len(read_jsonl(full_data / f"{task}_val.jsonl")) >= 1_000
        assert len(read_jsonl(full_data / f"{task}_test.jsonl")) >= 5_000


def test_full_build_is_byte_identical(tmp_path, full_data):
    from spellxfer.data.build import build

    build(str(tmp_path / "again"), profile="full", seed=0)
    for f in sorted(p.name for p in full_data.iterdir()):
        assert (tmp_path / "again" / f).read_bytes() == (full_data / f).read_bytes(), f


def test_other_seed_gives_other_data(tmp_path, demo_data):
    from spellxfer.data.build import build

    build(str(tmp_path / "s1"), profile="demo", seed=1)
    assert (tmp_path / "s1" / "count_test.jsonl").read_bytes() != (
        demo_data / "count_test.jsonl"
    ).read_bytes()


def test_manifest_matches_files(demo_data):
    m = json.loads((demo_data / "manifest.json").read_text())
    assert m["profile"] == "demo" and m["seed"] == 0
    for name, digest in m["sha256"].items():
        assert hashlib.sha256((demo_data / name).read_bytes()).hexdigest() == digest
    for name, counts in m["rows"].items():
        rows = read_jsonl(demo_data / name)
        assert counts["total"] == len(rows)
        assert {k: v for k, v in counts.items() if k != "total"} == dict(Counter(r["subtask"] for r in rows))


def test_english_token_subset_artifact(demo_data, qwen_tok):
    art = json.loads((demo_data / "qwen3_english_tokens.json").read_text())
    assert art["n_words"] >= 10_000 and art["n_entries"] == len(art["entries"])
    assert sum(art["counts_by_length"].values()) == art["n_words"]
    by_token = {e[1]: e for e in art["entries"]}
    assert by_token["Ġstrawberry"][0] == 72600 and by_token["Ġstrawberry"][2] == "strawberry"
    for tid, tok, word, space in art["entries"][:2000]:
        assert qwen_tok.convert_ids_to_tokens(tid) == tok
        assert tok.startswith("Ġ") == space and tok.lstrip("Ġ").lower() == word and word.isalpha()
    assert "HTTP" not in {e[1] for e in art["entries"]}  # all-caps entries are not words


SPLITS = ("spelling_train", *(f.removesuffix(".jsonl") for f in EVAL_FILES), "control_train",
          POOL.removesuffix(".jsonl"))


def test_every_row_of_every_file_is_in_the_one_schema(demo_data):
    from spellxfer.data.schema import COLUMNS, row_problem

    for split in SPLITS:
        for r in read_jsonl(demo_data / f"{split}.jsonl"):
            assert row_problem(r) is None, (split, r)
            assert list(r) == [c for c in COLUMNS if c in r], (split, r)  # the schema's order
            # evaluation rows carry every column but `separator`; training and control rows leave
            # the evaluation-only ones out
            training = {*list(COLUMNS)[:6], "separator"}
            assert set(r) == (
                training if r["task"] in ("spelling", "control") else set(COLUMNS) - {"separator"}
            ), (split, r)


def test_every_split_loads_in_one_call_with_the_fixed_features(demo_data, tmp_path):
    from datasets import load_dataset

    from spellxfer.data.schema import FEATURES

    files = {split: str(demo_data / f"{split}.jsonl") for split in SPLITS}
    by_files = load_dataset("json", data_files=files, features=FEATURES, cache_dir=str(tmp_path))
    # the card's header names the files and the Features: the directory alone is enough
    by_card = load_dataset(str(demo_data), cache_dir=str(tmp_path))
    for ds in (by_files, by_card):
        assert list(ds) == list(SPLITS)
        for split in SPLITS:
            assert ds[split].features == FEATURES
            assert ds[split].to_list() == [
                {c: r.get(c) for c in FEATURES} for r in read_jsonl(demo_data / f"{split}.jsonl")
            ]
    assert set(by_card["count_test"]["position"]) == {None}  # null in every count row, still int64
    assert {type(p) for p in by_card["position_test"]["position"]} == {int, type(None)}
    # Without Features the JSON loader types columns from the first file, and no file has every
    # field (`separator` is training-only): the splits load together only with the Features
    first = {"position_val": files.pop("position_val"), **files}
    with pytest.raises(Exception, match="generating the dataset"):
        load_dataset("json", data_files=first, cache_dir=str(tmp_path))
    assert set(by_card["spelling_train"]["task"]) == {"spelling"}


def test_the_dataset_card_lists_every_split_with_its_rows(demo_data, tmp_path):
    from datasets import load_dataset_builder
    from huggingface_hub import DatasetCard

    from spellxfer.data.schema import FEATURES

    card = DatasetCard.load(demo_data / "README.md")
    manifest = json.loads((demo_data / "manifest.json").read_text())
    rows = {split: len(read_jsonl(demo_data / f"{split}.jsonl")) for split in SPLITS}
    [config] = card.data.configs
    assert config["config_name"] == "default"
    assert {f["split"]: f["path"] for f in config["data_files"]} == {s: f"{s}.jsonl" for s in SPLITS}
    assert {s["name"]: s["num_examples"] for s in card.data.dataset_info["splits"]} == rows
    assert card.data.license == "cc-by-sa-4.0"
    # what datasets reads from the header
    info = load_dataset_builder(str(demo_data), cache_dir=str(tmp_path)).info
    assert info.features == FEATURES and {s: i.num_examples for s, i in info.splits.items()} == rows
    text = card.text
    for split, n in rows.items():
        assert re.search(rf"^\| `{split}` \| `{split}.jsonl` \| [^|]+ \| {n:,} \|", text, re.M), split
        assert manifest["rows"][f"{split}.jsonl"]["total"] == n
    assert "(demo, seed 0)" in text and "--profile demo --seed 0" in text
    assert "Trained on spelling, evaluated on position and count only." in text
    assert "wordfreq" in text and "Leak-freedom" in text
    assert "spelling_train_chat" not in text  # no chat export asked for


def test_chat_export_rows_are_the_training_rows_as_messages(tmp_path, demo_data, qwen_tok):
    from datasets import load_dataset

    from spellxfer.data.build import build
    from spellxfer.data.schema import CHAT_FEATURES
    from spellxfer.tasks.chat import format_chat
    from spellxfer.training.datamodule import tokenize_example

    out = tmp_path / "chat"
    build(str(out), profile="demo", seed=0, chat_export=True)
    for f in (*SPLITS, "qwen3_english_tokens"):  # the export adds a file and changes nothing else
        suffix = ".json" if f.startswith("qwen3") else ".jsonl"
        assert (out / f"{f}{suffix}").read_bytes() == (demo_data / f"{f}{suffix}").read_bytes(), f
    train = read_jsonl(out / "spelling_train.jsonl")
    chat = read_jsonl(out / "spelling_train_chat.jsonl")
    assert len(chat) == len(train)
    for r, c in zip(train, chat):  # line N is line N
        assert c == {
            "messages": [
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]},
            ]
        }
    for r, c in list(zip(train, chat))[:50]:
        # rendered with the model's chat template, the conversation is the text the trainer teaches
        ex = tokenize_example(qwen_tok, r["question"], r["answer"])
        assistant = c["messages"][1]["content"]
        assert (
            qwen_tok.decode(ex["input_ids"])
            == format_chat(qwen_tok, c["messages"][:1]) + assistant + "<|im_end|>"
        )
    ds = load_dataset(str(out), "chat", cache_dir=str(tmp_path / "cache"))["spelling_train"]
    assert ds.features == CHAT_FEATURES and ds.num_rows == len(train)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"]["spelling_train_chat.jsonl"] == {"total": len(train)}
    assert (
        hashlib.sha256((out / "spelling_train_chat.jsonl").read_bytes()).hexdigest()
        == manifest["sha256"]["spelling_train_chat.jsonl"]
    )
    assert (
        "| `spelling_train` (config `chat`) | `spelling_train_chat.jsonl` |"
        in (out / "README.md").read_text()
    )


def test_the_schema_table_in_docs_is_the_schema():
    from spellxfer.data.schema import COLUMNS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    table = doc.split("## Schema", 1)[1].split("\n## ", 1)[0]
    documented = dict(re.findall(r"^\| `(\w+)` \| (\w+) \|", table, re.M))
    assert documented == {name: dtype for name, (dtype, _) in COLUMNS.items()}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spellxfer", *args], capture_output=True, text=True)


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path):
    out = tmp_path / "d"
    p = _cli("data", "build", "--out", str(out), "--profile", "huge")
    assert p.returncode == 2 and "profile" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    p = _cli("data", "build", "--out", str(out))
    assert p.returncode == 2 and "not empty" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert [f.name for f in out.iterdir()] == ["keep.txt"]

    (tmp_path / "file").write_text("x")
    p = _cli("data", "build", "--out", str(tmp_path / "file"))
    assert p.returncode == 2 and "not a directory" in p.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["d", "file"]  # no temp dirs left behind


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    from spellxfer.data import build as B

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(B, "write_json", boom)
    with pytest.raises(RuntimeError):
        B.build(str(tmp_path / "out"), profile="demo")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(tmp_path, demo_data):
    out = tmp_path / "d"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    p = _cli("data", "build", "--out", str(out), "--overwrite", "true")
    assert p.returncode == 0, p.stderr
    assert not (out / "stale.txt").exists()
    assert (out / "count_val.jsonl").read_bytes() == (demo_data / "count_val.jsonl").read_bytes()
