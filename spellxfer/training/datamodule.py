"""Batches for fit: tokenized spelling rows to train on, position/count questions to evaluate.

Training: ``spelling_train.jsonl`` → :func:`read_training_rows` (every line checked, then read
by ``datasets`` with the build's fixed Features) → the training pattern's rows
(:mod:`spellxfer.data.patterns`: ``variants``, ``separator``, ``distinct_words``, and
``train_set control`` for the same rows of the non-spelling control file) →
:func:`tokenize_example` (prompt masked with -100; the tokenized examples are an in-memory
Arrow ``datasets.Dataset``) →
:class:`LengthGroupedBatchSampler` (similar lengths together, batches sharded across ranks) →
:class:`SpellingCollator` (right-padded tensors) → the loss in :mod:`spellxfer.models.losses`.

Evaluation: ``position_val.jsonl`` and ``count_val.jsonl`` (``*_test`` for test) →
:func:`~spellxfer.tasks.questions.load_questions` → batches that are plain lists of
:class:`~spellxfer.tasks.questions.Item`. Nothing is tokenized for evaluation here: the
validation step generates with the shared engine and scores parsed replies, exactly as
``spellxfer evaluate`` does.

Why ``datasets`` for training rows: the file is read with the fixed Features every ``data build``
file has and its dataset card declares (:mod:`spellxfer.data.schema`) — the call a user loads it
with — so a file that drifts from the schema fails at ``setup``, and the tokenized examples live
in Arrow buffers (about a quarter of the memory of Python lists, shared with DataLoader workers).
Evaluation files keep :func:`~spellxfer.tasks.questions.load_questions`: they may be a user's CSV,
and their rows become Items.

The data directory is the output of ``spellxfer data build``; :class:`SpellingDataModule` can build
it on first use. Training rows must all be ``task: spelling`` (``task: control`` in the control
file) and evaluation rows position/count — the project's policy, checked again here so that a
hand-edited file cannot slip through: trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import iter_jsonl
from spellxfer.data.build import CONTROL_FILE, FILES, build
from spellxfer.data.patterns import check_patterns, select_rows
from spellxfer.models.losses import IGNORE_INDEX
from spellxfer.models.registry import load_tokenizer
from spellxfer.tasks.chat import end_of_turn_ids, format_prompt
from spellxfer.tasks.questions import Item, load_questions

if TYPE_CHECKING:
    import datasets

TRAIN_FILE = "spelling_train.jsonl"
EVAL_FILES = {
    "val": {"position": "position_val.jsonl", "count": "count_val.jsonl"},
    "test": {"position": "position_test.jsonl", "count": "count_test.jsonl"},
}


def tokenize_example(tokenizer, question: str, answer: str) -> dict[str, list[int]]:
    """One training example: the chat prompt, then the answer and the end-of-turn token.

    Returns ``input_ids`` and ``labels`` of equal length; labels are -100 on every prompt token and
    equal to ``input_ids`` on the completion (answer tokens + end-of-turn id), so the model learns
    the answer *and* to stop after it. See :func:`tokenize_examples` for the details.
    """
    return tokenize_examples(tokenizer, [question], [answer])[0]


def tokenize_examples(
    tokenizer, questions: Sequence[str], answers: Sequence[str]
) -> list[dict[str, list[int]]]:
    """Batched :func:`tokenize_example`: two fast-tokenizer calls for any number of rows.

    The prompt is :func:`~spellxfer.tasks.chat.format_prompt` (for Qwen3 it ends in the
    empty think block), tokenized on its own without added special tokens — the ids the generation
    engine feeds at evaluation time. The answer is tokenized separately and the ids concatenated:
    tokenizing ``prompt + answer`` as one string would let BPE merge across the boundary, moving
    the first answer characters into a prompt token (or vice versa) and shifting the label split
    away from what the model sees when it generates. The end-of-turn token is appended as an id
    (``end_of_turn_ids(tokenizer)[0]``, ``<|im_end|>`` for Qwen3 and SmolLM2), never as text, so it
    cannot be split or merged either.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    eot = end_of_turn_ids(tokenizer)[0]
    prompts = [format_prompt(tokenizer, q) for q in questions]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    return [
        {"input_ids": [*p, *a, eot], "labels": [IGNORE_INDEX] * len(p) + [*a, eot]}
        for p, a in zip(prompt_ids, answer_ids)
    ]


