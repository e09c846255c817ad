"""More seeds of chosen configurations: ``sweep --replicate_configs SPEC --replicates N``.

The transfer study runs in two phases: phase 1 trains many configurations with one seed each
(``replicates: 1``); phase 2 trains more seeds of a few of them, and the control arm (a second
study) trains the same ones. This module chooses those configurations and queues exactly the
replicates a study does not have yet; the sweep then runs only the queued trials.

Lifecycle of :func:`plan_replicates`: parse SPEC → read the configurations (id, params,
objective) of the source study (the study itself, or ``--from_study``) → choose (explicit ids, or
``auto:K``: the validation-selected configuration plus K − 1 spread over the objective's range)
→ enqueue, per chosen configuration, the replicates 0 … N − 1 that are not complete, pruned,
running or queued yet. Every check runs before the first enqueue: a bad input queues nothing.

A queued replicate carries user attributes ``config_id`` (the source's id), ``replicate`` and,
from another study, ``source_study``; its seed is :meth:`SweepSpace.replicate_seed` of its
replicate (replicate 0: the base seed, as phase 1 trained it). Trained on spelling, evaluated
on position and count only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import atomic_file

# a replicate the study has: finished (pruned counts: it ran), running, or queued to run
PRESENT = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
_AUTO = re.compile(r"auto:(\d+)")
_IDS = re.compile(r"\d+(,\d+)*")


@dataclass(frozen=True)
class Configuration:
    """One configuration of the source study: its id, hyperparameters and replicate 0's objective
    (None when replicate 0 has not completed)."""

    config_id: int
    params: dict
    objective: float | None


def config_id(t) -> int:
    """A trial's configuration (a trial from before replicates is its own configuration)."""
    return int(t.user_attrs.get("config_id", t.number))


def replicate(t) -> int:
    return int(t.user_attrs.get("replicate", 0))


def parse_spec(spec: str) -> tuple[str, int | list[int]]:
    """``("auto", K)`` or ``("ids", [id, …])``; anything else is one error line."""
    text = str(spec).replace(" ", "")
    if m := _AUTO.fullmatch(text):
        k = int(m.group(1))
        if k < 1:
            raise SpellxferError(f"--replicate_configs auto:K needs K ≥ 1, got {spec!r}")
        return "auto", k
    if _IDS.fullmatch(text):
        return "ids", list(dict.fromkeys(int(i) for i in text.split(",")))
    raise SpellxferError(
        "--replicate_configs: expected auto:K or a comma list of configuration ids (e.g. 0,7,12), "
        f"got {spec!r}"
    )


def configurations(study) -> dict[int, Configuration]:
    """Every configuration of ``study`` by id. Its objective is replicate 0's value, the one
    trial phase 1 selected on: more seeds finishing later do not change what ``auto`` picks, so
    rerunning the same command after an interruption picks the same configurations."""
    found: dict[int, Configuration] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if not t.params:
            continue
        cid = config_id(t)
        value = t.value if t.state == TrialState.COMPLETE and replicate(t) == 0 else None
        known = found.get(cid)
        if known is None or (known.objective is None and value is not None):
            found[cid] = Configuration(cid, dict(t.params), value)
    return found


