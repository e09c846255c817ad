"""The likelihood probe, trivial baselines, answer diagnostics and few-shot prompts, with the real
Qwen3 tokenizer and the random tiny Qwen3 (and SmolLM2's real tokenizer and weights where noted)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_jsonl

from spellxfer.cli import main
from spellxfer.evaluation.baselines import best_trivial, trivial_baselines
from spellxfer.evaluation.compare import compare_predictions, comparison_markdown
from spellxfer.evaluation.diagnostics import answer_diagnostics, reply_format
from spellxfer.evaluation.evaluate import score_items, summarise
from spellxfer.evaluation.fewshot import conversation, load_pool
from spellxfer.evaluation.likelihood import (
    GENERIC_FRAME,
    LikelihoodScorer,
    answer_frame,
    candidate_answers,
    probe_items,
    rank_answers,
)
from spellxfer.tasks.chat import chat_token_ids, plain_token_ids
from spellxfer.tasks.questions import load_questions


@pytest.fixture(scope="module")
def tiny():
    from spellxfer.models.registry import load_model, load_tokenizer

    return load_model("tiny-qwen3"), load_tokenizer("tiny-qwen3")


def _direct(model, prefix: list[int], cont: list[int]) -> float:
    """log P(cont | prefix) from one forward of the full sequence, alone."""
    with torch.inference_mode():
        lp = model(input_ids=torch.tensor([prefix + cont])).logits[0].float().log_softmax(-1)
    return sum(float(lp[len(prefix) - 1 + i, t]) for i, t in enumerate(cont))


@pytest.mark.parametrize("path", ["static", "eager"])
def test_probe_equals_each_full_sequence_scored_alone(tiny, demo_data, path):
    model, tok = tiny
    items = load_questions([demo_data / "position_val.jsonl", demo_data / "count_val.jsonl"], limit=3)
    convs = [[{"role": "user", "content": it.question}] for it in items]
    prefixes = [ids + plain_token_ids(tok, answer_frame(it.subtask, it.meta))
                for ids, it in zip(chat_token_ids(tok, convs), items)]
    conts = [
        [
            tok(text, add_special_tokens=False)["input_ids"]
            for _, text in candidate_answers(it.kind, it.answer)
        ]
        for it in items
    ]
    # batches of 4 mix prefix lengths and letter / integer candidate sets (31 vs 52, 1–2 fed tokens)
    scores = LikelihoodScorer(model, tok, batch_size=4, path=path).score(prefixes, conts)
    for p, cs, got in zip(prefixes, conts, scores):
        assert len(got) == len(cs)
        for c, value in zip(cs, got):
            assert value == pytest.approx(_direct(model, p, c), abs=1e-4)


def test_probe_results_follow_the_candidate_rule(tiny, demo_data):
    model, tok = tiny
    items = load_questions([demo_data / "position_val.jsonl"], limit=6)
    results, prompts, _, scorer = probe_items(
        model, tok, items, [[{"role": "user", "content": it.question}] for it in items]
    )
    assert scorer.path == "static"
    for it, r, prompt in zip(items, results, prompts):
        frame = answer_frame(it.subtask, it.meta)
        assert prompt.endswith("<think>\n\n</think>\n\n" + frame) and frame != GENERIC_FRAME
        cands = candidate_answers(it.kind, it.answer)
        if it.kind == "letter":
            assert r.answer.isalpha() and r.answer.islower() and len(cands) == 52
        else:
            assert 0 <= int(r.answer) <= max(30, int(it.answer)) and len(cands) == max(30, int(it.answer)) + 1
        assert r.correct == (r.answer == it.answer) and 1 <= r.gold_rank <= (
            26 if it.kind == "letter" else len(cands)
        )


def test_a_letter_keeps_its_better_form_and_ranks_count_strictly_better():
    cands = candidate_answers("letter", "c")
    assert cands[:4] == [("a", 'a"'), ("a", 'A"'), ("b", 'b"'), ("b", 'B"')]
    lps = [-10.0] * 52
    lps[2 * 2 + 1] = -1.0  # 'C"' beats everything; 'c"' stays low
    lps[2 * 4] = -2.0  # 'e"'
    r = rank_answers("letter", "c", lps)
    assert (r.answer, r.correct, r.gold_logprob, r.gold_rank) == ("c", True, -1.0, 1)
    r = rank_answers("letter", "e", lps)
    assert (r.answer, r.correct, r.gold_logprob, r.gold_rank) == ("c", False, -2.0, 2)
    assert [a for a, _ in candidate_answers("integer", "42")] == [str(i) for i in range(43)]


def test_frames_name_the_word_letter_and_position():
    assert answer_frame("nth_letter", {"word": "cat", "position": 3}) == "The 3rd letter of 'cat' is \""
    assert answer_frame("nth_letter", {"word": "cat", "position": -1}) == "The last letter of 'cat' is \""
    assert (
        answer_frame("letter_index", {"word": "cat", "letter": "a"})
        == "The first 'a' in 'cat' is at position \""
    )
    assert answer_frame("word_length", {"word": "cat"}) == "The number of letters in 'cat' is \""
    assert (
        answer_frame("letter_count", {"word": "cat", "letter": "a"})
        == "The number of times 'a' appears in 'cat' is \""
    )
    assert answer_frame(None, {"word": "cat"}) == answer_frame("word_length", {}) == GENERIC_FRAME


def test_trivial_baselines_on_known_answers():
    rows = [{"answer": a, "subtask": "letter_index"} for a in "1112345"] + \
           [{"answer": w[0], "subtask": "nth_letter", "word": w} for w in ("cat", "cow", "dog")] + \
           [{"answer": "a", "subtask": "nth_letter", "word": "bat"}]
    b = trivial_baselines(rows)
    # majority "1" for all 11; best constant per subtask: "1" (3 of 7) + "c" (2 of 4)
    assert b["majority"] == pytest.approx(3 / 11) and b["best_constant"] == pytest.approx(5 / 11)
    assert b["first_letter"] == pytest.approx((3 + 3) / 11)  # 3 first letters + letter_index's constant "1"
    assert b["always_1"] == pytest.approx((3 + 2) / 11)
    assert best_trivial(b) == {"name": "first_letter", "accuracy": pytest.approx(6 / 11)}
    # a user's file without subtasks: one constant per answer type
    assert trivial_baselines([{"answer": a} for a in ("3", "3", "4", "x", "y", "x")])[
        "best_constant"
    ] == pytest.approx(4 / 6)


def test_reply_formats():
    q = "What is the 3rd letter of the word 'strawberry'? Reply with just the letter."
    cases = {
        "R.<|im_end|>": "bare",
        "**3**": "bare",
        "The third letter is r.": "sentence",
        "S-T-R-A-W-B-E-R-R-Y": "letter_by_letter",
        "1. s\n2. t\n3. r": "letter_by_letter",
        "'Strawberry'": "echoed",
        "What is the 3rd letter of the word 'strawberry'?": "echoed",
        "": "other",
        "3 3": "other",
    }
    assert {reply: reply_format(reply, None, q) for reply in cases} == cases


def test_planted_always_1_is_flagged_constant_and_does_not_beat_its_baseline(demo_data, tmp_path):
    items = [it for it in load_questions([demo_data / "position_test.jsonl"]) if it.subtask == "letter_index"]
    predictions = list(score_items(items, [["1<|im_end|>"] for _ in items]))
    m = summarise(items, predictions)
    g = m["subtasks"]["position/letter_index"]
    share_1 = sum(it.answer == "1" for it in items) / len(items)
    assert g["accuracy"] == pytest.approx(share_1) == g["trivial_baselines"]["always_1"]
    assert g["diagnostics"]["constant_answer"] and g["diagnostics"]["top_answers"][0] == ["1", 1.0]
    assert g["diagnostics"]["formats"]["bare"] == len(items) and g["diagnostics"]["no_answer_rate"] == 0
    assert g["best_trivial"]["accuracy"] >= g["accuracy"] and g["beats_trivial"] is False
    assert m["files"][str(demo_data / "position_test.jsonl")]["position"]["beats_trivial"] is False
    # the paired comparison says the same of the planted run
    c = compare_predictions(predictions, predictions)
    assert c["groups"]["position/letter_index"]["b_beats_trivial"] is False
    assert re.search(r"\| position/letter_index \| [0-9.]+ ✗ \| [0-9.]+ ✗ \|", comparison_markdown(c))


def test_evaluate_both_scorers_on_a_file_from_elsewhere(tmp_path):
    f = tmp_path / "mine.jsonl"
    rows = [{"question": "How many letters are in 'cat'?", "answer": 3, "task": "count"},
            {"question": "How many letters are in 'horse'?", "answer": "5", "task": "count"},
            {"question": "Which letter does 'dog' start with?", "answer": "d", "task": "position"},
            {"question": "Where is the first 'o' in 'dog'?", "answer": "2", "task": "position"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert (
        main(
            [
                "evaluate",
                "--model",
                "tiny-qwen3",
                "--questions",
                str(f),
                "--scoring",
                "both",
                "--decoding",
                "greedy",
                "--max_new_tokens",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert (
        m["scoring"] == "both"
        and m["count_likelihood_accuracy_n"] == 2 == m["position_likelihood_accuracy_n"]
    )
    for task in ("count", "position"):
        entry = m["files"][str(f)][task]
        assert set(entry["trivial_baselines"]) == {"majority", "best_constant"}
        assert 0 <= entry["likelihood"]["accuracy"] <= 1 and entry["likelihood"]["n"] == 2
        assert entry["best_trivial"]["accuracy"] == max(entry["trivial_baselines"].values())
        assert set(entry["diagnostics"]["formats"]) == {
            "bare",
            "sentence",
            "letter_by_letter",
            "echoed",
            "other",
        }
    # position mixes a letter and an integer answer: the best constant per answer type gets both
    assert m["files"][str(f)]["position"]["trivial_baselines"] == {"majority": 0.5, "best_constant": 1.0}
    preds = read_jsonl(out / "predictions.jsonl")
    for p in preds:
        assert p["likelihood_prompt"] == p["prompt"] + GENERIC_FRAME  # no subtask: the generic frame
        assert p["likelihood_correct"] == (p["likelihood_answer"] == p["answer"]) and p["gold_logprob"] < 0
        assert p["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_likelihood_only_run_compares_on_the_probe(demo_data, tmp_path):
    args = [
        "evaluate",
        "--model",
        "tiny-qwen3",
        "--questions",
        str(demo_data / "count_val.jsonl"),
        "--limit",
        "6",
    ]
    assert main([*args, "--scoring", "likelihood", "--out", str(tmp_path / "a")]) == 0
    preds = read_jsonl(tmp_path / "a" / "predictions.jsonl")
    assert len(preds) == 6 and all(p["correct"] is None and p["output"] is None for p in preds)
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert "count_accuracy" not in m and "count_likelihood_accuracy" in m
    assert main([*args, "--scoring", "likelihood", "--shots", "1", "--out", str(tmp_path / "b"),
                 "--compare_to", str(tmp_path / "a")]) == 0
    c = json.loads((tmp_path / "b" / "compare.json").read_text())
    assert c["groups"] == {} and c["likelihood_groups"]["count"]["n"] == 6


def test_few_shot_turns_come_from_the_pool_of_the_same_subtask(demo_data):
    items = load_questions([demo_data / "position_test.jsonl", demo_data / "count_test.jsonl"])
    pool = load_pool(str(demo_data / "fewshot_pool.jsonl"), items, 3)
    pool_rows = {r["question"]: r for r in read_jsonl(demo_data / "fewshot_pool.jsonl")}
    for it in items[::25]:
        turns = conversation(it, pool, 3)
        assert [t["role"] for t in turns] == ["user", "assistant"] * 3 + ["user"] and turns[-1][
            "content"
        ] == it.question
        for q, a in zip(turns[0:6:2], turns[1:6:2]):
            assert (
                pool_rows[q["content"]]["subtask"] == it.subtask
                and a["content"] == pool_rows[q["content"]]["answer"]
            )
        assert turns == conversation(it, pool, 3)  # the same item always gets the same examples
    assert conversation(items[0], None, 0) == [{"role": "user", "content": items[0].question}]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spellxfer", *args], capture_output=True, text=True, cwd=REPO
    )


def test_a_pool_that_shares_a_word_with_the_questions_is_refused(demo_data, tmp_path):
    test = read_jsonl(demo_data / "count_test.jsonl")
    pool = read_jsonl(demo_data / "fewshot_pool.jsonl")
    pool[2] = pool[2] | {"word": test[0]["word"]}
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    p = _cli(
        "evaluate",
        "--model",
        "tiny-qwen3",
        "--questions",
        str(demo_data / "count_test.jsonl"),
        "--shots",
        "2",
        "--shot_pool",
        str(tmp_path / "pool.jsonl"),
        "--out",
        str(tmp_path / "out"),
    )
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"pool.jsonl:3: few-shot example word '{test[0]['word']}' is also evaluated" in p.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "q.jsonl").write_text(
        '{"question": "How many letters in \'cat\'?", "answer": 3, "task": "count"}\n'
    )
    p = _cli("evaluate", "--model", "tiny-qwen3", "--questions", str(tmp_path / "q.jsonl"), "--shots", "1",
             "--out", str(tmp_path / "out"))
    assert (
        p.returncode == 2 and "--shots needs a few-shot pool" in p.stderr and not (tmp_path / "out").exists()
    )
    p = _cli(
        "evaluate",
        "--model",
        "tiny-qwen3",
        "--questions",
        str(tmp_path / "q.jsonl"),
        "--scoring",
        "both",
        "--out",
        str(tmp_path / "out"),
    )
    assert p.returncode == 0, p.stderr
    (tmp_path / "big.jsonl").write_text('{"question": "How many?", "answer": 5000, "task": "count"}\n')
    p = _cli(
        "evaluate",
        "--model",
        "tiny-qwen3",
        "--questions",
        str(tmp_path / "big.jsonl"),
        "--scoring",
        "both",
        "--out",
        str(tmp_path / "big"),
    )
    assert p.returncode == 2 and "big.jsonl:1: answer 5000 is above the likelihood probe's limit" in p.stderr


def test_diagnostics_count_every_sample():
    rows = [
        {"output": o, "parsed": p} for o, p in (("3", "3"), ("3", "3"), ("I think 4.", "4"), ("hm", None))
    ]
    d = answer_diagnostics(rows)
    assert d["no_answer_rate"] == 0.25 and d["top_answers"] == [["3", 0.5], ["4", 0.25]]
    assert d["constant_answer"] is False  # exactly half is not more than half
    assert d["formats"] == {"bare": 2, "sentence": 1, "letter_by_letter": 0, "echoed": 0, "other": 1}
