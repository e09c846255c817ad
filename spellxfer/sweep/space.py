"""The search space of a sweep (``configs/sweeps/<name>.yaml``) and how Optuna searches it.

A space file names the base ``fit`` config, the hyperparameters with their values or ranges, the
objective (a ``val/`` position, count or transfer metric, maximised), a budget, how many seeds
train each configuration (``replicates``), the decodings the final test evaluation uses, and
optional fixed overrides for every trial. :func:`load_space`
validates all of it before anything runs — the base config with the fixed overrides through
``fit``'s own parser, so the sweep reads the values a trial's fit will run with — and a mistake is
one :class:`SpellxferError` line naming the file and the key. Trained on spelling, evaluated on
position and count only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import optuna
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from spellxfer.core.configs import config_path, load_file
from spellxfer.core.errors import SpellxferError
from spellxfer.data.patterns import SEPARATOR_CHOICES, TRAIN_SETS, VARIANTS
from spellxfer.training.cli import parse_fit_config

# Space-file name → the `fit` flag it sets, and its type. The names are the CLI's own keys.
# The last four are the study's training patterns (spellxfer.data.patterns): text choices given
# as a list of values; distinct_words takes integers and null (every word), or an integer range.
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
    "variants": ("data.variants", str),
    "separator": ("data.separator", str),
    "distinct_words": ("data.distinct_words", int),
    "train_set": ("data.train_set", str),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "variants": tuple(VARIANTS),
    "separator": SEPARATOR_CHOICES,
    "train_set": TRAIN_SETS,
}
"""The text parameters' allowed values."""
NULLABLE = ("distinct_words",)  # null: every word
# Only what validation logs as a position / count / transfer metric can be optimised.
OBJECTIVE = re.compile(
    r"^val/(?:transfer_score|(?:position|count)_accuracy|(?:position|count)/[a-z][a-z0-9_]*_accuracy)$"
)
SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband")
DECODINGS = ("sampled", "greedy")
MAX_REPLICATES = 100  # seeds per configuration; more is a typo, not a study
# Fit keys the sweep sets itself for every trial (outputs, loggers, what the checkpoints follow).
RESERVED = (
    "experiment",
    "ckpt_path",
    "trainer.default_root_dir",
    "trainer.logger",
    "checkpoint.monitor",
    "checkpoint.mode",
    "checkpoint.filename",
    "checkpoint.every_n_train_steps",
    "early_stopping.monitor",
    "early_stopping.mode",
)
MAX_SEED = 2**32 - 1  # Optuna's samplers seed numpy's RandomState, which takes 0 ≤ seed < 2**32


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
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
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
    fit: Any = None
    """The base config with the fixed overrides, as fit's own parser resolves it (a jsonargparse
    Namespace: ``fit.model.model``, ``fit.data.data_dir``, …): what every trial starts from."""

    def fit_args(self) -> list[str]:
        """``fit`` arguments every trial shares: ``--config <base>`` and the fixed overrides."""
        return ["--config", str(self.base), *flags(self.fixed)]

    def val_check_interval(self, params: dict) -> int | None:
        """Lightning counts ``val_check_interval`` in micro-batches; ``validate_every_steps`` counts
        optimizer steps, so every trial validates (and early-stops, and reports to the pruner) at
        the same optimizer steps whatever its gradient accumulation."""
        if self.validate_every_steps is None:
            return None
        return self.validate_every_steps * int(
            params.get("accumulate_grad_batches", self.accumulate_grad_batches)
        )

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's hyperparameters, drawn by the study's sampler (or fixed by a retry)."""
        return {p.name: p.suggest(trial) for p in self.parameters}

    def grid_size(self) -> int:
        return (
            math.prod(len(p.values) for p in self.parameters) if all(p.values for p in self.parameters) else 0
        )

    def check_sampler(self, sampler: str) -> None:
        if sampler not in SAMPLERS:
            raise SpellxferError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if sampler == "grid":
            for p in self.parameters:
                if p.values is None:
                    raise SpellxferError(
                        f"{self.path}: parameters.{p.name}: the grid sampler needs a list of "
                        "values, not a range"
                    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# ---- the space file, validated by pydantic like the deployment config ------------------------------
def _rule(ok: Callable[[Any], bool], problem: str) -> PlainValidator:
    """A field that is valid when ``ok(value)``; else ``problem`` (``{v!r}``: the value given)."""

    def check(v):
        if not ok(v):
            raise ValueError(problem.format(v=v))
        return v

    return PlainValidator(check)


def _integer(low: int, high: int | None = None, note: str = "", optional: bool = False) -> Any:
    """An integer field (true/false is not one) from ``low`` to ``high``; null too if ``optional``."""
    within = f"≥ {low}" if high is None else f"from {low} to {high}"

    def ok(v) -> bool:
        return (optional and v is None) or (_is_int(v) and v >= low and (high is None or v <= high))

    return Annotated[
        int | None if optional else int, _rule(ok, f"expected an integer {within}{note}, got {{v!r}}")
    ]


def _none_is_empty(v):
    return {} if v is None else v  # `budget:` with nothing under it is the defaults


Seed = _integer(0, MAX_SEED, " (2**32 - 1, numpy's seed range)")
Count = _integer(1, optional=True)
Int = Annotated[int, _rule(_is_int, "expected an integer, got {v!r}")]
Number = Annotated[float, _rule(_is_number, "expected a number, got {v!r}")]


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(_File):
    trials: _integer(1) = 20
    hours: Annotated[
        float | None,
        _rule(
            lambda v: v is None or (_is_number(v) and v > 0), "expected a positive number of hours, got {v!r}"
        ),
    ] = None


class Evaluation(_File):
    """Flags of the final test evaluation (``evaluate --limit …``); null: evaluate's default."""

    limit: Count = None
    batch_size: Count = None
    max_new_tokens: Count = None
    samples: Count = None
    seed: _integer(0, MAX_SEED, " (2**32 - 1, numpy's seed range)", optional=True) = None
    scoring: Literal["generation", "likelihood", "both"] | None = None  # evaluate --scoring (null: both)


