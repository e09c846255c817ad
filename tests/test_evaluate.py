"""`evaluate` end to end with the real embedded model, plus the engine, the CLI errors and `compare`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, read_jsonl

from spellxfer.cli import main
from spellxfer.evaluation.compare import compare_predictions
from spellxfer.evaluation.stats import wilson_interval
from spellxfer.models.generation import GenerationEngine, Sampling, default_sampling
from spellxfer.tasks.parsing import score


@pytest.fixture(scope="module")
def smollm2():
    from spellxfer.models.registry import load_model, load_tokenizer

    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_run(demo_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "base"
    rc = main(
        [
            "evaluate",
            "--model",
            "smollm2-135m",
            "--questions",
            str(demo_data / "position_val.jsonl"),
            str(demo_data / "count_val.jsonl"),
            "--limit",
            "30",
            "--decoding",
            "greedy",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    return out


def test_predictions_rescore_to_the_reported_accuracy(smollm2_run, demo_data):
    preds = read_jsonl(smollm2_run / "predictions.jsonl")
    metrics = json.loads((smollm2_run / "metrics.json").read_text())
    assert len(preds) == 60 and {p["task"] for p in preds} == {"position", "count"}
    gold = {r["id"]: r for f in ("position_val.jsonl", "count_val.jsonl") for r in read_jsonl(demo_data / f)}
    for task in ("position", "count"):
        rows = [p for p in preds if p["task"] == task]
        # re-score from the raw reply alone, by the documented rule, against the question file's gold
        correct = sum(score(p["output"], gold[p["id"]]["answer"])[1] for p in rows)
        assert metrics[f"{task}_accuracy"] == correct / len(rows)  # exact: no float32 noise (0.1000000015)
        assert metrics[f"{task}_accuracy_n"] == len(rows) == 30
        lo, hi = wilson_interval(correct, len(rows))
        assert (metrics[f"{task}_accuracy_ci_low"], metrics[f"{task}_accuracy_ci_high"]) == pytest.approx(
            (lo, hi)
        )
    assert metrics["transfer_score"] == pytest.approx(
        (metrics["position_accuracy"] + metrics["count_accuracy"]) / 2
    )
    assert metrics["ci_method"] == "wilson"
    # raw replies: real text from the real model, end-of-turn marker kept, prompt not included
    assert all(p["output"].endswith("<|im_end|>") for p in preds if len(p["output"]) < 200)
    assert not any("<|im_start|>" in p["output"] for p in preds)
    # the exact prompt, and the probe's verdict re-derived from its own fields
    for p in preds:
        assert p["prompt"].endswith(p["question"] + "<|im_end|>\n<|im_start|>assistant\n")
        assert p["likelihood_prompt"].startswith(p["prompt"]) and p["likelihood_prompt"].endswith('"')
        assert p["likelihood_correct"] == (p["likelihood_answer"] == p["answer"])
        assert p["gold_rank"] == 1 or not p["likelihood_correct"]
    for task in ("position", "count"):
        rows = [p for p in preds if p["task"] == task]
        assert metrics[f"{task}_likelihood_accuracy"] == pytest.approx(
            sum(p["likelihood_correct"] for p in rows) / len(rows)
        )


def test_metrics_carry_subtasks_breakdowns_baselines_and_run_info(smollm2_run):
    m = json.loads((smollm2_run / "metrics.json").read_text())
    assert set(m["subtasks"]) == {"position/nth_letter", "position/letter_index", "count/word_length",
                                  "count/letter_count"}
    for v in m["subtasks"].values():
        assert 0 <= v["ci_low"] <= v["accuracy"] <= v["ci_high"] <= 1 and 0 < v["majority_baseline"] < 1
    assert m["scoring"] == "both"  # the default: generation and the likelihood probe
    for v in m["subtasks"].values():
        lk, best = v["likelihood"], v["best_trivial"]
        assert 0 <= lk["ci_low"] <= lk["accuracy"] <= lk["ci_high"] <= 1 and lk["n"] == v["n"]
        assert lk["gold_mean_rank"] >= 1 and lk["gold_mean_logprob"] < 0
        assert (
            lk["constant_answer"] == (lk["top_answers"][0][1] > 0.5)
            and sum(x for _, x in lk["top_answers"]) <= 1
        )
        assert best["accuracy"] == max(v["trivial_baselines"].values()) >= v["majority_baseline"]
        assert v["beats_trivial"] == (v["ci_low"] > best["accuracy"]) and lk["beats_trivial"] == (
            lk["ci_low"] > best["accuracy"]
        )
        d = v["diagnostics"]
        assert sum(d["formats"].values()) == v["n"] and 0 <= d["no_answer_rate"] <= 1
    assert "first_letter" in m["subtasks"]["position/nth_letter"]["trivial_baselines"]
    assert "always_1" in m["subtasks"]["position/letter_index"]["trivial_baselines"]
    assert set(m["breakdowns"]) == {"word_length", "n_tokens", "word_kind", "letter_position"}
    assert sum(b["n"] for b in m["breakdowns"]["word_kind"]["count"].values()) == 30
    assert set(m["breakdowns"]["letter_position"]) == {"position"}  # only nth_letter rows carry a position
    run = m["run"]
    assert run["model"] == "smollm2-135m" and run["sampling"]["decoding"] == "greedy"
    # greedy decoding records no sampling knobs it never used
    assert not {"temperature", "top_p", "top_k", "min_p"} & set(run["sampling"])
    # timing is recorded, not judged: speed belongs to `bench eval`, not to a test on a shared machine
    assert run["seconds"] > 0 and run["items_per_second"] > 0 and run["n_items"] == 60
    # the call's parts: loading, generation and the probe all lie within its wall time
    parts = run["load_seconds"] + run["seconds"] + run["likelihood"]["seconds"]
    assert 0 < run["load_seconds"] and parts <= run["wall_seconds"] + 0.02  # each rounded to 0.01 s
    assert run["kept_base_model"] is False  # built for this call (a pack's later calls reuse theirs)
    # only position / count metrics: no key anywhere mentions spelling
    assert "spell" not in json.dumps({k: v for k, v in m.items() if k != "run"})


def test_batched_greedy_equals_one_prompt_at_a_time(smollm2, demo_data):
    model, tok = smollm2
    qs = [r["question"] for r in read_jsonl(demo_data / "count_val.jsonl")[:6]]
    greedy = default_sampling(decoding="greedy", max_new_tokens=16)
    batched = GenerationEngine(model, tok, greedy, batch_size=6).generate(qs)
    single = GenerationEngine(model, tok, greedy, batch_size=1).generate(qs)
    assert batched == single


def test_sampling_is_seeded_and_k_samples_use_item_bootstrap(demo_data, tmp_path):
    out = tmp_path / "k2"
    args = [
        "evaluate",
        "--model",
        "tiny-qwen3",
        "--questions",
        str(demo_data / "count_val.jsonl"),
        "--limit",
        "8",
        "--samples",
        "2",
        "--max_new_tokens",
        "4",
        "--seed",
        "7",
    ]
    assert main([*args, "--out", str(out)]) == 0
    preds = read_jsonl(out / "predictions.jsonl")
    assert len(preds) == 16 and sorted({p["sample"] for p in preds}) == [0, 1]
    assert json.loads((out / "metrics.json").read_text())["ci_method"] == "item_bootstrap"
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    assert [p["output"] for p in read_jsonl(tmp_path / "again" / "predictions.jsonl")] == [
        p["output"] for p in preds
    ]


def test_csv_with_other_column_names(tmp_path):
    csv = tmp_path / "mine.csv"
    csv.write_text(
        "prompt,gold,note\nHow many letters are in 'cat'?,3,x\nHow many r's in 'strawberry'?,3,y\n"
    )
    out = tmp_path / "out"
    rc = main(
        [
            "evaluate",
            "--model",
            "tiny-qwen3",
            "--questions",
            str(csv),
            "--task",
            "count",
            "--question_field",
            "prompt",
            "--answer_field",
            "gold",
            "--decoding",
            "greedy",
            "--max_new_tokens",
            "3",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    preds = read_jsonl(out / "predictions.jsonl")
    assert [(p["task"], p["answer"], p["question"][:9]) for p in preds] == [("count", "3", "How many ")] * 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["count_accuracy_n"] == 2 and "position_accuracy" not in m
    assert m["files"] == {str(csv): {"count": m["files"][str(csv)]["count"]}}


def _rows(correct: list[bool], task="count", sub="word_length") -> list[dict]:
    return [{"file": "/x/count_val.jsonl", "id": f"i{i}", "task": task, "subtask": sub, "correct": c}
            for i, c in enumerate(correct)]


def test_compare_reports_known_difference(tmp_path):
    base = _rows([True] * 10 + [False] * 30)
    tuned = _rows([True] * 10 + [True] * 20 + [False] * 10)
    c = compare_predictions(base, tuned)
    g = c["groups"]["count"]
    assert (g["acc_a"], g["acc_b"], g["diff"], g["b_only"], g["a_only"]) == (0.25, 0.75, 0.5, 20, 0)
    assert g["mcnemar_p"] == pytest.approx(2 * 0.5**20) and 0 < g["ci_low"] < 0.5 < g["ci_high"]
    assert c["groups"]["count/word_length"]["diff"] == 0.5 and c["n_common_items"] == 40
    # the CLI command reads two evaluate directories and writes the same numbers
    for name, rows in (("a", base), ("b", tuned)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["compare", "--base", str(tmp_path / "a"), "--other", str(tmp_path / "b"),
                 "--out", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["groups"]["count"]["diff"] == 0.5


def test_compare_to_in_evaluate(smollm2_run, demo_data, tmp_path):
    out = tmp_path / "tiny"
    assert (
        main(
            [
                "evaluate",
                "--model",
                "tiny-qwen3",
                "--questions",
                str(demo_data / "position_val.jsonl"),
                str(demo_data / "count_val.jsonl"),
                "--limit",
                "30",
                "--decoding",
                "greedy",
                "--max_new_tokens",
                "4",
                "--out",
                str(out),
                "--compare_to",
                str(smollm2_run),
            ]
        )
        == 0
    )
    c = json.loads((out / "compare.json").read_text())
    assert c["n_common_items"] == 60 and set(c["groups"]) >= {"position", "count"}
    report = (out / "compare.md").read_text()
    assert "evaluated on position and count only" in report
    assert re.search(rf"\| position \| {c['groups']['position']['acc_a']:.3f}( ✗)? \|", report)
    assert "## Likelihood probe" in report and c["likelihood_groups"]["count"]["n"] == 30
    base = json.loads((smollm2_run / "metrics.json").read_text())
    assert c["groups"]["position"]["acc_a"] == pytest.approx(base["position_accuracy"])


def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "spellxfer", *args], capture_output=True, text=True, cwd=REPO, env=env
    )


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "no such file"),
        ("", "empty"),
        (
            '{"task": "count", "question": "How many letters in \'cat\'?", "answer": "three"}\n',
            ":1: count answer",
        ),
        ('{"task": "count", "question": "Q?", "answer": "3"}\n{"task": "count", "question": "Q2?"}\n', ":2:"),
    ],
)
def test_bad_question_file_is_one_line_exit_2_no_output(tmp_path, content, expected):
    f = tmp_path / "q.jsonl"
    if content is not None:
        f.write_text(content)
    p = _cli("evaluate", "--model", "tiny-qwen3", "--questions", str(f), "--out", str(tmp_path / "out"))
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and expected in p.stderr.lower()
    assert not (tmp_path / "out").exists()


def test_unknown_model_fails_before_loading(tmp_path, demo_data):
    p = _cli("evaluate", "--model", "no-such-model", "--questions", str(demo_data / "count_val.jsonl"),
             "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "unknown model 'no-such-model'" in p.stderr and not (tmp_path / "o").exists()


def test_sampling_defaults_are_the_users_and_the_docs_say_so():
    s = default_sampling()
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.decoding) == (0.6, 0.95, 20, 0.0, "sampled")
    guide = (REPO / "docs/qwen3_guide.md").read_text()
    # ours (used) beside Qwen's non-thinking recommendation (documented only)
    for row in ("| temperature | 0.6 | 0.7 |", "| top-p | 0.95 | 0.8 |", "| top-k | 20 | 20 |"):
        assert row in guide
    with pytest.raises(Exception, match="top_p"):
        Sampling(top_p=1.5)


def test_evaluate_in_process_leaves_no_model_behind(demo_data, tmp_path):
    """A pack scores trial after trial with ``evaluate`` in its own process: each call's model, with
    its KV cache and graphs, must be freed when the call returns, or the card fills (it did: the
    static decoder's registry kept every evaluated model alive)."""
    import gc
    import warnings

    from transformers import PreTrainedModel

    from spellxfer.evaluation.evaluate import evaluate

    def live_models() -> set[int]:
        gc.collect()
        with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op warns
            warnings.simplefilter("ignore", FutureWarning)
            return {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel)}

    before = live_models()
    for decoding in ("greedy", "sampled"):
        rc = evaluate(
            model="tiny-qwen3",
            questions=[str(demo_data / "position_val.jsonl"), str(demo_data / "count_val.jsonl")],
            out=str(tmp_path / decoding),
            limit=6,
            decoding=decoding,
            scoring="both",
        )
        assert rc == 0
        assert (tmp_path / decoding / "predictions.jsonl").exists()
    assert live_models() - before == set()


