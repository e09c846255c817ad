"""The search space of a sweep (``configs/sweeps/<name>.yaml``) and how Optuna searches it.

A space file names the base ``fit`` config, the hyperparameters with their values or ranges, the
objective (a ``val/`` position, count or transfer metric, maximised), a budget, how many seeds
train each configuration (``replicates``), the decodings the final test evaluation uses, and
optional fixed overrides for every trial. :func:`load_space`
validates all of it before anything runs: a mistake is one :class:`SpellxferError` line naming
the file and the key. Trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from spellxfer.core.configs import config_path
from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import read_yaml

# Space-file name → the `fit` flag it sets, and its type. The names are the CLI's own keys.
HYPERPARAMETERS: dict[str, tuple[str, type]] = {
    "lora_r": ("model.lora_r", int),
    "lora_alpha": ("model.lora_alpha", int),
    "lora_dropout": ("model.lora_dropout", float),
    "learning_rate": ("model.learning_rate", float),
    "weight_decay": ("model.weight_decay", float),
    "warmup_steps": ("model.warmup_steps", int),
    "batch_size": ("data.batch_size", int),
    "accumulate_grad_batches": ("trainer.accumulate_grad_batches", int),
    "max_steps": ("trainer.max_steps", int),
}
# Only what validation logs as a position / count / transfer metric can be optimised.
OBJECTIVE = re.compile(r"^val/(?:transfer_score|(?:position|count)_accuracy|(?:position|count)/[a-z][a-z0-9_]*_accuracy)$")
SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband")
DECODINGS = ("sampled", "greedy")
TOP_KEYS = ("base", "objective", "sampler", "pruner", "seed", "budget", "replicates", "decodings", "evaluation",
            "validate_every_steps", "pack", "fixed", "parameters")  # fmt: skip
MAX_REPLICATES = 100  # seeds per configuration; more is a typo, not a study
# Fit keys the sweep sets itself for every trial (outputs, loggers, what the checkpoints follow).
RESERVED = ("experiment", "ckpt_path", "trainer.default_root_dir", "trainer.logger", "checkpoint.monitor",
            "checkpoint.mode", "checkpoint.filename", "checkpoint.every_n_train_steps", "early_stopping.monitor",
            "early_stopping.mode")  # fmt: skip
MAX_SEED = 2**32 - 1  # Optuna's samplers seed numpy's RandomState, which takes 0 ≤ seed < 2**32
EVALUATION_KEYS = {"limit": int, "batch_size": int, "max_new_tokens": int, "samples": int, "seed": int, "scoring": str}
SCORINGS = ("generation", "likelihood", "both")  # evaluate --scoring (default: both)


@dataclass(frozen=True)
class Parameter:
    """One hyperparameter: a list of ``values`` or a ``low``..``high`` range (``log`` scale, ``step``)."""

    name: str
    flag: str
    kind: type
    values: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def suggest(self, trial) -> Any:
        if self.values is not None:
            return trial.suggest_categorical(self.name, list(self.values))
        if self.kind is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class SweepSpace:
    path: Path
    base: Path
    objective: str = "val/transfer_score"
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    trials: int = 20
    hours: float | None = None
    decodings: tuple[str, ...] = ("sampled",)
    evaluation: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    parameters: tuple[Parameter, ...] = ()
    validate_every_steps: int | None = None
    accumulate_grad_batches: int = 1  # the fixed or base config's value, for trials that don't search it
    replicates: int = 1
    """Seeds per sampled configuration: each configuration is trained ``replicates`` times, with
    ``seed_everything`` = ``base_seed`` + 0, 1, …; ``budget.trials`` counts configurations."""
    base_seed: int = 0  # seed_everything of the fixed overrides, else of the base config, else 0

    def replicate_seed(self, replicate: int) -> int:
        """``seed_everything`` of replicate ``replicate`` (0 is the base config's own seed)."""
        return self.base_seed + replicate
    pack: int | None = None  # trials sharing one process and base model (sweep --pack); None: one per process

    def val_check_interval(self, params: dict) -> int | None:
        """Lightning counts ``val_check_interval`` in micro-batches; ``validate_every_steps`` counts
        optimizer steps, so every trial validates (and early-stops, and reports to the pruner) at
        the same optimizer steps whatever its gradient accumulation."""
        if self.validate_every_steps is None:
            return None
        return self.validate_every_steps * int(params.get("accumulate_grad_batches", self.accumulate_grad_batches))

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's hyperparameters, drawn by the study's sampler (or fixed by a retry)."""
        return {p.name: p.suggest(trial) for p in self.parameters}

    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.parameters) if all(p.values for p in self.parameters) else 0

    def check_sampler(self, sampler: str) -> None:
        if sampler not in SAMPLERS:
            raise SpellxferError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if sampler == "grid":
            for p in self.parameters:
                if p.values is None:
                    raise SpellxferError(f"{self.path}: parameters.{p.name}: the grid sampler needs a list of "
                                         "values, not a range")  # fmt: skip


def load_space(path: str | Path) -> SweepSpace:
    """Read and validate a space file; every mistake is one line naming the file and the key."""
    path = Path(path)
    if not path.exists():
        raise SpellxferError(f"space file {path}: no such file")
    raw = read_yaml(path, "sweep space file")

    def fail(key: str, msg: str):
        raise SpellxferError(f"{path}: {key}: {msg}")

    if not isinstance(raw, dict):
        fail("(top level)", "expected a mapping with base, objective, parameters, …")
    for key in raw:
        if key not in TOP_KEYS:
            fail(str(key), f"unknown key; known: {', '.join(TOP_KEYS)}")
    if "base" not in raw:
        fail("base", "missing: the fit config every trial starts from (e.g. configs/tiny.yaml)")
    base = config_path(str(raw["base"]))
    if not base.is_file():
        fail("base", f"no such fit config {base} (paths are relative to the working directory; configs/… "
                     "names a shipped config)")  # fmt: skip
    objective = raw.get("objective", "val/transfer_score")
    if not isinstance(objective, str) or not OBJECTIVE.match(objective):
        fail("objective", f"{objective!r} is not a position / count metric; use val/transfer_score, "
                          "val/position_accuracy, val/count_accuracy or val/<task>/<subtask>_accuracy")  # fmt: skip
    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        fail("sampler", f"{sampler!r}; one of {', '.join(SAMPLERS)}")
    pruner = raw.get("pruner", "median")
    if pruner not in PRUNERS:
        fail("pruner", f"{pruner!r}; one of {', '.join(PRUNERS)}")
    seed = raw.get("seed", 0)
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        fail("seed", f"expected an integer from 0 to {MAX_SEED} (2**32 - 1, numpy's seed range), got {seed!r}")

    budget = raw.get("budget") or {}
    if not isinstance(budget, dict) or set(budget) - {"trials", "hours"}:
        fail("budget", "expected a mapping with trials (and optionally hours)")
    trials = budget.get("trials", 20)
    if not _is_int(trials) or trials < 1:
        fail("budget.trials", f"expected an integer ≥ 1, got {trials!r}")
    hours = budget.get("hours")
    if hours is not None and (not _is_number(hours) or hours <= 0):
        fail("budget.hours", f"expected a positive number of hours, got {hours!r}")

    decodings = raw.get("decodings", ["sampled"])
    if not isinstance(decodings, list) or not decodings or any(d not in DECODINGS for d in decodings):
        fail("decodings", f"expected a non-empty list of {' / '.join(DECODINGS)}, got {decodings!r}")
    evaluation = raw.get("evaluation") or {}
    if not isinstance(evaluation, dict):
        fail("evaluation", "expected a mapping")
    for key, value in evaluation.items():
        if key not in EVALUATION_KEYS:
            fail(f"evaluation.{key}", f"unknown key; known: {', '.join(EVALUATION_KEYS)}")
        if value is None:
            continue
        if key == "scoring":
            if value not in SCORINGS:
                fail(f"evaluation.{key}", f"expected one of {' / '.join(SCORINGS)}, got {value!r}")
        elif key == "seed":
            if not _is_int(value) or not 0 <= value <= MAX_SEED:
                fail(f"evaluation.{key}", f"expected an integer from 0 to {MAX_SEED}, got {value!r}")
        elif not _is_int(value) or value < 1:
            fail(f"evaluation.{key}", f"expected a positive integer, got {value!r}")
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        fail("fixed", "expected a mapping of fit keys (model.lora_dropout, data.val_limit, …) to values")
    for key in fixed:
        if key in RESERVED:
            fail(f"fixed.{key}", "set by the sweep itself for every trial (outputs, loggers, and the objective "
                                 "as the monitored metric)")  # fmt: skip
        if not re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+|seed_everything", str(key)):
            fail(f"fixed.{key}", "expected a dotted fit key such as data.val_limit or trainer.val_check_interval")

    pack = raw.get("pack")
    if pack is not None and (not _is_int(pack) or pack < 1):
        fail("pack", f"expected an integer ≥ 1 (trials sharing one base model) or null, got {pack!r}")
    every = raw.get("validate_every_steps")
    if every is not None:
        if not _is_int(every) or every < 1:
            fail("validate_every_steps", f"expected an integer ≥ 1 (optimizer steps), got {every!r}")
        if "trainer.val_check_interval" in fixed:
            fail("fixed.trainer.val_check_interval", "validate_every_steps sets it per trial (× the trial's "
                                                     "accumulate_grad_batches); keep one")  # fmt: skip
    accumulate = fixed.get("trainer.accumulate_grad_batches")
    if every is not None and accumulate is None:
        accumulate = base_section(base, "trainer").get("accumulate_grad_batches")
    if accumulate is not None and (not _is_int(accumulate) or accumulate < 1):
        if "trainer.accumulate_grad_batches" in fixed:
            fail("fixed.trainer.accumulate_grad_batches", f"expected an integer ≥ 1, got {accumulate!r}")
        raise SpellxferError(f"{base}: trainer.accumulate_grad_batches: expected an integer ≥ 1, got {accumulate!r}")

    replicates = raw.get("replicates", 1)
    if not _is_int(replicates) or not 1 <= replicates <= MAX_REPLICATES:
        fail("replicates", f"expected an integer from 1 to {MAX_REPLICATES} (seeds per configuration), got {replicates!r}")
    base_cfg = read_yaml(base, "fit config")
    base_seed = fixed.get("seed_everything", base_cfg.get("seed_everything", 0) if isinstance(base_cfg, dict) else 0)
    if replicates == 1 and not _is_int(base_seed):
        base_seed = 0  # one seed: the base config's own, whatever form Lightning accepts (true, null)
    elif not _is_int(base_seed) or base_seed < 0 or base_seed + replicates - 1 > MAX_SEED:
        where = "fixed.seed_everything" if "seed_everything" in fixed else f"{base}: seed_everything"
        fail(where, f"expected an integer from 0 to {MAX_SEED - replicates + 1} (one seed per replicate), got {base_seed!r}")

    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        fail("parameters", f"expected a mapping of hyperparameters ({', '.join(HYPERPARAMETERS)}) to values or ranges")
    parameters = tuple(_parameter(name, spec, fail) for name, spec in params.items())
    for p in parameters:
        if p.flag in fixed:
            fail(f"fixed.{p.flag}", f"also searched as parameters.{p.name}; keep one")
    space = SweepSpace(path=path, base=base, objective=objective, sampler=sampler, pruner=pruner, seed=seed,
                       trials=trials, hours=hours, decodings=tuple(dict.fromkeys(decodings)),
                       evaluation=evaluation, fixed=fixed, parameters=parameters,
                       validate_every_steps=every, accumulate_grad_batches=int(accumulate or 1),
                       replicates=replicates, base_seed=base_seed, pack=pack)  # fmt: skip
    if sampler == "grid":
        space.check_sampler("grid")
    return space


def base_section(base: Path, section: str) -> dict:
    """One top-level section (``model``, ``data``, ``trainer``) of a base fit config, as a mapping
    (absent → empty); a config that is not a mapping of mappings is one error line naming it."""
    cfg = read_yaml(base, "fit config") or {}
    if not isinstance(cfg, dict):
        raise SpellxferError(f"{base}: expected a mapping of fit sections (model, data, trainer, …)")
    value = cfg.get(section) or {}
    if not isinstance(value, dict):
        raise SpellxferError(f"{base}: {section}: expected a mapping of {section} settings, got {value!r}")
    return value


def _parameter(name: str, spec, fail: Callable[[str, str], None]) -> Parameter:
    key = f"parameters.{name}"
    if name not in HYPERPARAMETERS:
        fail(key, f"unknown hyperparameter; known: {', '.join(HYPERPARAMETERS)}")
    flag, kind = HYPERPARAMETERS[name]
    ok = _is_int if kind is int else _is_number
    if isinstance(spec, dict) and "values" in spec:
        if set(spec) != {"values"}:
            fail(key, "give either values: [...] or low/high, not both")
        spec = spec["values"]
    if isinstance(spec, list):
        if not spec:
            fail(key, "empty list of values")
        bad = [v for v in spec if not ok(v)]
        if bad:
            fail(key, f"{bad[0]!r} is not {'an integer' if kind is int else 'a number'}")
        if len(set(spec)) != len(spec):
            fail(key, "a value is listed twice")
        return Parameter(name, flag, kind, values=tuple(kind(v) for v in spec))
    if not isinstance(spec, dict):
        fail(key, "expected a list of values or a range {low: …, high: …, log: true|false, step: …}")
    unknown = set(spec) - {"low", "high", "log", "step"}
    if unknown:
        fail(key, f"unknown range key {sorted(unknown)[0]!r}; a range has low, high, log, step")
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    for k, v in (("low", low), ("high", high)):
        if not ok(v):
            fail(f"{key}.{k}", f"expected {'an integer' if kind is int else 'a number'}, got {v!r}")
    if low >= high:
        fail(key, f"inverted or empty range: low {low} ≥ high {high}")
    if not isinstance(log, bool):
        fail(f"{key}.log", f"expected true or false, got {log!r}")
    if log and low <= 0:
        fail(f"{key}.log", f"a log range needs low > 0, got {low}")
    if step is not None and (not ok(step) or step <= 0 or log):
        fail(f"{key}.step", "expected a positive step, and no step on a log range")
    return Parameter(name, flag, kind, low=low, high=high, log=log, step=step)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# ---- how Optuna searches the space ---------------------------------------------------------------
def make_sampler(space: SweepSpace, sampler: str) -> optuna.samplers.BaseSampler:
    """Grid (every point once, in a seeded random order), random, or TPE.

    Random and TPE are reseeded from (study seed, trial number) before each trial: one worker
    reproduces the same sequence run after run, and workers asking at the same moment — in one
    process or on many machines — get different trial numbers, hence different draws.
    """
    space.check_sampler(sampler)
    if sampler == "grid":
        return GridSampler({p.name: list(p.values) for p in space.parameters}, seed=space.seed)
    factory = {"random": optuna.samplers.RandomSampler, "tpe": optuna.samplers.TPESampler}[sampler]
    return PerTrialSeed(factory, space.seed)


def make_pruner(pruner: str) -> optuna.pruners.BasePruner:
    """``median``: stop a trial whose objective is below the median of earlier trials at the same
    step (once 2 trials are complete); ``hyperband``: successive halving over training steps."""
    if pruner not in PRUNERS:
        raise SpellxferError(f"pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)
    return optuna.pruners.NopPruner()


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` once the grid is used up: the sweep's
    budget (capped at the grid size) ends the study, and a packed sweep tells trials outside an
    optimize loop, where ``stop`` raises."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


class PerTrialSeed(optuna.samplers.BaseSampler):
    """A fresh inner sampler (random or TPE) per trial, seeded from (study seed, trial number)."""

    def __init__(self, factory: Callable[..., optuna.samplers.BaseSampler], seed: int):
        self._factory, self._seed = factory, seed
        self._inner = factory(seed=seed)

    def before_trial(self, study, trial) -> None:
        # numpy seeds must stay below 2**32; below that (seed < 4295, few trials) this is the identity
        self._inner = self._factory(seed=(self._seed * 1_000_003 + trial.number) % 2**32)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)