def _fit_key(key):
    if key in RESERVED:
        raise ValueError(
            "set by the sweep itself for every trial (outputs, loggers, and the objective as the "
            "monitored metric)"
        )
    if not re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+|seed_everything", str(key)):
        raise ValueError("expected a dotted fit key such as data.val_limit or trainer.val_check_interval")
    return key


class _Range(_File):
    unknown_key: ClassVar[str] = "range key"

    @model_validator(mode="after")
    def _ordered(self):
        if self.low >= self.high:
            raise ValueError(f"inverted or empty range: low {self.low} ≥ high {self.high}")
        return self

    @field_validator("log", check_fields=False)  # the fields are the subclasses'
    @classmethod
    def _positive(cls, log, info: ValidationInfo):
        if log and info.data.get("low", 1) <= 0:
            raise ValueError(f"a log range needs low > 0, got {info.data['low']}")
        return log

    @field_validator("step", check_fields=False)  # the fields are the subclasses'
    @classmethod
    def _step(cls, step, info: ValidationInfo):
        if step is not None and (step <= 0 or info.data.get("log")):
            raise ValueError("expected a positive step, and no step on a log range")
        return step


class IntRange(_Range):
    low: Int
    high: Int
    log: Annotated[bool, _rule(lambda v: isinstance(v, bool), "expected true or false, got {v!r}")] = False
    step: Int | None = None


class FloatRange(_Range):
    low: Number
    high: Number
    log: Annotated[bool, _rule(lambda v: isinstance(v, bool), "expected true or false, got {v!r}")] = False
    step: Number | None = None


class CountRange(IntRange):
    """An integer range of a nullable count (``distinct_words``): low ≥ 1."""

    low: _integer(1)


def _search(name: str, kind: type) -> Any:
    """A hyperparameter's values (a list, or ``{values: [...]}``) or its range (``low``, ``high``,
    ``log``, ``step``), as ``Parameter`` keyword arguments. A text parameter (``CHOICES``) takes
    only a list of its choices; a ``NULLABLE`` one takes null among its values, integers ≥ 1."""
    choices, nullable = CHOICES.get(name), name in NULLABLE
    if kind is str:
        ok, what = (lambda v: v in choices), f"one of {', '.join(choices)}"
    elif kind is int:
        ok, what = _is_int, "an integer" + (" or null" if nullable else "")
    else:
        ok, what = _is_number, "a number"
    rng = None if kind is str else CountRange if nullable else IntRange if kind is int else FloatRange

    def check(spec):
        if isinstance(spec, dict) and "values" in spec:
            if set(spec) != {"values"}:
                raise ValueError("give either values: [...] or low/high, not both")
            spec = spec["values"]
        if isinstance(spec, list):
            bad = [v for v in spec if not ok(v) and not (v is None and nullable)]
            if not spec or bad:
                raise ValueError(f"{bad[0]!r} is not {what}" if bad else "empty list of values")
            if nullable and any(v is not None and v < 1 for v in spec):
                raise ValueError(f"expected integers ≥ 1 or null, got {spec!r}")
            if len(set(spec)) != len(spec):
                raise ValueError("a value is listed twice")
            return {"values": tuple(v if v is None else kind(v) for v in spec)}
        if rng is None:
            raise ValueError(f"expected a list of values from {', '.join(choices)}")
        if not isinstance(spec, dict):
            raise ValueError(
                "expected a list of values or a range {low: …, high: …, log: true|false, step: …}"
            )
        return rng.model_validate(spec).model_dump()

    # rng: for the list of known range keys
    return Annotated[(list if rng is None else rng | dict) | None, PlainValidator(check)]


