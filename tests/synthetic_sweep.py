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
            answer = {"nth_letter": word[position] if position is not None else "", "letter_index": str(word.index(letter or "a") + 1 if letter else 1),
                      "word_length": str(len(word)), "letter_count": str(word.count(letter or ""))}[sub]  # fmt: skip
            rows.append({"id": f"{task}_test-{i:06d}", "file": f"/data/{task}_test.jsonl", "task": task, "subtask": sub,
                         "question": f"synthetic {sub} question about '{word}'", "answer": answer, "word": word,
                         "letter": letter, "position": position, "word_kind": "nonce" if i % 5 == 0 else "english",
                         "n_tokens": min(1 + len(word) // 4, 5)})  # fmt: skip
    return rows


def _predictions(items: list[dict], accuracy: dict[str, float], rng: np.random.Generator, samples: int = 1) -> list[dict]:
    out = []
    for it in items:
        for sample in range(samples):
            correct = bool(rng.random() < accuracy[it["task"]])
            parsed = it["answer"] if correct else "?"
            out.append({**{k: it[k] for k in ("id", "file")}, "sample": sample,
                        **{k: it[k] for k in ("task", "subtask", "question", "answer")},
                        "output": f"The answer is {parsed}.<|im_end|>", "parsed": parsed, "correct": correct,
                        **{k: it[k] for k in ("word", "letter", "position", "word_kind", "n_tokens")}})  # fmt: skip
    return out


def _write_eval(d: Path, predictions: list[dict]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "predictions.jsonl", "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
    acc = {t: float(np.mean([p["correct"] for p in predictions if p["task"] == t])) for t in SUBTASKS}
    metrics = {f"{t}_accuracy": a for t, a in acc.items()} | {"transfer_score": (acc["position"] + acc["count"]) / 2}
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2))


def make_sweep(study_dir: Path, n_trials: int = 24, n_items: int = 300, seed: int = 7,
               decoding: str = "sampled", samples: int = 1) -> dict:  # fmt: skip
    """Write the sweep under ``study_dir`` and return what was planted (per-trial true accuracies).

    ``samples``: generations per item (K), as ``evaluate --samples K`` writes them.
    """
    rng = np.random.default_rng(seed)
    items = _items(n_items, rng)
    _write_eval(study_dir / "base" / decoding, _predictions(items, BASE, rng, samples))
    trials = []
    for number in range(n_trials):
        params = {"lora_r": [4, 8, 16, 32][number % 4], "lora_alpha": int(rng.choice([16, 32, 64])),
                  "learning_rate": float(10 ** rng.uniform(-5, -3)), "batch_size": int(rng.choice([4, 8])),
                  "accumulate_grad_batches": int(rng.choice([1, 2])), "max_steps": int(rng.choice([100, 200]))}  # fmt: skip
        z, e = rng.normal(size=2)
        truth = {"position": 0.25 + SLOPE * math.log2(params["lora_r"] / 4) + 0.05 * z,
                 "count": 0.20 + 0.06 * (RHO * z + math.sqrt(1 - RHO**2) * e)}  # fmt: skip
        d = study_dir / f"trial-{number:04d}"
        _write_eval(d / "eval" / decoding, _predictions(items, truth, rng, samples))
        curve = _curve(params["max_steps"], truth, rng, forbidden=number == 0)
        with open(d / "metrics.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in curve)
        objective = curve[-1]["val/transfer_score"]
        (d / "fit.yaml").write_text("".join(f"# {k}: {v}\n" for k, v in params.items()) + "seed_everything: 0\n")
        _write_trial(d, {"study": study_dir.name, "number": number, "status": "complete", "params": params,
                         "objective_name": "val/transfer_score", "objective": objective, "duration_s": 60.0,
                         "model": "tiny-qwen3", "checkpoint": str(d / "checkpoints" / "best.ckpt")})  # fmt: skip
        trials.append({"number": number, "params": params, "truth": truth, "objective": objective, "dir": d})
    failed = [(n_trials, "failed", "CUDA out of memory"), (n_trials + 1, "pruned", None)]
    for number, status, error in failed:
        d = study_dir / f"trial-{number:04d}"
        _write_trial(d, {"study": study_dir.name, "number": number, "status": status, "params": trials[0]["params"],
                         "objective_name": "val/transfer_score", "objective": None, "duration_s": 5.0,
                         "model": "tiny-qwen3", "checkpoint": None} | ({"error": error} if error else {}))  # fmt: skip
    return {"trials": trials, "failed": failed, "base": BASE, "items": items}


def _curve(max_steps: int, truth: dict, rng: np.random.Generator, forbidden: bool) -> list[dict]:
    rows = []
    for step in range(10, max_steps + 1, 10):
        rows.append({"step": step - 1, "train/loss": 2.0 * math.exp(-step / 80) + 0.1})
        if step % 50 == 0:
            frac = 1 - math.exp(-step / 60)
            val = {f"val/{t}_accuracy": float(np.clip(BASE[t] + (truth[t] - BASE[t]) * frac + rng.normal(0, 0.02), 0, 1))
                   for t in SUBTASKS}  # fmt: skip
            val["val/transfer_score"] = (val["val/position_accuracy"] + val["val/count_accuracy"]) / 2
            rows.append({"step": step - 1, **val} | ({FORBIDDEN_KEY: 0.9} if forbidden else {}))
    return rows


def _write_trial(d: Path, trial: dict) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "trial.json").write_text(json.dumps(trial, indent=2))