def choose(
    kind: str, arg, configs: dict[int, Configuration], maximize: bool
) -> list[tuple[Configuration, str]]:
    """The chosen configurations with their role (``best``, ``spread``, ``chosen``).

    ``auto:K``: the best replicate-0 objective among complete configurations (the study's
    direction; ties: the lower id), then K − 1 of the others at evenly spaced quantiles of their
    objective — 0 and 1 (the worst and the best of the rest) and between, or the median for
    K − 1 = 1 — index ⌊q·(n − 1) + ½⌋ in the others sorted by (objective, id); all of them if
    there are no more than K − 1.
    """
    if kind == "ids":
        unknown = [i for i in arg if i not in configs]
        if unknown:
            have = ", ".join(map(str, sorted(configs))) or "none"
            raise SpellxferError(
                f"--replicate_configs: no configuration {', '.join(map(str, unknown))} in the study "
                f"(configuration ids: {have})"
            )
        return [(configs[i], "chosen") for i in arg]
    scored = [c for c in configs.values() if c.objective is not None]
    if not scored:
        raise SpellxferError("--replicate_configs auto: the study has no complete trial to select on")
    sign = -1.0 if maximize else 1.0
    best = min(scored, key=lambda c: (sign * c.objective, c.config_id))
    others = sorted((c for c in scored if c is not best), key=lambda c: (c.objective, c.config_id))
    m = arg - 1
    if m >= len(others):
        picked = others
    elif m == 1:
        picked = [others[math.floor(0.5 * (len(others) - 1) + 0.5)]]
    else:
        picked = [others[math.floor(i * (len(others) - 1) / (m - 1) + 0.5)] for i in range(m)]
    return [(best, "best")] + [(c, "spread") for c in picked]


def check_parameters(space_names: list[str], source_params: dict, source: str) -> None:
    """The current space searches exactly the hyperparameters the source study drew."""
    missing = [n for n in space_names if n not in source_params]
    extra = [n for n in source_params if n not in space_names]
    if missing or extra:
        parts = ([f"missing in {source}: {', '.join(missing)}"] if missing else []) + (
            [f"not in this space: {', '.join(extra)}"] if extra else []
        )
        raise SpellxferError(f"--from_study {source}: parameters differ ({'; '.join(parts)})")


def missing_replicates(study, cid: int, n: int, source_study: str | None) -> list[int]:
    """Replicates 0 … n − 1 of configuration ``cid`` that ``study`` has not finished, nor running or
    queued (a failed one whose retry is queued is present through its retry)."""
    have = {
        replicate(t)
        for t in study.get_trials(deepcopy=False)
        if t.state in PRESENT
        and config_id(t) == cid
        and t.user_attrs.get("source_study") == source_study
    }
    return [k for k in range(n) if k not in have]


def plan_replicates(
    study, source, spec: str, n: int, space_names: list[str], source_name: str | None
) -> dict:
    """Choose configurations of ``source`` by ``spec`` and enqueue into ``study`` the replicates
    0 … ``n`` − 1 each is missing; returns the plan (what ``replicate-plan.json`` records)."""
    if n is None or n < 1:
        raise SpellxferError(f"--replicates must be ≥ 1 with --replicate_configs, got {n}")
    kind, arg = parse_spec(spec)
    configs = configurations(source)
    maximize = source.direction == optuna.study.StudyDirection.MAXIMIZE
    chosen = choose(kind, arg, configs, maximize)
    for c, _ in chosen:
        if source_name is not None:
            check_parameters(space_names, c.params, source_name)
    queue = [(c, role, missing_replicates(study, c.config_id, n, source_name)) for c, role in chosen]
    for c, _, ks in queue:  # every check passed: now enqueue
        for k in ks:
            attrs = {"config_id": c.config_id, "replicate": k, "replicates_queued": True}
            if source_name is not None:
                attrs["source_study"] = source_name
            study.enqueue_trial(c.params, user_attrs=attrs, skip_if_exists=False)
    return {
        "replicate_configs": spec,
        "replicates": n,
        "source_study": source_name or study.study_name,
        "direction": "maximize" if maximize else "minimize",
        "selection": (
            "auto: the best replicate-0 objective, plus the others at evenly spaced quantiles of "
            "their objective"
            if kind == "auto"
            else "explicit configuration ids"
        ),
        "configurations": [
            {
                "config_id": c.config_id,
                "role": role,
                "objective": c.objective,
                "params": c.params,
                "enqueued": ks,
            }
            for c, role, ks in queue
        ],
    }


def write_plan(path, plan: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        json.dump(plan, f, indent=2, default=str)
        f.write("\n")
