"""Task and subtask names, defined once for every step.

Training is spelling only (:data:`TRAINING_SUBTASKS`), or the non-spelling control
(:data:`CONTROL_SUBTASKS`) of the study's control arm; evaluation is position and count only
(:data:`TASKS`), each with its subtasks (:data:`SUBTASKS_BY_TASK`). Metric names are built from
these (``val/position/nth_letter_accuracy``), so a subtask name holds no ``/``.
"""

from __future__ import annotations

TASKS = ("position", "count")
POSITION_SUBTASKS = ("nth_letter", "letter_index")
COUNT_SUBTASKS = ("word_length", "letter_count")
SUBTASKS_BY_TASK = {"position": POSITION_SUBTASKS, "count": COUNT_SUBTASKS}

# "spell" comes first: every training word gets it, the others are sampled (data build).
TRAINING_SUBTASKS = ("spell", "spell_reversed", "spell_numbered", "inverse")
# The non-spelling control (task "control"): the same words, no letter-level structure.
CONTROL_SUBTASKS = ("repeat", "case")
