"""Exact-match accuracy of position and count answers as a torchmetrics ``Metric``.

Each item is scored by :func:`spellxfer.tasks.parsing.score`; :class:`TransferAccuracy`
aggregates the verdicts into position and count accuracy (and their mean, the transfer score) in
a form that sums correctly across DDP ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from spellxfer.core.errors import SpellxferError
from spellxfer.tasks.names import COUNT_SUBTASKS, POSITION_SUBTASKS, TASKS


class TransferAccuracy(Metric):
    """Exact-match accuracy per task (position, count) and per subtask, plus the transfer score.

    State is two fixed-size ``long`` tensors, ``correct`` and ``total``, with one slot per group
    (the two tasks, then each configured subtask) and ``dist_reduce_fx="sum"``, so syncing across
    DDP ranks is an elementwise sum and the result is the same as one process seeing every item.
    The groups are fixed at construction for that reason: ranks must agree on the layout.

    ``compute()`` returns, for groups with at least one item only (never NaN):

    * ``position_accuracy``, ``count_accuracy``;
    * ``transfer_score``: the unweighted mean of the two, present only when both tasks have items,
      so neither task dominates because it happens to have more questions;
    * ``{task}/{subtask}_accuracy``, e.g. ``position/nth_letter_accuracy``.

    Args:
        position_subtasks: subtask names reported under ``position``.
        count_subtasks: subtask names reported under ``count``.
        **kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``…).
    """

    is_differentiable = False
    higher_is_better = True
    # Each update only adds to the sums, so torchmetrics may skip the expensive full-state path
    # in forward(); this also makes merge_state() available.
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(
        self,
        position_subtasks: Sequence[str] = POSITION_SUBTASKS,
        count_subtasks: Sequence[str] = COUNT_SUBTASKS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._slot: dict[tuple[str, str | None], int] = {(task, None): i for i, task in enumerate(TASKS)}
        for task, subtasks in (("position", position_subtasks), ("count", count_subtasks)):
            if isinstance(subtasks, str):
                raise SpellxferError(f"{task}_subtasks must be a list of names, got the string {subtasks!r}")
            for subtask in subtasks:
                if not subtask or "/" in subtask:
                    raise SpellxferError(
                        f"{task} subtask name {subtask!r} must be non-empty and contain no '/'"
                    )
                if (task, subtask) in self._slot:
                    raise SpellxferError(f"{task} subtask {subtask!r} is listed twice")
                self._slot[(task, subtask)] = len(self._slot)
        self.group_keys: tuple[str, ...] = tuple(
            f"{task}_accuracy" if subtask is None else f"{task}/{subtask}_accuracy"
            for task, subtask in self._slot
        )
        n = len(self._slot)
        self.add_state("correct", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        tasks: Sequence[str],
        subtasks: Sequence[str | None],
        correct: Tensor | Sequence[bool],
    ) -> None:
        """Add a batch of verdicts.

        Args:
            tasks: ``"position"`` or ``"count"`` per item.
            subtasks: subtask name per item, or ``None``; a name not configured for that item's task
                counts toward the task only.
            correct: one verdict per item, as bools or 0/1 (a tensor or a sequence).

        Raises:
            SpellxferError: for a task other than position or count.
            ValueError: if the three arguments differ in length or a verdict is not 0/1.
        """
        verdicts = torch.as_tensor(correct, device=self.total.device).reshape(-1)
        if not (len(tasks) == len(subtasks) == verdicts.numel()):
            raise ValueError(
                f"update() needs one task, subtask and verdict per item; got {len(tasks)} tasks, "
                f"{len(subtasks)} subtasks and {verdicts.numel()} verdicts"
            )
        if verdicts.dtype != torch.bool and not ((verdicts == 0) | (verdicts == 1)).all():
            raise ValueError(f"verdicts must be booleans or 0/1, got {verdicts.tolist()}")
        verdicts = verdicts.long()

        # Each item adds to its task slot and, if known, its subtask slot.
        slots: list[int] = []
        items: list[int] = []
        for i, (task, subtask) in enumerate(zip(tasks, subtasks, strict=True)):
            task_slot = self._slot.get((task, None))
            if task_slot is None:
                raise SpellxferError(
                    f"unknown task {task!r} at batch index {i}; expected one of {list(TASKS)}"
                )
            slots.append(task_slot)
            items.append(i)
            subtask_slot = self._slot.get((task, subtask)) if subtask is not None else None
            if subtask_slot is not None:
                slots.append(subtask_slot)
                items.append(i)
        if not slots:
            return
        index = torch.tensor(slots, dtype=torch.long, device=self.total.device)
        item_index = torch.tensor(items, dtype=torch.long, device=self.total.device)
        self.total.index_add_(0, index, torch.ones_like(index))
        self.correct.index_add_(0, index, verdicts[item_index])

    def compute(self) -> dict[str, Tensor]:
        """Return the accuracies of non-empty groups and, when both tasks have items, the transfer score."""
        # clamp only keeps empty slots finite; they are left out below, so no NaN is ever reported.
        accuracy = self.correct.double() / self.total.double().clamp(min=1)
        nonempty = (self.total > 0).tolist()
        out = {key: accuracy[i].float() for i, key in enumerate(self.group_keys) if nonempty[i]}
        if "position_accuracy" in out and "count_accuracy" in out:
            out["transfer_score"] = ((accuracy[0] + accuracy[1]) / 2).float()
        return out

    def counts(self) -> dict[str, tuple[int, int]]:
        """Return ``(correct, total)`` per non-empty group, keyed like :meth:`compute`.

        Synced across ranks the same way as ``compute()``, so intervals (Wilson, exact binomial)
        computed from these integers match the reported accuracies.
        """
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, process_group=self.process_group, should_sync=self.sync_on_compute
        ):
            correct = self.correct.tolist()
            total = self.total.tolist()
        return {key: (correct[i], total[i]) for i, key in enumerate(self.group_keys) if total[i] > 0}

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another metric's sums to this one (see :meth:`torchmetrics.Metric.merge_state`).

        Raises:
            ValueError: if the other metric was built with different subtasks, since the slots of
                the two ``correct``/``total`` tensors would then mean different groups.
        """
        if isinstance(incoming_state, TransferAccuracy) and incoming_state.group_keys != self.group_keys:
            raise ValueError(
                f"cannot merge TransferAccuracy with groups {list(incoming_state.group_keys)} "
                f"into one with groups {list(self.group_keys)}"
            )
        if isinstance(incoming_state, dict):
            for name in ("correct", "total"):
                shape = tuple(torch.as_tensor(incoming_state[name]).shape)
                expected = tuple(getattr(self, name).shape)
                if shape != expected:
                    raise ValueError(f"incoming {name!r} state has shape {shape}, expected {expected}")
        super().merge_state(incoming_state)
