"""The loggers that enforce the metric whitelist (:mod:`spellxfer.tasks.metric_names`).

Every metric spellxfer logs or saves is either a training-loop metric (loss, learning rate, grad
norm, throughput, step, epoch) or a position / count / transfer metric. Anything else — a
spelling accuracy, say — raises :class:`~spellxfer.core.errors.SpellxferError` *before* it reaches
W&B or disk: trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from spellxfer.core.doctor import wandb_mode
from spellxfer.core.outputs import atomic_file
from spellxfer.tasks.metric_names import check_metrics


class WhitelistedCSVLogger(CSVLogger):
    """Lightning's CSV logger, refusing any metric outside the whitelist; also appends one JSON
    object per logging call to ``jsonl_path`` (default: ``metrics.jsonl`` beside ``metrics.csv``).

    On a resume, :meth:`discard_from` drops the rows the interrupted run logged past the resume
    point (the resumed run logs them again), so the JSONL ends up row for row what an
    uninterrupted run writes.
    """

    def __init__(self, *args, jsonl_path: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.jsonl_path = jsonl_path

    @property
    def _jsonl(self) -> Path:
        return Path(self.jsonl_path) if self.jsonl_path else Path(self.log_dir) / "metrics.jsonl"

    # Rank 0 only, as Lightning's own log_metrics: under DDP every rank calls the logger, and each
    # would append its own copy of every row to the JSONL.
    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        check_metrics(metrics)
        super().log_metrics(metrics, step)
        path = self._jsonl
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")

    @rank_zero_only
    def discard_from(self, global_step: int) -> None:
        """Keep only the rows of the first ``global_step`` optimizer steps (on a resume from a
        checkpoint written after that many).

        A fit numbers each row with the optimizer steps done (the training row of step N and the
        validation after it: N; see ``SpellingLoRAModule._log_step``), so a run resumed at step N
        logs ``step`` > N from then on. ``metrics.csv`` is restarted by Lightning's CSV writer on
        resume; the kept rows go back into it too.
        """
        path = self._jsonl
        if not path.is_file():
            return
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [r for r in rows if r.get("step") is None or r["step"] <= global_step]
        if len(kept) != len(rows):
            with atomic_file(path) as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self.experiment.metrics[:0] = [dict(r) for r in kept]


class WhitelistedWandbLogger(WandbLogger):
    """Lightning's W&B logger, refusing any metric outside the whitelist. Offline unless W&B
    credentials are configured (``wandb sync`` uploads offline runs later)."""

    def __init__(self, *args, offline: bool | None = None, **kwargs):
        if offline is None:
            offline = wandb_mode() != "online"
        super().__init__(*args, offline=offline, **kwargs)
        # W&B looks for the git repository from its run directory before creating it ("wandb:
        # WARNING git root … does not exist", and no commit recorded): create it first.
        if self.save_dir:
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
        # Lightning 2.6 always passes `anonymous` (None when unset), which W&B ≥ 0.2x warns has
        # no effect; leaving it out is W&B's default.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        check_metrics(metrics)
        super().log_metrics(metrics, step)


def optimizer_step(row: dict) -> int | None:
    """Optimizer steps done when a ``metrics.jsonl`` row was logged: its ``global_step``, which
    every row of a fit carries (0 for the step-0 validation of the base model; ``step`` is the
    same number). Logs written before rows were renumbered have it in validation rows only and
    number the others with Lightning's count before the row's step: those read as ``step`` + 1."""
    global_step, step = row.get("global_step"), row.get("step")
    if isinstance(global_step, int | float) and not isinstance(global_step, bool):
        return int(global_step)
    if isinstance(step, int) and not isinstance(step, bool):
        return step + 1
    return None


def steps_trained(path: Path) -> int | None:
    """Optimizer steps a fit actually ran (early stopping ends it before ``max_steps``): the last
    step its ``metrics.jsonl`` logged. None when the file is missing or holds no step."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    steps = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if isinstance(row, dict) and (step := optimizer_step(row)) is not None:
            steps.append(step)
    return max(steps, default=None)