def _fixed_pattern(name: str, value) -> str | None:
    """What is wrong with a fixed training-pattern value (``fixed: {data.separator: …}``), if anything:
    fit's parser reads them as plain text / integers and only the DataModule checks them."""
    if name in CHOICES and value not in CHOICES[name]:
        return f"{value!r} is not one of {', '.join(CHOICES[name])}"
    if name in NULLABLE and value is not None and not (_is_int(value) and value >= 1):
        return f"expected an integer ≥ 1 or null, got {value!r}"
    return None


class _Parameters(_File):
    unknown_key: ClassVar[str] = "hyperparameter"
    _order: tuple[str, ...] = PrivateAttr(())

    @model_validator(mode="wrap")
    @classmethod
    def _file_order(cls, data, handler):
        model = handler(data)
        model._order = tuple(data)  # the order trials draw them in, as before validation
        return model

    def specs(self) -> list[tuple[str, dict]]:
        """(name, Parameter keyword arguments) of the searched hyperparameters, in file order."""
        return [(name, getattr(self, name)) for name in self._order]


Parameters = create_model(
    "Parameters",
    __base__=_Parameters,
    **{name: (_search(name, kind), None) for name, (_, kind) in HYPERPARAMETERS.items()},
)


def _some_parameters(v):
    if not isinstance(v, dict) or not v:
        raise ValueError(
            f"expected a mapping of hyperparameters ({', '.join(HYPERPARAMETERS)}) to values or ranges"
        )
    return v


class SpaceFile(_File):
    """A space file as written (the keys are documented in ``configs/sweeps/tiny.yaml``)."""

    base: Annotated[Path, PlainValidator(lambda v: _base_config(v))] = Field(None, validate_default=True)
    objective: Annotated[
        str,
        _rule(
            lambda v: isinstance(v, str) and OBJECTIVE.match(v) is not None,
            "{v!r} is not a position / count metric; use val/transfer_score, val/position_accuracy, "
            "val/count_accuracy or val/<task>/<subtask>_accuracy",
        ),
    ] = "val/transfer_score"
    sampler: Annotated[str, _rule(lambda v: v in SAMPLERS, f"{{v!r}}; one of {', '.join(SAMPLERS)}")] = "tpe"
    pruner: Annotated[str, _rule(lambda v: v in PRUNERS, f"{{v!r}}; one of {', '.join(PRUNERS)}")] = "median"
    seed: Seed = 0
    budget: Annotated[Budget, BeforeValidator(_none_is_empty)] = Budget()
    replicates: _integer(1, MAX_REPLICATES, " (seeds per configuration)") = 1
    decodings: Annotated[
        list,
        _rule(
            lambda v: isinstance(v, list) and v and all(d in DECODINGS for d in v),
            f"expected a non-empty list of {' / '.join(DECODINGS)}, got {{v!r}}",
        ),
    ] = ["sampled"]
    evaluation: Annotated[Evaluation, BeforeValidator(_none_is_empty)] = Evaluation()
    validate_every_steps: _integer(1, note=" (optimizer steps)", optional=True) = None
    pack: _integer(1, note=" (trials sharing one base model) or null", optional=True) = None
    fixed: Annotated[
        dict[Annotated[str, PlainValidator(_fit_key)], Any], BeforeValidator(_none_is_empty)
    ] = {}
    parameters: Annotated[Parameters, BeforeValidator(_some_parameters)] = Field(None, validate_default=True)

    @model_validator(mode="after")
    def _set_once(self):
        # errors across keys carry their key in the message (they have no single location)
        if self.validate_every_steps is not None and "trainer.val_check_interval" in self.fixed:
            raise ValueError(
                "fixed.trainer.val_check_interval: validate_every_steps sets it per trial (× the "
                "trial's accumulate_grad_batches); keep one"
            )
        for name, (
            flag,
            _,
        ) in HYPERPARAMETERS.items():  # a fixed training pattern fails here, not in every trial
            problem = _fixed_pattern(name, self.fixed[flag]) if flag in self.fixed else None
            if problem:
                raise ValueError(f"fixed.{flag}: {problem}")
        for name, _ in self.parameters.specs():
            flag = HYPERPARAMETERS[name][0]
            if flag in self.fixed:
                raise ValueError(f"fixed.{flag}: also searched as parameters.{name}; keep one")
        return self


