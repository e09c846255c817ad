"""A synthetic sweep in the sweep/analysis contract's layout, with effects planted (for tests).

Real files, as ``sweep`` writes them: ``<study>/base/<decoding>/predictions.jsonl``, and per
trial ``trial.json``, ``fit.yaml``, ``metrics.jsonl`` and ``eval/<decoding>/`` with
``predictions.jsonl`` and ``metrics.json``. Verdicts are Bernoulli draws from planted per-run
accuracies:

- position accuracy rises by ``SLOPE`` per doubling of ``lora_r`` (plus a run-level latent skill);
- count accuracy follows the same latent skill with correlation ``RHO`` and ignores ``lora_r``;

so an analysis should find ``lora_r`` as the top hyperparameter for position accuracy with a
slope near ``SLOPE``, and position and count correlated across runs. Two more trials failed or
were pruned and have no evaluation; trial 0's log carries one metric the whitelist forbids.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

SLOPE = 0.08  # position accuracy per doubling of lora_r
RHO = 0.8  # correlation of the latent skills behind position and count
BASE = {"position": 0.20, "count": 0.15}
SUBTASKS = {"position": ("nth_letter", "letter_index"), "count": ("word_length", "letter_count")}
FORBIDDEN_KEY = "val/spelling_accuracy"  # spellxfer-check: allow (planted to prove it is dropped)


def _items(n_per_task: int, rng: np.random.Generator) -> list[dict]:
    letters = list("abcdefghijklmnopqrstuvwxyz")
    rows = []
    for task, subs in SUBTASKS.items():
        for i in range(n_per_task):
            sub = subs[i % 2]
            word = "".join(rng.choice(letters, int(rng.integers(3, 16))))
            letter = str(rng.choice(list(word))) if sub in ("letter_index", "letter_count") else None
            position = int(rng.choice([0, 1, 2, 3, 5, 8, -1, -2])) if task == "position" else None
            if position is not None and position >= len(word):
                position = -1
            answer = {
                "nth_letter": word[position] if position is not None else "",
                "letter_index": str(word.index(letter or "a") + 1 if letter else 1),
                "word_length": str(len(word)),
                "letter_count": str(word.count(letter or "")),
            }[sub]
            rows.append(
                {
                    "id": f"{task}_test-{i:06d}",
                    "file": f"/data/{task}_test.jsonl",
                    "task": task,
                    "subtask": sub,
                    "question": f"synthetic {sub} question about '{word}'",
                    "answer": answer,
                    "word": word,
                    "letter": letter,
                    "position": position,
                    "word_kind": "nonce" if i % 5 == 0 else "english",
                    "n_tokens": min(1 + len(word) // 4, 5),
                }
            )
    return rows


def _predictions(
    items: list[dict], accuracy: dict[str, float], rng: np.random.Generator, samples: int = 1
) -> list[dict]:
    out = []
    for it in items:
        for sample in range(samples):
            correct = bool(rng.random() < accuracy[it["task"]])
            parsed = it["answer"] if correct else "?"
            out.append({**{k: it[k] for k in ("id", "file")}, "sample": sample,
                        **{k: it[k] for k in ("task", "subtask", "question", "answer")},
                        "output": f"The answer is {parsed}.<|im_end|>", "parsed": parsed, "correct": correct,
                        **{k: it[k] for k in ("word", "letter", "position", "word_kind", "n_tokens")}})
    return out


def _write_eval(d: Path, predictions: list[dict]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "predictions.jsonl", "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
    acc = {t: float(np.mean([p["correct"] for p in predictions if p["task"] == t])) for t in SUBTASKS}
    metrics = {f"{t}_accuracy": a for t, a in acc.items()} | {
        "transfer_score": (acc["position"] + acc["count"]) / 2
    }
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2))


def make_sweep(study_dir: Path, n_trials: int = 24, n_items: int = 300, seed: int = 7,
               decoding: str = "sampled", samples: int = 1) -> dict:
    """Write the sweep under ``study_dir`` and return what was planted (per-trial true accuracies).

    ``samples``: generations per item (K), as ``evaluate --samples K`` writes them.
    """
    rng = np.random.default_rng(seed)
    items = _items(n_items, rng)
    _write_eval(study_dir / "base" / decoding, _predictions(items, BASE, rng, samples))
    trials = []
    for number in range(n_trials):
        params = {
            "lora_r": [4, 8, 16, 32][number % 4],
            "lora_alpha": int(rng.choice([16, 32, 64])),
            "learning_rate": float(10 ** rng.uniform(-5, -3)),
            "batch_size": int(rng.choice([4, 8])),
            "accumulate_grad_batches": int(rng.choice([1, 2])),
            "max_steps": int(rng.choice([100, 200])),
        }
        z, e = rng.normal(size=2)
        truth = {"position": 0.25 + SLOPE * math.log2(params["lora_r"] / 4) + 0.05 * z,
                 "count": 0.20 + 0.06 * (RHO * z + math.sqrt(1 - RHO**2) * e)}
        d = study_dir / f"trial-{number:04d}"
        _write_eval(d / "eval" / decoding, _predictions(items, truth, rng, samples))
        curve = _curve(params["max_steps"], truth, rng, forbidden=number == 0)
        with open(d / "metrics.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in curve)
        objective = curve[-1]["val/transfer_score"]
        (d / "fit.yaml").write_text(
            "".join(f"# {k}: {v}\n" for k, v in params.items()) + "seed_everything: 0\n"
        )
        _write_trial(d, {"study": study_dir.name, "number": number, "status": "complete", "params": params,
                         "objective_name": "val/transfer_score", "objective": objective, "duration_s": 60.0,
                         "model": "tiny-qwen3", "checkpoint": str(d / "checkpoints" / "best.ckpt")})
        trials.append({"number": number, "params": params, "truth": truth, "objective": objective, "dir": d})
    failed = [(n_trials, "failed", "CUDA out of memory"), (n_trials + 1, "pruned", None)]
    for number, status, error in failed:
        d = study_dir / f"trial-{number:04d}"
        _write_trial(
            d,
            {
                "study": study_dir.name,
                "number": number,
                "status": status,
                "params": trials[0]["params"],
                "objective_name": "val/transfer_score",
                "objective": None,
                "duration_s": 5.0,
                "model": "tiny-qwen3",
                "checkpoint": None,
            }
            | ({"error": error} if error else {}),
        )
    return {"trials": trials, "failed": failed, "base": BASE, "items": items}


def _curve(max_steps: int, truth: dict, rng: np.random.Generator, forbidden: bool) -> list[dict]:
    rows = []
    for step in range(10, max_steps + 1, 10):
        rows.append({"step": step - 1, "train/loss": 2.0 * math.exp(-step / 80) + 0.1})
        if step % 50 == 0:
            frac = 1 - math.exp(-step / 60)
            val = {
                f"val/{t}_accuracy": float(
                    np.clip(BASE[t] + (truth[t] - BASE[t]) * frac + rng.normal(0, 0.02), 0, 1)
                )
                for t in SUBTASKS
            }
            val["val/transfer_score"] = (val["val/position_accuracy"] + val["val/count_accuracy"]) / 2
            rows.append({"step": step - 1, **val} | ({FORBIDDEN_KEY: 0.9} if forbidden else {}))
    return rows


def _write_trial(d: Path, trial: dict) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "trial.json").write_text(json.dumps(trial, indent=2))


# ---- a sweep with replicates (several seeds per configuration), shared words and probe fields ----
REP_SUBTASKS = (("position", "nth_letter"), ("position", "letter_index"), ("count", "word_length"),
                ("count", "letter_count"))
REP_BASE = {"position/nth_letter": 0.16, "position/letter_index": 0.15, "count/word_length": 0.05,
            "count/letter_count": 0.19}
SEED_SD = 0.03  # between-seed spread of a configuration's true accuracy (the training noise)


def _rep_items(n_words: int, rng: np.random.Generator) -> list[dict]:
    """Each word gets one question of every subtask: four items share a word (a cluster)."""
    letters = list("abcdefghijklmnopqrstuvwxyz")
    rows = []
    for w in range(n_words):
        word = "".join(rng.choice(letters, int(rng.integers(4, 12))))
        letter = word[int(rng.integers(0, len(word)))]
        for task, sub in REP_SUBTASKS:
            position = int(rng.choice([0, 1, 2, -1])) if sub == "nth_letter" else None
            answer = {
                "nth_letter": word[position] if position is not None else "",
                "letter_index": str(word.index(letter) + 1),
                "word_length": str(len(word)),
                "letter_count": str(word.count(letter)),
            }[sub]
            rows.append({"id": f"{task}_test-{sub}-{w:06d}", "file": f"/data/{task}_test.jsonl", "task": task,
                         "subtask": sub, "question": f"A {sub} question about '{word}'?", "answer": answer,
                         "word": word, "letter": letter if sub in ("letter_index", "letter_count") else None,
                         "position": position, "word_kind": "english", "n_tokens": 1 + len(word) // 4})
    return rows


def _rep_predictions(items: list[dict], truth: dict, rng: np.random.Generator, likelihood: dict | None,
                     constant: str | None = None) -> list[dict]:
    out = []
    for it in items:
        key = f"{it['task']}/{it['subtask']}"
        if constant is not None and key == "position/letter_index":
            parsed = constant  # a run that answers the same thing to every question
        else:
            parsed = it["answer"] if rng.random() < truth[key] else "?"
        row = (
            {k: it[k] for k in ("id", "file")}
            | {"sample": 0}
            | {k: it[k] for k in ("task", "subtask", "question", "answer")}
        )
        row |= {"output": f"{parsed}<|im_end|>", "parsed": parsed, "correct": parsed == it["answer"],
                **{k: it[k] for k in ("word", "letter", "position", "word_kind", "n_tokens")}}
        if likelihood is not None:
            right = bool(rng.random() < likelihood[key])
            row |= {"prompt": it["question"], "likelihood_prompt": it["question"] + ' The answer is "',
                    "likelihood_answer": it["answer"] if right else "x", "likelihood_correct": right,
                    "gold_logprob": -1.0 if right else -4.0}
        out.append(row)
    return out


def _schema_metrics(predictions: list[dict], items: list[dict], scoring: str) -> dict:
    """metrics.json with the probe contract's fields (docs: the probe branch's SCHEMA), from the rows."""
    from collections import Counter

    def acc(rows, field="correct"):
        return float(np.mean([r[field] for r in rows])) if rows else float("nan")

    m: dict = {"scoring": scoring, "subtasks": {}}
    for task in ("position", "count"):
        rows = [r for r in predictions if r["task"] == task]
        m[f"{task}_accuracy"] = acc(rows)
        m[f"{task}_accuracy_n"] = len(rows)
        if scoring != "generation":
            m[f"{task}_likelihood_accuracy"] = acc(rows, "likelihood_correct")
    m["transfer_score"] = (m["position_accuracy"] + m["count_accuracy"]) / 2
    for task, sub in REP_SUBTASKS:
        rows = [r for r in predictions if r["subtask"] == sub]
        answers = Counter(it["answer"] for it in items if it["subtask"] == sub)
        best_answer, n_best = answers.most_common(1)[0]
        trivial = {"majority": n_best / len(rows), "best_constant": n_best / len(rows)}
        if sub == "letter_index":
            trivial["always_1"] = answers["1"] / len(rows)
        name = max(trivial, key=trivial.get)
        replies = Counter(r["parsed"] for r in rows)
        answered = Counter({a: n for a, n in replies.items() if a != "?"})  # "?": no answer parsed
        top = [[a, n / len(rows)] for a, n in answered.most_common(5)] or [["", 0.0]]
        a = acc(rows)
        entry = {
            "accuracy": a,
            "ci_low": max(0.0, a - 0.05),
            "ci_high": min(1.0, a + 0.05),
            "n": len(rows),
            "majority_answer": best_answer,
            "majority_baseline": n_best / len(rows),
            "trivial_baselines": trivial,
            "best_trivial": {"name": name, "accuracy": trivial[name]},
            "beats_trivial": a - 0.05 > trivial[name],
            "diagnostics": {
                "no_answer_rate": replies["?"] / len(rows),
                "top_answers": top,
                "constant_answer": top[0][1] > 0.5,
                "formats": {"bare": len(rows), "sentence": 0, "spelled": 0, "echoed": 0, "other": 0},
            },
        }
        if scoring != "generation":
            la = acc(rows, "likelihood_correct")
            entry["likelihood"] = {
                "accuracy": la,
                "ci_low": max(0.0, la - 0.05),
                "ci_high": min(1.0, la + 0.05),
                "n": len(rows),
                "gold_mean_rank": 2.0,
                "gold_mean_logprob": -2.0,
                "beats_trivial": la - 0.05 > trivial[name],
            }
        m["subtasks"][f"{task}/{sub}"] = entry
    return m


def make_replicate_sweep(
    study_dir: Path,
    n_configs: int = 8,
    seeds: int = 3,
    n_words: int = 150,
    seed: int = 11,
    decoding: str = "greedy",
    probe: bool = False,
    constant_config: int | None = None,
) -> dict:
    """A sweep of ``n_configs`` configurations × ``seeds`` seeds. Configuration c's true accuracy on
    every subtask is the base's plus ``effect[c]`` (``lora_r`` doubles with c // 2: +0.04 per
    doubling), and each seed adds N(0, SEED_SD) to it; verdicts are Bernoulli draws. With ``probe``
    the rows carry likelihood verdicts and metrics.json the probe contract's fields;
    ``constant_config`` answers "1" to every letter_index question in all its seeds."""
    rng = np.random.default_rng(seed)
    items = _rep_items(n_words, rng)
    like_base = {k: v + 0.1 for k, v in REP_BASE.items()}
    base_rows = _rep_predictions(items, REP_BASE, rng, like_base if probe else None)
    _write_rep_eval(study_dir / "base" / decoding, base_rows, items, probe)
    configs, number = [], 0
    for c in range(n_configs):
        lora_r = [4, 8, 16, 32][(c // 2) % 4]
        params = {"lora_r": lora_r, "learning_rate": [1e-4, 1e-3][c % 2]}
        effect = 0.04 * math.log2(lora_r / 4)
        truth = {k: v + effect for k, v in REP_BASE.items()}
        runs = []
        for r in range(seeds):
            noise = rng.normal(0, SEED_SD)
            seeded = {k: float(np.clip(v + noise, 0, 1)) for k, v in truth.items()}
            rows = _rep_predictions(
                items,
                seeded,
                rng,
                {k: v + 0.1 for k, v in seeded.items()} if probe else None,
                constant="1" if c == constant_config else None,
            )
            d = study_dir / f"trial-{number:04d}"
            _write_rep_eval(d / "eval" / decoding, rows, items, probe)
            val = float(np.mean(list(seeded.values())))
            curve = [
                {"step": 0, "global_step": 0, "val/transfer_score": float(np.mean(list(REP_BASE.values())))},
                {"step": 9, "train/loss": 1.0},
                {"step": 9, "global_step": 10, "val/transfer_score": val},
            ]
            (d / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in curve))
            _write_trial(
                d,
                {
                    "study": study_dir.name,
                    "number": number,
                    "status": "complete",
                    "params": params,
                    "config_id": c * seeds,
                    "replicate": r,
                    "seed": r,
                    "objective_name": "val/transfer_score",
                    "objective": val,
                    "model": "tiny-qwen3",
                },
            )
            runs.append({"number": number, "seeded_truth": seeded})
            number += 1
        configs.append(
            {"config_id": c * seeds, "params": params, "effect": effect, "truth": truth, "runs": runs}
        )
    return {"configs": configs, "items": items, "base": REP_BASE, "seeds": seeds}


def _write_rep_eval(d: Path, predictions: list[dict], items: list[dict], probe: bool) -> None:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "predictions.jsonl", "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
    (d / "metrics.json").write_text(
        json.dumps(_schema_metrics(predictions, items, "both" if probe else "generation"), indent=2)
    )


# ---- the transfer study's design: training patterns as parameters, and a control arm ----
PATTERNS = {"variants": ["spell", "spell+reversed", "spell+numbered", "spell+inverse", "all"],
            "separator": ["any", "spaces", "commas", "dashes"], "distinct_words": [500, 2000, 8000, None]}
ALL_WORDS = 22_873  # what distinct_words null stands for (the full build, seed 0)
VARIANTS_ALL_EFFECT = 0.15  # nth_letter accuracy of variants=all over variants=spell
WORDS_SLOPE = 0.03  # letter_count accuracy per doubling of distinct_words


def _study_truth(params: dict) -> dict:
    words = params["distinct_words"] or ALL_WORDS
    return REP_BASE | {
        "position/nth_letter": REP_BASE["position/nth_letter"]
        + VARIANTS_ALL_EFFECT * (params["variants"] == "all"),
        "count/letter_count": REP_BASE["count/letter_count"] + WORDS_SLOPE * math.log2(words / 500),
    }


def _write_study_trial(d: Path, trial: dict, rows: list[dict], items: list[dict], train_set: str, val: float,
                       spelled: tuple[str, ...] = ()) -> None:
    """One trial as the sweep leaves it; ``spelled`` subtasks report spelled-out replies in metrics.json."""
    (d / "eval" / "greedy").mkdir(parents=True, exist_ok=True)
    (d / "eval" / "greedy" / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in rows))
    metrics = _schema_metrics(rows, items, "both")
    for key in spelled:
        n = metrics["subtasks"][key]["n"]
        metrics["subtasks"][key]["diagnostics"]["formats"] = {
            "bare": n // 4,
            "sentence": 0,
            "spelled": n - n // 4,
            "echoed": 0,
            "other": 0,
        }
    (d / "eval" / "greedy" / "metrics.json").write_text(json.dumps(metrics, indent=2))
    curve = [{"step": 0, "global_step": 0, "val/transfer_score": float(np.mean(list(REP_BASE.values())))},
             {"step": 9, "global_step": 10, "val/transfer_score": val}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in curve))
    # the resolved config the fit ran: the control arm's says so, as a fixed override does
    (d / "fit.yaml").write_text(f"seed_everything: {trial['seed']}\ndata:\n  train_set: {train_set}\n")
    _write_trial(d, trial | {"status": "complete", "objective_name": "val/transfer_score", "objective": val,
                             "model": "tiny-qwen3"})


def make_study_sweep(root: Path, n_configs: int = 20, seeds: int = 3, n_words: int = 200, seed: int = 5,
                     control_configs: int = 3) -> dict:
    """The pre-registered study in miniature: a spelling study ``root/study`` and its control arm
    ``root/study-control``, greedy decoding, probe verdicts on every row.

    Spelling configurations draw lora_r, learning_rate and the three training patterns from
    balanced shuffled grids. Planted: ``variants=all`` raises nth_letter by VARIANTS_ALL_EFFECT; every
    doubling of distinct_words (null: ALL_WORDS) raises letter_count by WORDS_SLOPE; nothing else
    moves (every other dummy is a null). The *selected* configuration (the best validation
    objective, planted) has variants=all and distinct_words null, and on word_length its replies
    turn into spelled-out words (accuracy 0, probe unchanged). The control arm trains
    ``control_configs`` of the configurations, the selected one among them but under another
    config_id (matching is by parameters): the matched control stays at the base except for the
    same letter_count rise; the others rise on nth_letter (so a wrong match would show).
    Expected decisions: nth_letter transfer, letter_index no effect, word_length format
    interference, letter_count no effect (above the base, not above the control).
    """
    rng = np.random.default_rng(seed)
    items = _rep_items(n_words, rng)
    study, control = root / "study", root / "study-control"
    like = {k: v + 0.1 for k, v in REP_BASE.items()}
    base_rows = _rep_predictions(items, REP_BASE, rng, like)
    for d in (study, control):
        _write_rep_eval(d / "base" / "greedy", base_rows, items, True)
    grids = {
        name: rng.permutation(np.resize(np.array(levels, dtype=object), n_configs))
        for name, levels in (("lora_r", [4, 8, 16, 32]), ("learning_rate", [1e-4, 1e-3]), *PATTERNS.items())
    }
    selected = next(c for c in range(n_configs) if grids["variants"][c] == "all")
    words, every = (
        grids["distinct_words"],
        next(i for i, v in enumerate(grids["distinct_words"]) if v is None),
    )
    words[selected], words[every] = words[every], words[selected]  # the selected one trains on every word
    configs, number = [], 0
    for c in range(n_configs):
        params = {k: v[c] for k, v in grids.items()}
        truth = _study_truth(params)
        for r in range(seeds):
            # the selected configuration's seeds agree closely: its decisions test the rule, not luck
            noise = rng.normal(0, SEED_SD if c != selected else SEED_SD / 6)
            seeded = {k: float(np.clip(v + noise, 0, 1)) for k, v in truth.items()}
            generated = seeded | ({"count/word_length": 0.0} if c == selected else {})
            rows = _rep_predictions(items, generated, rng, {k: v + 0.1 for k, v in seeded.items()})
            val = float(np.mean(list(seeded.values()))) + (0.5 if c == selected else 0.0)
            _write_study_trial(
                study / f"trial-{number:04d}",
                {
                    "study": "study",
                    "number": number,
                    "params": params,
                    "config_id": c * seeds,
                    "replicate": r,
                    "seed": r,
                },
                rows,
                items,
                "spelling",
                val,
                ("count/word_length",) if c == selected else (),
            )
            number += 1
        configs.append({"config_id": c * seeds, "params": params, "truth": truth})
    others = [c for c in range(n_configs) if c != selected][: control_configs - 1]
    number = 0
    for k, c in enumerate([*others, selected]):
        params = configs[c]["params"]
        truth = REP_BASE | (
            {"count/letter_count": configs[c]["truth"]["count/letter_count"]}
            if c == selected
            else {"position/nth_letter": REP_BASE["position/nth_letter"] + VARIANTS_ALL_EFFECT}
        )
        for r in range(seeds):
            noise = rng.normal(0, SEED_SD)
            seeded = {key: float(np.clip(v + noise, 0, 1)) for key, v in truth.items()}
            rows = _rep_predictions(items, seeded, rng, {key: v + 0.1 for key, v in seeded.items()})
            _write_study_trial(
                control / f"trial-{number:04d}",
                {
                    "study": "study-control",
                    "number": number,
                    "params": params,
                    "config_id": k * seeds,
                    "replicate": r,
                    "seed": r,
                },
                rows,
                items,
                "control",
                float(np.mean(list(seeded.values()))),
            )
            number += 1
    return {
        "study": study,
        "control": control,
        "configs": configs,
        "selected": configs[selected],
        "items": items,
    }
