"""The metric whitelist: the only metric names spellxfer logs, saves or reports.

Every metric is either a training-loop metric (loss, learning rate, grad norm, throughput, step,
epoch) or a position / count / transfer metric. Anything else — a spelling accuracy, say — raises
:class:`~spellxfer.core.errors.SpellxferError` before it reaches W&B, disk or a report: trained on
spelling, evaluated on position and count only. The loggers that enforce it in training are in
:mod:`spellxfer.training.loggers`; analysis checks every table column against it too.
"""

from __future__ import annotations

import re

from spellxfer.core.errors import SpellxferError

_SPLIT = r"(?:train|val|test)"
_SUBTASK = r"[a-z][a-z0-9_]*"
ALLOWED = (
    # training-loop metrics
    re.compile(
        rf"^(?:{_SPLIT}/)?"
        r"(?:loss|real_tokens|tokens_per_second|grad_norm|lr|learning_rate)(?:_step|_epoch)?$"
    ),
    re.compile(r"^(?:lr-[A-Za-z0-9_]+(?:/pg\d+)?(?:-momentum)?|step|epoch|global_step|trainer/global_step)$"),
    # position / count / transfer metrics, overall and per subtask
    # generation accuracy, and the likelihood probe's
    re.compile(rf"^(?:{_SPLIT}/)?(?:position|count)(?:_likelihood)?_accuracy$"),
    re.compile(rf"^(?:{_SPLIT}/)?(?:position|count)/{_SUBTASK}_accuracy$"),
    re.compile(rf"^(?:{_SPLIT}/)?transfer_score$"),
)


def check_metric_name(name: str) -> None:
    """Raise unless ``name`` is a training-loop or a position / count / transfer metric."""
    base = re.sub(r"/dataloader_idx_\d+$", "", name)
    if not any(p.match(base) for p in ALLOWED):
        raise SpellxferError(
            f"metric {name!r} is not allowed: spellxfer logs only training-loop metrics (loss, lr, "
            "grad norm, throughput) and position / count / transfer metrics"
        )


def check_metrics(metrics: dict) -> None:
    """Raise unless every key of ``metrics`` passes :func:`check_metric_name`."""
    for name in metrics:
        check_metric_name(name)