def _base_config(value) -> Path:
    if value is None:
        raise ValueError("missing: the fit config every trial starts from (e.g. configs/tiny.yaml)")
    base = config_path(str(value))
    if not base.is_file():
        raise ValueError(
            f"no such fit config {base} (paths are relative to the working directory; configs/… "
            "names a shipped config)"
        )
    return base


def load_space(path: str | Path) -> SweepSpace:
    """Read and validate a space file; every mistake is one line naming the file and the key."""
    path = Path(path)
    if not path.exists():
        raise SpellxferError(f"space file {path}: no such file")
    raw = load_file(SpaceFile, path, "sweep space file")
    fixed = raw.fixed
    # what the base config says, through fit's own parser: checked here, as a trial would fail on it
    fit = parse_base(raw.base, fixed)
    accumulate = fit.trainer.accumulate_grad_batches
    if not _is_int(accumulate) or accumulate < 1:  # fit checks it after parsing; a trial would fail on it
        where = f"{path}: fixed." if "trainer.accumulate_grad_batches" in fixed else f"{raw.base}: "
        raise SpellxferError(
            f"{where}trainer.accumulate_grad_batches: expected an integer ≥ 1, got {accumulate!r}"
        )
    replicates, base_seed = raw.replicates, fit.seed_everything
    if base_seed is True and "seed_everything" not in fixed and replicates > 1:
        base_seed = 0  # not set (Lightning's default true: a random seed): replicates count from 0
    if replicates == 1 and not _is_int(base_seed):
        base_seed = 0  # one seed: the base config's own, whatever form Lightning accepts (true, null)
    elif not _is_int(base_seed) or base_seed < 0 or base_seed + replicates - 1 > MAX_SEED:
        where = "fixed.seed_everything" if "seed_everything" in fixed else f"{raw.base}: seed_everything"
        raise SpellxferError(
            f"{path}: {where}: expected an integer from 0 to {MAX_SEED - replicates + 1} (one seed "
            f"per replicate), got {base_seed!r}"
        )
    parameters = tuple(
        Parameter(name, *HYPERPARAMETERS[name], **spec) for name, spec in raw.parameters.specs()
    )
    space = SweepSpace(
        path=path,
        base=raw.base,
        objective=raw.objective,
        sampler=raw.sampler,
        pruner=raw.pruner,
        seed=raw.seed,
        trials=raw.budget.trials,
        hours=raw.budget.hours,
        decodings=tuple(dict.fromkeys(raw.decodings)),
        evaluation=raw.evaluation.model_dump(exclude_unset=True),
        fixed=fixed,
        parameters=parameters,
        validate_every_steps=raw.validate_every_steps,
        accumulate_grad_batches=int(accumulate or 1),
        replicates=replicates,
        base_seed=base_seed,
        pack=raw.pack,
        fit=fit,
    )
    if raw.sampler == "grid":
        space.check_sampler("grid")
    return space


def parse_base(base: Path, fixed: dict):
    """The base fit config with the fixed overrides, through ``fit``'s own parser (the
    signature defaults, then the file, then the overrides): the values every trial starts from.
    A mistake is fit's one error line, with the base config named."""
    try:
        return parse_fit_config(["--config", str(base), *flags(fixed)])
    except SpellxferError as e:
        message = str(e)
        raise SpellxferError(
            message if message.startswith(str(base)) else f"{base}: {message}", key=e.key
        ) from None


def flags(overrides: dict) -> list[str]:
    """``{"model.lora_r": 8}`` as ``fit`` flags: ``["--model.lora_r", "8"]`` (JSON for non-strings)."""
    return [a for key, value in overrides.items() for a in (f"--{key}", flag_value(value))]


def flag_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


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