@pytest.mark.parametrize("share", ["2", "0", "half"])
def test_a_bad_memory_share_is_one_line_exit_2_naming_the_variable(tmp_path, demo_data, share):
    """A pack hands its scorer processes their share of the card in SPELLXFER_CUDA_MEMORY_FRACTION;
    a value outside (0, 1] is refused before a model loads, naming the variable."""
    p = _cli("evaluate", "--model", "tiny-qwen3", "--questions", str(demo_data / "count_val.jsonl"),
             "--out", str(tmp_path / "o"), "--limit", "2",
             env_extra={"SPELLXFER_CUDA_MEMORY_FRACTION": share})
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert f"SPELLXFER_CUDA_MEMORY_FRACTION='{share}'" in p.stderr and not (tmp_path / "o").exists()


def test_a_kept_base_model_scores_each_adapter_as_a_fresh_load_does(demo_data, tmp_path, monkeypatch):
    """A pack scores trial after trial in its own process with one kept base model
    (``keeping_base_models``): each call puts its adapter on and takes it off again, so replies and
    probe answers are those of a separate load — for adapters of other ranks and target modules, for
    the base alone between them, and after an adapter that failed half-loaded (the kept model is
    dropped then, not reused)."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    import spellxfer.evaluation.evaluate as ev
    from spellxfer.models import static_decode
    from spellxfer.models.registry import load_model

    def adapter(name: str, r: int, targets: list[str], seed: int) -> str:
        torch.manual_seed(seed)  # nonzero B as well: an adapter that changes the replies
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        get_peft_model(load_model("tiny-qwen3"), config).save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    a = adapter("a", 4, ["q_proj", "v_proj"], 1)
    b = adapter("b", 8, ["q_proj", "k_proj", "gate_proj"], 2)
    broken = tmp_path / "broken"  # its config says rank 8, its tensors are rank 4: PEFT fails mid-load
    shutil.copytree(a, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))

    kept_flags = []

    def scores(tag: str, adapters: list) -> list[list[tuple]]:
        out = []
        for i, ad in enumerate(adapters):
            d = tmp_path / f"{tag}{i}"
            questions = [str(demo_data / "position_val.jsonl"), str(demo_data / "count_val.jsonl")]
            kwargs = dict(model="tiny-qwen3", questions=questions, out=str(d), adapter=ad, limit=4,
                          decoding="greedy", scoring="both")
            if ad == str(broken):
                with pytest.raises(ev.SpellxferError, match="cannot load onto tiny-qwen3"):
                    ev.evaluate(**kwargs)
                continue
            assert ev.evaluate(**kwargs) == 0
            rows = read_jsonl(d / "predictions.jsonl")
            kept_flags.append(json.loads((d / "metrics.json").read_text())["run"]["kept_base_model"])
            out.append([(p["output"], p["likelihood_answer"], p["gold_logprob"]) for p in rows])
        return out

    fresh = scores("fresh", [None, a, b])
    assert fresh[0] != fresh[1] != fresh[2]  # each adapter changes what the model says

    loads = []
    load_model_once = ev.load_model
    monkeypatch.setattr(ev, "load_model", lambda *a, **kw: loads.append(a) or load_model_once(*a, **kw))
    with ev.keeping_base_models():
        kept = scores("kept", [None, a, b, None, a])
        assert kept == [fresh[0], fresh[1], fresh[2], fresh[0], fresh[1]]
        assert len(loads) == 1  # one base model for all five calls
        assert kept_flags[3:] == [False, True, True, True, True]  # and each records it
        (base, _tokenizer), = ev._kept().values()
        assert not any(isinstance(m, LoraLayer) for m in base.modules())  # each adapter came off
        assert base not in static_decode._DECODERS  # and the decoder's cache and graphs went
        after_failure = scores("after", [str(broken), b, a])
        assert after_failure == [fresh[2], fresh[1]]
        assert len(loads) == 2  # the half-wrapped model was dropped and built again
    scores("outside", [a])
    assert len(loads) == 3  # outside the block nothing is kept