@dataclass(frozen=True)
class SpellingCollator:
    """Right-pads tokenized examples into tensors for a training step.

    Returns ``input_ids``, ``attention_mask`` (1 on real tokens), ``labels`` (-100 on padding) as
    ``[batch, longest example]`` long tensors, and ``n_real_tokens`` (an int, so logging
    throughput costs no device sync). Padding is decided by position, never by comparing ids:
    SmolLM2's pad token *is* its end-of-turn token, which must stay supervised.
    Right padding, whatever the tokenizer's ``padding_side`` (left, for generation): causal
    attention lets real tokens ignore pads that come after them, and position ids start at 0.
    """

    pad_token_id: int
    """Id written into padded ``input_ids`` slots (``tokenizer.pad_token_id``); never attended to."""

    def __call__(self, examples: Sequence[Mapping[str, Sequence[int]]]) -> dict:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "n_real_tokens": sum(len(e["input_ids"]) for e in examples),
        }


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar-length examples, reshuffled each epoch, sharded across DDP ranks.

    Each epoch: shuffle all indices; cut them into mega-batches of ``mega_batch_factor ×
    batch_size``; sort each mega-batch by length (longest first) and cut it into batches; shuffle
    the batch order; move the batch holding the longest example to the front, so an out-of-memory
    error shows on step 1 rather than hours in (on every rank alike: ranks step in lockstep and
    ranks share a GPU type). Sorting within mega-batches rather than globally keeps batches random
    enough that consecutive steps do not march from short to long examples.

    Every rank computes the same global batch list from ``seed`` and the epoch, then takes every
    ``num_replicas``-th batch starting at ``rank``, so ranks get disjoint batches. All ranks must
    run the same number of steps (DDP would hang otherwise); when the batch count is not a multiple
    of ``num_replicas``:

    * ``drop_last=False`` (default) repeats the first batches of the epoch to fill the gap, as
      ``DistributedSampler`` does: every example is seen at least once, a few twice;
    * ``drop_last=True`` drops the surplus batches: every example at most once.

    The last batch of an epoch may hold fewer than ``batch_size`` examples; it is kept.

    Lightning: calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` (never on the batch
    sampler itself), hence :attr:`sampler` points here. Under DDP, train with
    ``Trainer(use_distributed_sampler=False)``: Lightning's distributed sampler would reshuffle
    the indices and undo the grouping, and this class already shards.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        mega_batch_factor: int = 50,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        """
        Args:
            lengths: tokens per example, indexed like the dataset.
            batch_size: examples per batch (per rank).
            seed: shuffling seed, shared by all ranks.
            mega_batch_factor: mega-batch size in batches; larger groups lengths more tightly but
                makes batch composition less random.
            num_replicas: number of ranks; default the initialised process group's size, else 1.
            rank: this rank; default the process group's rank, else 0.
            drop_last: how to even out batch counts across ranks (see the class docstring).
        """
        distributed = dist.is_available() and dist.is_initialized()
        num_replicas = (
            num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        )
        rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if batch_size < 1 or mega_batch_factor < 1:
            raise ValueError(
                f"batch_size and mega_batch_factor must be ≥ 1, got {batch_size}, {mega_batch_factor}"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if not lengths:
            raise ValueError("no examples to batch")
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.mega_batch_factor = batch_size, seed, mega_batch_factor
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.epoch = 0
        self.skip_batches = 0
        """Batches of this rank to skip at the start of the next ``iter()`` only: set when
        resuming mid-epoch (:class:`~spellxfer.training.checkpointing.ResumeState`)."""
        if len(self) == 0:
            raise ValueError(
                f"{math.ceil(len(self.lengths) / batch_size)} batches cannot be shared by {num_replicas} "
                "ranks with drop_last=True; use drop_last=False or a smaller batch_size"
            )

    @property
    def sampler(self) -> LengthGroupedBatchSampler:
        """This object, where Lightning's epoch hook looks for ``set_epoch`` (see the class docstring)."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle the next ``iter()`` yields (call before each epoch)."""
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """This epoch's batches for all ranks together, before sharding and evening out."""
        rng = random.Random(f"spellxfer-length-groups-{self.seed}-{self.epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        mega = self.batch_size * self.mega_batch_factor
        batches = []
        for start in range(0, len(order), mega):
            # sorted() is stable: equal lengths keep their shuffled order, so ties stay random.
            group = sorted(order[start : start + mega], key=self.lengths.__getitem__, reverse=True)
            batches.extend(group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size))
        rng.shuffle(batches)
        # Each batch is sorted longest first, so its first index carries its longest example.
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
        batches.insert(0, batches.pop(longest))
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        surplus = len(batches) % self.num_replicas
        if self.drop_last:
            batches = batches[: len(batches) - surplus]
        elif surplus:
            gap = self.num_replicas - surplus
            batches += (batches * math.ceil(gap / len(batches)))[:gap]
        mine = batches[self.rank :: self.num_replicas]
        skip, self.skip_batches = self.skip_batches, 0
        return iter(mine[skip:])

    def __len__(self) -> int:
        n = math.ceil(len(self.lengths) / self.batch_size)
        return n // self.num_replicas if self.drop_last else math.ceil(n / self.num_replicas)


def _keep_items(batch: list[Item]) -> list[Item]:
    # A module-level function, not a lambda: DataLoader workers pickle their collate_fn.
    return batch


class SpellingDataModule(L.LightningDataModule):
    """The data of one spellxfer run: spelling rows to train on, position/count items to evaluate.

    Lifecycle (Lightning calls these in order): ``prepare_data`` builds ``data_dir`` with
    ``spellxfer data build`` when it lacks files and ``build_profile`` is set (rank 0 only; builds
    files, assigns no state); ``setup(stage)`` reads and validates the files on every rank;
    ``train_dataloader`` yields length-grouped, right-padded token batches; ``val_dataloader`` and
    ``test_dataloader`` yield two loaders each — position items, then count items — whose batches
    are lists of :class:`~spellxfer.tasks.questions.Item`.

    Multi-GPU training needs ``Trainer(use_distributed_sampler=False)`` (see
    :class:`LengthGroupedBatchSampler`). Evaluation items are then sharded by rank
    (``items[rank::world_size]``, no padding duplicates): each item is generated once, and the
    metric's summed counts are exact.

    Args:
        data_dir: directory with the files of ``spellxfer data build``.
        model: model name (as in ``spellxfer.models.registry``) whose tokenizer encodes training rows.
        build_profile: profile to build ``data_dir`` with if files are missing (``demo``: minutes on
            a CPU; ``full``: the real experiment). None: never build; missing files are an error.
        seed: seed of the data build and of the per-epoch batch shuffle.
        batch_size: examples per training batch per device.
        eval_batch_size: questions per validation / test generation batch: ``auto`` (default)
            hands the generation engine each task's whole shard, and the engine cuts it into
            batches sized from free device memory (at most 2,048 questions; 32 on a CPU); an
            integer N hands it N at a time (it still splits a batch that would not fit).
        max_length: longest training example in tokens (prompt + answer + end of turn); longer
            examples are dropped, not truncated, since a truncated answer teaches a wrong spelling.
        train_limit: train on only the first N rows of the selection below (the builder shuffles
            them); None: all.
        variants: which spelling variants train: ``spell`` (with its capitals form),
            ``spell+reversed``, ``spell+numbered``, ``spell+inverse`` or ``all`` (the four).
        separator: ``any``, or the one separator style (``spaces``, ``commas``, ``dashes``,
            ``dots``, ``arrows``) whose rows train; rows without one (``spell_numbered``) stay.
        distinct_words: train on the rows of only N words, the first N of an order shuffled by
            ``seed`` (same seed → same words); None: every word.
        train_set: ``spelling``, or ``control``: the non-spelling control arm, the control file's
            rows at the positions the options above select in the spelling file (the same words,
            as many rows). Details: :mod:`spellxfer.data.patterns`. The defaults train on every
            row of ``spelling_train.jsonl`` in file order.
        val_limit: first N rows of each validation file; None (the default): all of them, so checkpoint
            selection and early stopping see every validation question (docs/training.md gives the cost).
        test_limit: first N rows of each test file; None: all.
        num_workers: DataLoader worker processes for training batches (0: in the main process,
            enough for pre-tokenized rows).
    """

    def __init__(
        self,
        data_dir: str,
        model: str,
        build_profile: Literal["demo", "full"] | None = "demo",
        seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: int | Literal["auto"] = "auto",
        max_length: int = 256,
        train_limit: int | None = None,
        val_limit: int | None = None,
        test_limit: int | None = None,
        num_workers: int = 0,
        variants: str = "all",
        separator: str = "any",
        distinct_words: int | None = None,
        train_set: str = "spelling",
    ) -> None:
        super().__init__()
        if eval_batch_size != "auto" and (
            isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int)
        ):
            raise SpellxferError(
                f"--data.eval_batch_size must be auto or an integer ≥ 1, got {eval_batch_size!r}"
            )
        for key, value, low in (
            ("batch_size", batch_size, 1),
            ("eval_batch_size", None if eval_batch_size == "auto" else eval_batch_size, 1),
            ("max_length", max_length, 2),
            ("num_workers", num_workers, 0),
            ("train_limit", train_limit, 1),
            ("val_limit", val_limit, 1),
            ("test_limit", test_limit, 1),
        ):
            if value is not None and value < low:
                raise SpellxferError(f"--data.{key} must be ≥ {low}, got {value}", key=f"data.{key}")
        check_patterns(variants, separator, distinct_words, train_set)
        if build_profile not in ("demo", "full", None):
            raise SpellxferError(
                f"--data.build_profile must be demo, full or null, got {build_profile!r}",
                key="data.build_profile",
            )
        # logger=False: Lightning would merge these into the module's hparams and refuse a `seed`
        # that differs from the model's (data order vs. weights and sampling: both are fine);
        # RunManifest logs them nested under `data`, beside the full resolved config.
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir)
        self.model_name = model
        self.build_profile, self.seed, self.batch_size = build_profile, seed, batch_size
        self.eval_batch_size = eval_batch_size
        self.max_length, self.num_workers = max_length, num_workers
        self.limits = {"train": train_limit, "val": val_limit, "test": test_limit}
        self.variants, self.separator = variants, separator
        self.distinct_words, self.train_set = distinct_words, train_set
        if (variants, separator, distinct_words) != ("all", "any", None) and (
            self.data_dir / TRAIN_FILE
        ).is_file():
            # a selection the data cannot give fails here, before the model and Trainer start
            # (setup selects again, from the rows it reads)
            fields = [
                (r.get("subtask"), r.get("separator"), r.get("word"))
                for _, r in iter_jsonl(self.data_dir / TRAIN_FILE)
                if isinstance(r, dict)
            ]
            select_rows(
                *(zip(*fields) if fields else ((), (), ())),
                variants=variants,
                separator=separator,
                distinct_words=distinct_words,
                seed=seed,
                where=str(self.data_dir / TRAIN_FILE),
            )
        self._tokenizer = None
        self._resume_position: dict | None = None
        self.train_examples: datasets.Dataset | None = None
        """Tokenized training rows (``input_ids``, ``labels``, ``length``), filled by ``setup``."""
        self.n_dropped = 0
        """Training rows dropped for exceeding ``max_length`` in the last ``setup``."""
        self.eval_items: dict[str, dict[str, list[Item]]] = {}
        """``{"val"|"test": {"position": [...], "count": [...]}}``, filled by ``setup``."""

    @property
    def tokenizer(self):
        """The model's tokenizer, loaded on first use (``setup`` needs it; ``prepare_data`` does not)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_name)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        """Use an already loaded ``load_tokenizer(model_name)`` (a pack shares one across its trials)."""
        self._tokenizer = tokenizer

    @property
    def pattern(self) -> tuple:
        """What decides which training rows :meth:`setup` selects besides the files and limits (the
        seed only with ``distinct_words``): trials of a pack with equal patterns share them."""
        seed = self.seed if self.distinct_words is not None else None
        return (self.variants, self.separator, self.distinct_words, self.train_set, seed)

    def prepare_data(self) -> None:
        """Build ``data_dir`` if it lacks files and ``build_profile`` is set (seconds for demo)."""
        missing = self._missing_files()
        if not missing:
            return
        if self.build_profile is None:
            raise self._missing_error(missing)
        if self.data_dir.is_dir() and any(self.data_dir.iterdir()):
            raise SpellxferError(
                f"{self.data_dir}: incomplete data directory (missing {', '.join(missing)}); delete it "
                "to rebuild, or point --data.data_dir at an empty or absent directory"
            )
        build(str(self.data_dir), profile=self.build_profile, seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        """Load what ``stage`` needs (``fit``: train + val; ``validate``: val; ``test`` and
        ``predict``: test; None: all)."""
        missing = self._missing_files()
        if missing:
            raise self._missing_error(missing)
        if stage in ("fit", None) and self.train_examples is None:
            self.train_examples = self._load_train()
        for split, stages in (("val", ("fit", "validate", None)), ("test", ("test", "predict", None))):
            if stage in stages and split not in self.eval_items:
                self.eval_items[split] = self._load_eval(split)

    def train_dataloader(self) -> DataLoader:
        """Length-grouped, right-padded batches of tokenized spelling rows."""
        examples = self._loaded(self.train_examples, "fit")
        trainer = self.trainer
        # Private attribute, read for one reason: failing with the fix instead of training on
        # batches whose length grouping Lightning's DistributedSampler has silently undone.
        if (
            trainer is not None
            and trainer.world_size > 1
            and trainer._accelerator_connector.use_distributed_sampler
        ):
            raise SpellxferError(
                "multi-device training needs --trainer.use_distributed_sampler false: spellxfer's "
                "length-grouped batch sampler shards batches across ranks itself"
            )
        sampler = LengthGroupedBatchSampler(examples["length"][:], self.batch_size, seed=self.seed)
        if self._resume_position is not None:
            # Resuming mid-epoch: this epoch's shuffle, minus the batches already trained on.
            # (Lightning creates this loader's iterator before it calls set_epoch.)
            epoch, done = self._resume_position["epoch"], self._resume_position["batches_done"]
            self._resume_position = None
            sampler.set_epoch(epoch)
            if 0 < done < len(sampler):
                sampler.skip_batches = done
        return DataLoader(
            examples,
            batch_sampler=sampler,
            collate_fn=SpellingCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def predict_dataloader(self) -> list[DataLoader]:
        """The test questions (``predict`` writes raw replies for them)."""
        return self._eval_loaders("test", stage="predict")

    def state_dict(self) -> dict:
        """Saved in every checkpoint: the epoch and how many of its batches this run trained on."""
        trainer = self.trainer
        # All of fit, not only `trainer.training`: a ModelCheckpoint watching a val metric saves
        # from on_validation_end (mid-epoch, while trainer.validating), and that checkpoint must
        # resume at the right batch too.
        if trainer is None or trainer.state.fn != "fit":
            return {}
        # `processed` includes the batch whose on_train_batch_end is writing the checkpoint (and,
        # after a mid-epoch validation, every batch trained on so far).
        return {
            "epoch": trainer.current_epoch,
            "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restored before ``train_dataloader`` is built; applied to the next sampler."""
        self._resume_position = dict(state_dict) if state_dict else None

    def val_dataloader(self) -> list[DataLoader]:
        """``[position loader, count loader]`` over the validation files; batches are lists of Items."""
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        """``[position loader, count loader]`` over the test files; batches are lists of Items."""
        return self._eval_loaders("test")

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Leave evaluation batches (lists of Items) on the host; move training tensors as usual.

        Lightning's default transfer rebuilds dataclasses field by field and raises on frozen ones
        such as Item. Items hold text, which the generation engine tokenizes and moves itself.
        """
        if isinstance(batch, list) and all(isinstance(x, Item) for x in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _missing_files(self) -> list[str]:
        return [name for name in FILES if not (self.data_dir / name).is_file()]

    def _missing_error(self, missing: list[str]) -> SpellxferError:
        how = (
            "call prepare_data() first (Trainer does)"
            if self.build_profile
            else "set --data.build_profile demo|full to build it"
        )
        return SpellxferError(
            f"{self.data_dir}: missing {', '.join(missing)}; "
            f"run `spellxfer data build --out {self.data_dir}` or {how}"
        )

    def _loaded(self, value, stage: str):
        if value is None:
            raise RuntimeError(f"SpellingDataModule.setup({stage!r}) has not run")
        return value

    def _load_train(self) -> datasets.Dataset:
        import datasets  # heavy (pyarrow, pandas): not for fit --help

        rows = self._training_rows()
        # `[:]`: the whole column as one list (iterating a column converts row by row, 100× slower)
        examples = tokenize_examples(self.tokenizer, rows["question"][:], rows["answer"][:])
        kept = [e for e in examples if len(e["input_ids"]) <= self.max_length]
        self.n_dropped = len(examples) - len(kept)
        if not kept:
            longest = max(len(e["input_ids"]) for e in examples)
            raise SpellxferError(
                f"--data.max_length {self.max_length} drops every training row (shortest needs "
                f"{min(len(e['input_ids']) for e in examples)} tokens, longest {longest})"
            )
        name = TRAIN_FILE if self.train_set == "spelling" else CONTROL_FILE
        message = (
            f"{name}: {len(kept)} training examples (variants {self.variants}, separator {self.separator}, "
            f"distinct_words {self.distinct_words or 'all'}), "
            f"{self.n_dropped} dropped as longer than {self.max_length} tokens"
        )
        (rank_zero_warn if self.n_dropped else rank_zero_info)(message)
        # Arrow columns, not Python lists: 34 MiB instead of 122 MiB for the full file (no int
        # object per token; docs/training.md), and DataLoader workers share the buffers instead of
        # copying lists whose reference counts they touch.
        return datasets.Dataset.from_dict(
            {
                "input_ids": [e["input_ids"] for e in kept],
                "labels": [e["labels"] for e in kept],
                "length": [len(e["input_ids"]) for e in kept],
            }
        )

    def _training_rows(self) -> datasets.Dataset:
        """The rows the training pattern selects, in file order, cut to ``train_limit``."""
        spelling = read_training_rows(self.data_dir / TRAIN_FILE)
        keep = select_rows(
            spelling["subtask"][:],
            spelling["separator"][:],
            spelling["word"][:],
            variants=self.variants,
            separator=self.separator,
            distinct_words=self.distinct_words,
            seed=self.seed,
            where=str(self.data_dir / TRAIN_FILE),
        )
        rows = spelling
        if self.train_set == "control":
            rows = self._control_rows(spelling)
        limit = self.limits["train"]
        if len(keep) == len(rows) and (limit is None or limit >= len(rows)):
            return rows  # every row (the defaults): the file as read
        return rows.select(keep[:limit])

    def _control_rows(self, spelling: datasets.Dataset) -> datasets.Dataset:
        path = self.data_dir / CONTROL_FILE
        if not path.is_file():
            raise SpellxferError(
                f"--data.train_set control: {path} does not exist (built before the control "
                f"existed); rebuild {self.data_dir} with `spellxfer data build`",
                key="data.train_set",
            )
        control = read_training_rows(path, task="control")
        if control["word"][:] != spelling["word"][:]:
            raise SpellxferError(
                f"--data.train_set control: {path} is not row for row the words of {TRAIN_FILE} "
                "(files of different builds?); rebuild the directory",
                key="data.train_set",
            )
        return control

    def _load_eval(self, split: str) -> dict[str, list[Item]]:
        items = {}
        for task, name in EVAL_FILES[split].items():
            items[task] = load_questions([self.data_dir / name], limit=self.limits[split])
            for item in items[task]:
                if item.task != task:
                    raise SpellxferError(
                        f"{item.file}:{item.line}: a {item.task} question in {name}, "
                        f"which holds {task} questions only"
                    )
        return items

    def _eval_loaders(self, split: str, stage: str | None = None) -> list[DataLoader]:
        stage = stage or ("fit" if split == "val" else "test")
        items = self._loaded(self.eval_items.get(split), stage)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        loaders = []
        for task in ("position", "count"):
            shard = items[task][rank::world]
            # auto: the whole shard in one batch; the engine sorts it by length and sizes its own
            # batches from free memory (tighter padding than sorting within loader batches)
            size = max(1, len(shard)) if self.eval_batch_size == "auto" else self.eval_batch_size
            loaders.append(DataLoader(shard, batch_size=size, shuffle=False, collate_fn=_keep_items))
        return loaders


def read_training_rows(path: Path, limit: int | None = None, task: str = "spelling") -> datasets.Dataset:
    """Read and validate the training JSONL: every row a spelling question with a non-empty answer,
    in the data schema (:data:`spellxfer.data.schema.FEATURES`). ``task="control"`` reads the
    non-spelling control file (``control_train.jsonl``): every row must then be a control row.

    Every row is validated even with ``limit`` (which keeps the first ``limit``): a position or
    count row anywhere in the file means it was not built by spellxfer's leak-free builder.

    Two passes. The first reads line by line with the JSONL guards of
    :func:`~spellxfer.core.outputs.iter_jsonl`, so a bad row is reported by file and line
    (``datasets`` reports neither) and a hostile file never reaches Arrow's JSON parser (which
    reads ``NaN`` as the text "nan" and crashes on deep nesting). The second is
    ``datasets``' JSON reader with the build's fixed Features, the same call a user loads the
    file with, into memory (its Arrow cache goes to a temporary directory; nothing is written
    beside the data). Together a second or two for the ``full`` file's 68,619 rows, beside ~10 s
    of tokenizing them.

    Returns:
        The rows as an in-memory ``datasets.Dataset`` with the columns of the data schema
        (those a row leaves out are null).

    Raises:
        SpellxferError: ``file:line: …`` for invalid JSON, a non-spelling task, a missing field, or
            a field outside the data schema.
    """
    from spellxfer.data.schema import load_split, row_problem  # imports datasets: only when rows are read

    n = 0
    for line, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise SpellxferError(f"{path}:{line}: expected a JSON object per line")
        if row.get("task") != task:
            raise SpellxferError(
                f"{path}:{line}: task {row.get('task')!r} in the training file; spellxfer trains on "
                "task 'spelling' only (position and count questions are for evaluation)"
                if task == "spelling"
                else f"{path}:{line}: task {row.get('task')!r} in the control file, "
                f"which holds task {task!r} only"
            )
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise SpellxferError(f"{path}:{line}: {key!r} must be non-empty text")
        problem = row_problem(row)
        if problem:
            raise SpellxferError(f"{path}:{line}: {problem}")
        n += 1
    if not n:
        raise SpellxferError(f"{path}: no training rows")
    rows = load_split(path)
    return rows.select(range(limit)) if limit is not None and limit < n else rows
