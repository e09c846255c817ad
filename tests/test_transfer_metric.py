"""TransferAccuracy against hand-computed values, and its state summing correctly across ranks."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spellxfer.core.errors import SpellxferError
from spellxfer.evaluation.metrics import TransferAccuracy

# Eight verdicts whose accuracies are easy to check by hand:
#   position/nth_letter   1 of 2 -> 0.5      count/word_length   1 of 1 -> 1.0
#   position/letter_index 2 of 2 -> 1.0      count/letter_count  0 of 1 -> 0.0
#   position              3 of 4 -> 0.75     count               1 of 2 -> 0.5
#   transfer score = (0.75 + 0.5) / 2 = 0.625 (unweighted: count has half as many items)
POSITION_BATCH = (
    ["position", "position", "position", "position"],
    ["nth_letter", "nth_letter", "letter_index", "letter_index"],
    [True, False, True, True],
)
COUNT_BATCH = (["count", "count"], ["word_length", "letter_count"], [True, False])

EXPECTED = {
    "position_accuracy": 0.75,
    "count_accuracy": 0.5,
    "transfer_score": 0.625,
    "position/nth_letter_accuracy": 0.5,
    "position/letter_index_accuracy": 1.0,
    "count/word_length_accuracy": 1.0,
    "count/letter_count_accuracy": 0.0,
}
EXPECTED_COUNTS = {
    "position_accuracy": (3, 4),
    "count_accuracy": (1, 2),
    "position/nth_letter_accuracy": (1, 2),
    "position/letter_index_accuracy": (2, 2),
    "count/word_length_accuracy": (1, 1),
    "count/letter_count_accuracy": (0, 1),
}


def as_floats(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: value.item() for key, value in result.items()}


def test_hand_computed_accuracies():
    metric = TransferAccuracy()
    metric.update(*POSITION_BATCH)
    metric.update(*COUNT_BATCH)

    assert as_floats(metric.compute()) == EXPECTED
    assert metric.counts() == EXPECTED_COUNTS


def test_one_batch_with_mixed_tasks_equals_two_batches():
    mixed = TransferAccuracy()
    mixed.update(
        POSITION_BATCH[0] + COUNT_BATCH[0],
        POSITION_BATCH[1] + COUNT_BATCH[1],
        torch.tensor(POSITION_BATCH[2] + COUNT_BATCH[2]),
    )
    assert as_floats(mixed.compute()) == EXPECTED


@pytest.mark.parametrize(
    "verdicts",
    [[True, False], [1, 0], torch.tensor([True, False]), torch.tensor([1, 0]), torch.tensor([[1], [0]])],
    ids=["bools", "ints", "bool-tensor", "int-tensor", "column-tensor"],
)
def test_verdict_formats_are_equivalent(verdicts):
    metric = TransferAccuracy()
    metric.update(["count", "count"], ["word_length", "word_length"], verdicts)
    assert metric.counts() == {"count_accuracy": (1, 2), "count/word_length_accuracy": (1, 2)}


def test_empty_groups_are_omitted_not_nan():
    metric = TransferAccuracy()
    metric.update(["position", "position"], ["nth_letter", "nth_letter"], [True, False])

    result = as_floats(metric.compute())
    # No count items: no count accuracy, no transfer score, no empty subtask keys.
    assert result == {"position_accuracy": 0.5, "position/nth_letter_accuracy": 0.5}


def test_unknown_or_missing_subtask_counts_toward_its_task_only():
    metric = TransferAccuracy()
    # "nth_letter" is a position subtask, so under "count" it is unknown too.
    metric.update(["count", "count", "count"], ["vowel_count", None, "nth_letter"], [True, False, True])

    assert metric.counts() == {"count_accuracy": (2, 3)}


def test_custom_subtask_names():
    metric = TransferAccuracy(position_subtasks=["first_letter"], count_subtasks=["vowel_count"])
    metric.update(["position", "position", "count"], ["first_letter", "nth_letter", "vowel_count"], [1, 1, 0])

    assert as_floats(metric.compute()) == {
        "position_accuracy": 1.0,
        "count_accuracy": 0.0,
        "transfer_score": 0.5,
        "position/first_letter_accuracy": 1.0,
        "count/vowel_count_accuracy": 0.0,
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"position_subtasks": ["nth_letter", "nth_letter"]},
        {"count_subtasks": [""]},
        {"count_subtasks": ["letter/count"]},
        {"count_subtasks": "letter_count"},
    ],
    ids=["duplicate", "empty", "slash", "bare-string"],
)
def test_invalid_subtask_configuration_is_rejected(kwargs):
    with pytest.raises(SpellxferError):
        TransferAccuracy(**kwargs)


def test_unknown_task_is_rejected_and_leaves_state_untouched():
    metric = TransferAccuracy()
    metric.update(*COUNT_BATCH)

    with pytest.raises(SpellxferError, match=r"unknown task 'rhyme' at batch index 1"):
        metric.update(["count", "rhyme"], ["word_length", None], [True, True])

    assert metric.counts() == {
        "count_accuracy": (1, 2),
        "count/word_length_accuracy": (1, 1),
        "count/letter_count_accuracy": (0, 1),
    }


def test_mismatched_lengths_and_non_binary_verdicts_are_rejected():
    metric = TransferAccuracy()
    with pytest.raises(ValueError, match="2 tasks, 1 subtasks and 2 verdicts"):
        metric.update(["count", "count"], ["word_length"], [True, True])
    with pytest.raises(ValueError, match="0/1"):
        metric.update(["count"], ["word_length"], torch.tensor([0.5]))


def test_merged_states_equal_one_metric_over_all_data():
    # What DDP does at compute time, done by hand: each "rank" sees part of the data.
    rank0, rank1, whole = TransferAccuracy(), TransferAccuracy(), TransferAccuracy()
    rank0.update(*POSITION_BATCH)
    rank1.update(*COUNT_BATCH)
    whole.update(*POSITION_BATCH)
    whole.update(*COUNT_BATCH)

    rank0.merge_state(rank1)

    assert as_floats(rank0.compute()) == as_floats(whole.compute()) == EXPECTED
    assert rank0.counts() == whole.counts()


def test_merging_a_state_dict_equals_one_metric_over_all_data():
    # The form a state arrives in when gathered from another process or loaded from disk.
    rank0, rank1 = TransferAccuracy(), TransferAccuracy()
    rank0.update(*POSITION_BATCH)
    rank1.update(*COUNT_BATCH)

    rank0.merge_state({"correct": rank1.correct, "total": rank1.total})

    assert as_floats(rank0.compute()) == EXPECTED


def test_merging_metrics_with_different_groups_is_rejected():
    default, custom = TransferAccuracy(), TransferAccuracy(count_subtasks=["vowel_count"])
    with pytest.raises(ValueError, match="cannot merge"):
        default.merge_state(custom)
    with pytest.raises(ValueError, match="shape"):
        default.merge_state({"correct": custom.correct, "total": custom.total})


def test_forward_returns_batch_values_and_accumulates():
    # Lightning calls metric(...) per step; the step value is the batch alone, compute() the epoch.
    metric = TransferAccuracy()
    batch_value = metric(*COUNT_BATCH)
    assert as_floats(batch_value) == {
        "count_accuracy": 0.5,
        "count/word_length_accuracy": 1.0,
        "count/letter_count_accuracy": 0.0,
    }
    metric(*POSITION_BATCH)
    assert as_floats(metric.compute()) == EXPECTED


def test_reset_clears_all_groups():
    metric = TransferAccuracy()
    metric.update(*POSITION_BATCH)
    metric.update(*COUNT_BATCH)
    metric.reset()

    assert metric.counts() == {}
    metric.update(["count"], ["letter_count"], [True])
    assert as_floats(metric.compute()) == {"count_accuracy": 1.0, "count/letter_count_accuracy": 1.0}


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metric = TransferAccuracy()
        # Each rank holds only one task, so the transfer score exists only after the sync.
        metric.update(*(POSITION_BATCH if rank == 0 else COUNT_BATCH))
        result = {
            "compute": as_floats(metric.compute()),
            "counts": metric.counts(),
            # compute() must restore the local sums so accumulation can go on after logging.
            "local_total": metric.total.tolist(),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_real_two_process_gloo_sync_matches_single_process(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)

    for rank, local_total in ((0, [4, 0, 2, 2, 0, 0]), (1, [0, 2, 0, 0, 1, 1])):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["compute"] == EXPECTED
        assert {key: tuple(value) for key, value in result["counts"].items()} == EXPECTED_COUNTS
        assert result["local_total"] == local_total
