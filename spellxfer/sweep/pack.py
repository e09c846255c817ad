"""``sweep --pack K``: up to K trials share one process, one device and one frozen base model.

Lifecycle of a pack (one per sweep worker; each worker a device):

1. **Fill the slots.** While a slot is free and the budget allows, ask Optuna for a trial (a queued
   retry first), give it its directory and ``trial.json`` as the unpacked sweep does, and build its
   fit from the same command line (:class:`~spellxfer.training.packed_trial.PackedTrial`). The first
   trial loads the base model; every later one only adds its adapter.
2. **Step.** Every active trial's next micro-batch goes through the shared base in one forward and
   one backward, each row through its own trial's adapter (:mod:`spellxfer.training.packed`);
   each trial's loss is its own mean over its own supervised tokens divided by its own
   accumulation, so the summed backward gives each adapter exactly its own gradient. Each trial
   then steps its own optimizer at its own accumulation boundary.
3. **Validate.** A new trial's base model is validated at step 0 before its first step, as its fit
   does (:mod:`spellxfer.training.step_zero`). Trials due for validation after a step are scored
   in one generation pass, their prompts mixed in one batch with per-row adapters; each then logs,
   early-stops, writes its checkpoints and reports to the pruner as its fit would.
4. **Finish.** A trial at ``max_steps`` or stopped early exports its best adapter and is scored on
   the test sets: by default (``--pack_evaluation exact``, :meth:`Pack.evaluate_exact`) through
   ``evaluate``'s own function in this process, as the unpacked sweep's ``evaluate`` process
   scores it, on one base model kept for all of them (:func:`keeping_base_models`), while the
   pack waits (with ``--pack_scorers N``: by up to N such ``evaluate`` processes at once, while
   the pack trains the next trials in the freed slots); with
   ``packed``, the trials that finish together in groups of about :data:`EVALUATION_ROWS` test
   rows, one pass per decoding through the pack's model (and one likelihood probe pass when the
   space's scoring asks for it, :func:`probe_packed`). Either way
   the results are written as ``evaluate`` writes them (``eval/<decoding>/``, paired against the
   base model) and each trial (or group) is told to Optuna as soon as it is scored; their slots
   refill from step 1.

A trial that fails — a config value its fit refuses, a non-finite loss or gradient, an exception in
its own step, validation or evaluation — ends alone: it is recorded as failed with its error, its
adapter leaves the pack and the step is redone without it, so its pack-mates' numbers are what
they would have been without it. A training pass that runs out of memory is redone in parts of
half its padded tokens (and later passes keep that limit), so a full card slows the pack instead of
failing it; only a trial whose single micro-batch does not fit beside its pack-mates fails, alone.
Ctrl-C or SIGTERM stops the pack between steps and queues its trials for retry; a killed
pack's trials go stale and are retried, each resuming from its own ``last.ckpt``.
``<study>/pack-stats/<host>-<pid>-<worker>.json`` records each pack's steps, split passes, seconds per
phase and peak device memory. Trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import gc
import json
import math
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import atomic_file, atomic_output_dir, package_versions, write_json, write_jsonl
from spellxfer.evaluation.compare import compare_predictions, comparison_markdown, read_predictions
from spellxfer.evaluation.evaluate import evaluate as evaluate_command
from spellxfer.evaluation.evaluate import keeping_base_models, resolve_scoring, score_items, summarise
from spellxfer.evaluation.likelihood import candidate_answers, probe_items
from spellxfer.models.generation import MEMORY_FRACTION_ENV, GenerationEngine, default_sampling
from spellxfer.models.losses import IGNORE_INDEX, completion_loss_from_hidden, decoder_and_head
from spellxfer.models.registry import apply_fused_kernels, load_tokenizer
from spellxfer.models.static_decode import bucket_rows, static_decode_unsupported, static_decoder
from spellxfer.sweep.run import plan
from spellxfer.sweep.trial import (
    Interrupted,
    OverBudget,
    SweepContext,
    TrialFailed,
    begin_trial,
    evaluate_trial,
    evaluation_args,
    fit_argv,
    record_outcome,
    study_relative,
    write_trial_json,
)
from spellxfer.tasks.chat import format_chat
from spellxfer.tasks.parsing import score
from spellxfer.tasks.questions import load_questions
from spellxfer.training.checkpointing import kill_point
from spellxfer.training.module import SpellingLoRAModule, load_base
from spellxfer.training.packed import PackedLoRA
from spellxfer.training.packed_trial import PackedTrial, TrialError, command_line, fit_log


@dataclass
class Slot:
    """A trial occupying one of the pack's slots."""

    trial: optuna.Trial
    packed: PackedTrial
    run: Path
    record: dict
    start: float = field(default_factory=time.time)

    @property
    def number(self) -> int:
        return self.trial.number


class Pack:
    """The trials of one pack, their shared model, and one training step for all of them.

    Args:
        ctx: The sweep's shared context (space, directories, progress display, stop flag).
        study: The Optuna study (its storage, for asks, tells and heartbeats).
        worker: This pack's index (its progress line; its GPU is ``worker`` modulo the GPUs).
        slots: Trials trained at once (K).
        kernel: How the per-row adapter update is computed in training (packed.KERNELS).
        after_trial: Called with (study, FrozenTrial) after each trial ends (prints, rewrites the CSV).
        window: Each step trains a whole accumulation window of every trial (its next optimizer
            step) instead of one micro-batch, so trials of any accumulation keep pace; a step's
            rows are then every trial's effective batch.
        evaluation: ``exact`` (each finished trial through ``evaluate``'s own code) or ``packed``
            (finished trials' prompts mixed in one generation pass; see the module docstring).
        scorers: With ``exact``: 0 scores each finished trial in this process while the pack
            waits; N > 0 runs up to N ``evaluate`` processes at once (the unpacked sweep's own
            command) while the pack trains on — each loads its own copy of the base model.
    """

    def __init__(self, ctx: SweepContext, study, worker: int, slots: int, kernel: str, after_trial: Callable,
                 window: bool = False, evaluation: str = "exact", scorers: int = 0):
        self.ctx, self.study, self.worker, self.slots, self.kernel = ctx, study, worker, slots, kernel
        self.window, self.evaluation = window, evaluation
        self.after_trial = after_trial
        self.active: list[Slot] = []
        self.scorers = scorers
        self._scorer_pool = self._new_scorer_pool()
        self.scoring: list[tuple[Future, Slot]] = []
        """Finished trials being scored by ``evaluate`` processes (``scorers`` > 0): out of the pack's
        slots, still running in the study. Rebound, never mutated, so the heartbeat thread can read it."""
        self.scored_in_background = 0
        self.scorer_fraction: float | None = None
        """Each scorer's share of the card (set on CUDA once the base is loaded)."""
        self.lora: PackedLoRA | None = None
        self.shared: dict | None = None
        self.device = torch.device("cpu")
        self.autocast = False
        self.tokenizer = None
        self.data_cache: dict = {}
        self.steps = 0
        self.peak_memory = 0
        self._items: list | None = None
        self.pass_tokens: int | None = None
        """Padded tokens per training pass: None (all micro-batches in one) until a pass runs out of
        memory (:meth:`_train`)."""
        self.splits = 0
        """Training passes that ran out of memory and were redone in parts."""
        self.seconds: Counter[str] = Counter()
        """Wall seconds per phase: ``start`` (trial setup), ``train``, ``validate``, ``evaluate``."""

    @contextmanager
    def _phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    # ---- slots ------------------------------------------------------------------------------------
    def start(self, trial: optuna.Trial) -> None:
        """Give ``trial`` a slot: its directory, record, fit config and adapter (or end it at once)."""
        try:
            params, run, resume, record = begin_trial(trial, self.ctx, self.worker)
        except OverBudget:
            self._tell(trial, TrialState.FAIL)
            return
        _beat(self.study, trial)
        record["pack"] = {"slots": self.slots, "kernel": self.kernel, "window": self.window}
        write_trial_json(run, record)
        log = fit_log(run)
        # the unpacked sweep's fit command, without `python -m spellxfer fit` and --ckpt_path (the
        # pack restores the checkpoint itself)
        argv = _wandb_beside_others(fit_argv(self.ctx, run, params, None, trial.number, record["seed"])[4:])
        log(f"$ {command_line(argv + (['--ckpt_path', str(resume)] if resume else []))}  "
            f"(packed: {self.slots} slots, worker {self.worker})")
        slot = None
        try:
            with self._phase("start"):
                packed = PackedTrial(f"t{trial.number:04d}", argv, run, resume, log)
                slot = Slot(trial, packed, run, record)
                self._admit(packed)
            self.active.append(slot)
            self.ctx.progress(self.worker, trial=self._numbers(), phase="fit", params=params)
        except Exception as e:  # its fit refuses its config, or its data or checkpoint is bad
            self._end(slot or Slot(trial, None, run, record), "failed", _reason(e), log)

    def _admit(self, packed: PackedTrial) -> None:
        shared = packed.shared_settings()
        if self.shared is None:
            self._load_base(packed)
            self.shared = shared
        elif shared != self.shared:
            diff = next(k for k in shared if shared[k] != self.shared.get(k))
            raise TrialError(
                f"--pack: model.{diff} is {shared[diff]!r} here but {self.shared[diff]!r} for the pack's "
                "base model; packed trials share one base (search it without --pack)"
            )
        packed.setup_data(self.data_cache)
        packed.attach(self.lora)

    def _load_base(self, packed: PackedTrial) -> None:
        """Load the frozen base once, as ``SpellingLoRAModule.configure_model`` prepares it."""
        hp = packed.hp
        if packed.trainer.strategy.root_device.type == "cuda":
            self.device = torch.device("cuda", self.worker % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        base = load_base(hp)
        if self.device.type == "cuda" and self.scorers:
            self._share_card(base)
        base.train()
        if hp.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        apply_fused_kernels(base, hp.kernels)
        self.autocast = self.device.type == "cuda" and base.dtype == torch.bfloat16
        if self.device.type == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(SpellingLoRAModule.cudnn_attention)
        self.lora = PackedLoRA(base, kernel=self.kernel)
        self.tokenizer = load_tokenizer(hp.model)
        self.data_cache[("tokenizer", hp.model)] = self.tokenizer  # the trials' data modules use it too

    def _numbers(self) -> str:
        return ",".join(str(s.number) for s in self.active) or "-"

    # ---- one step ---------------------------------------------------------------------------------
    def step(self) -> None:
        """One micro-batch (with ``window``: one accumulation window) of every active trial, then
        their validations and endings."""
        zero = [s for s in self.active if s.packed.validates_at_step_zero]
        if zero:  # the base model's step-0 validation of newly started trials, as their fits run it
            with self._phase("validate"):
                self.validate(zero)
        now = time.perf_counter()
        batches = {}
        for s in list(self.active):
            try:
                batches[s.number] = s.packed.next_batches(self.window)
            except Exception as e:
                self.fail(s, e)
        live = [s for s in self.active if s.number in batches]
        if not live:
            return
        try:
            with self._phase("train"):
                live, values = self._train(live, batches)
        except torch.OutOfMemoryError as e:
            for s in live:
                self.fail(s, f"out of memory in a packed step of {len(live)} trials ({_reason(e)})")
            return
        for s, losses in zip(live, values):
            try:
                s.packed.after_backward(losses, now)
            except Exception as e:
                self.fail(s, e)
        self.steps += 1
        live = [s for s in live if s in self.active]
        due = [s for s in live if s.packed.validate_now]
        if due:
            with self._phase("validate"):
                self.validate(due)
        done = [s for s in self.active if s.packed.done]
        if done:
            with self._phase("evaluate"):
                self.finish(done)
        if self.device.type == "cuda":
            self.peak_memory = max(self.peak_memory, torch.cuda.max_memory_allocated(self.device))
        steps = [s.packed.global_step for s in self.active]
        if steps:
            self.ctx.progress(
                self.worker,
                trial=self._numbers(),
                phase="fit",
                step=min(steps),
                total=max(s.packed.max_steps for s in self.active),
            )

    def _train(self, live: list[Slot], batches: dict) -> tuple[list[Slot], list[list[float]]]:
        """Forward and backward of every live trial's micro-batches, in as few passes as fit the
        card: one pass for all of them until a pass runs out of memory; from then on a pass holds
        consecutive micro-batches up to :attr:`pass_tokens` padded tokens (half the failed pass's),
        and the failed pass is redone in parts. Gradients come from ``torch.autograd.grad`` and are
        added to the trials' ``.grad`` only once a pass has succeeded, so a pass that fails leaves
        nothing behind and the parts add up to the one-pass gradients (up to rounding). A trial
        whose loss is not finite (or raises) fails and its pass is redone without it, so no backward
        ever runs through its rows; one whose gradient is not finite fails before its optimizer
        steps; one whose single micro-batch does not fit the card beside the pack fails alone.
        Returns the trials that trained and each one's micro-batch losses."""
        for s in live:
            if s.packed.starts_window:
                s.packed.zero_grad()
        todo = [(s, b, seed) for s in live for b, seed in zip(batches[s.number], s.packed.dropout_seeds())]
        values: dict[int, list[float]] = {s.number: [] for s in live}
        while todo := [t for t in todo if t[0] in self.active]:
            part = self._next_pass(todo)
            out_of_memory = None
            try:
                failed = self._pass(part, values)
            except torch.OutOfMemoryError as e:
                out_of_memory, failed = _reason(e), {}
            if out_of_memory is not None:  # outside the handler: its traceback no longer holds the pass
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if len(part) == 1:
                    s, b, _ = part[0]
                    self.fail(
                        s,
                        f"out of memory in one micro-batch of {tuple(b['input_ids'].shape)} tokens beside "
                        f"{len(self.active) - 1} pack-mates ({out_of_memory})",
                    )
                    continue
                self.pass_tokens, self.splits = max(1, _padded_tokens(part) // 2), self.splits + 1
                for s in self.active:
                    s.packed.log(
                        f"a packed pass of {len(part)} micro-batches ({_padded_tokens(part)} padded tokens) "
                        f"ran out of memory; passes now hold up to {self.pass_tokens} ({out_of_memory})"
                    )
                continue
            for s, why in failed.values():
                self.fail(s, why)
            if not failed:
                todo = todo[len(part) :]
        stepping = [s for s in live if s in self.active and s.packed.steps_now]
        if stepping:
            finite = torch.stack([s.packed.grads_finite().to(self.device) for s in stepping]).tolist()
            for s, ok in zip(stepping, finite):
                if not ok:
                    self.fail(s, f"non-finite gradient at step {s.packed.global_step + 1}")
        kept = [s for s in live if s in self.active]
        return kept, [values[s.number] for s in kept]

    def _next_pass(self, todo: list[tuple]) -> list[tuple]:
        """The next pass: ``todo``'s leading micro-batches within :attr:`pass_tokens` (at least one)."""
        if self.pass_tokens is None:
            return todo
        n = 1
        while n < len(todo) and _padded_tokens(todo[: n + 1]) <= self.pass_tokens:
            n += 1
        return todo[:n]

    def _pass(self, part: list[tuple], values: dict[int, list[float]]) -> dict[int, tuple]:
        """One forward and backward of ``part`` ((slot, micro-batch, dropout seed) triples): its
        losses go to ``values`` and its gradients onto the trials' ``.grad``, unless a loss is not
        finite: then nothing is added and the failing trials are returned ({number: (slot, why)})."""
        out_of_memory_for_tests(len(part))
        ids, labels = _pad_and_stack([b for _, b, _ in part], self.tokenizer.pad_token_id, self.device)
        groups = [(s.packed.name, *b["input_ids"].shape, seed) for s, b, seed in part]
        decoder, head = decoder_and_head(self.lora.model)
        failed: dict[int, tuple] = {}
        with self.lora.rows(groups):
            with self._mixed_precision():
                # attention_mask=None as in training_step: right padding, causal attention
                hidden = decoder(input_ids=ids, attention_mask=None, use_cache=False).last_hidden_state
                losses, start = [], 0
                for (s, _, _), (_, n, _, _) in zip(part, groups):
                    try:
                        losses.append(
                            completion_loss_from_hidden(
                                hidden[start : start + n], head.weight, labels[start : start + n]
                            )
                        )
                    except ValueError as e:
                        failed.setdefault(s.number, (s, _reason(e)))
                    start += n
            if failed:
                return failed
            part_values = torch.stack([loss.detach() for loss in losses]).tolist()  # one sync for all
            for (s, _, _), v in zip(part, part_values):
                if not math.isfinite(v):
                    failed.setdefault(s.number, (s, f"loss is {v} at step {s.packed.global_step + 1}"))
            if failed:
                return failed
            # Lightning divides each micro-batch's loss by the accumulation window before backward
            total = sum(loss / s.packed.accumulate for loss, (s, _, _) in zip(losses, part))
            params = [p for s in {s.number: s for s, _, _ in part}.values() for p in s.packed.params]
            grads = torch.autograd.grad(total, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        for (s, _, _), v in zip(part, part_values):
            values[s.number].append(v)
        return {}

    def _mixed_precision(self):
        """bf16 autocast on CUDA, as ``SpellingLoRAModule._mixed_precision``; nothing on a CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()

    # ---- validation -------------------------------------------------------------------------------
    def validate(self, due: list[Slot]) -> None:
        """Score the due trials' validations in one generation pass per decoding setting."""
        groups: dict[tuple, list[Slot]] = {}
        for s in due:
            hp = s.packed.hp
            groups.setdefault((hp.val_decoding, hp.val_max_new_tokens, hp.seed), []).append(s)
        for (decoding, max_new, seed), slots in groups.items():
            for s in slots:
                kill_point("validation_start", s.packed.global_step)
            sampling = default_sampling(decoding=decoding, max_new_tokens=max_new, seed=seed)
            items = [s.packed.val_items() for s in slots]
            self.ctx.progress(self.worker, phase=f"validate {len(slots)} trials")
            questions = [[it.question for it in its] for its in items]
            replies = self._validation_replies(slots, questions, sampling)
            if replies is None:
                continue
            for s, its, outs in zip(slots, items, replies):
                try:
                    values = s.packed.after_validation(
                        its, [score(r[0], it.answer)[1] for r, it in zip(outs, its)]
                    )
                    s.packed.log(
                        f"validation at step {s.packed.global_step}: "
                        + ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k.count("/") == 1)
                    )
                    self._report(s, values)
                except optuna.TrialPruned as e:
                    s.packed.log(f"pruned: {e}")
                    self._end(s, "pruned")
                except Exception as e:
                    self.fail(s, e)

    def _validation_replies(self, slots: list[Slot], questions: list[list[str]], sampling):
        """The replies of one validation pass; a pass that runs out of memory is retried once in
        batches of :data:`VALIDATION_RETRY_ROWS`, and if that fails too its trials fail (their
        pack-mates go on) and None is returned."""
        names, error = [s.packed.name for s in slots], None
        for batch_size in ("auto", VALIDATION_RETRY_ROWS):
            try:
                out_of_memory_for_tests(len(slots), VALIDATION_OOM_ENV)
                return self.generate(names, questions, sampling, batch_size)[0]
            except torch.OutOfMemoryError as e:
                error = _reason(e)
            if self.device.type == "cuda":  # outside the handler: its traceback no longer holds the pass
                torch.cuda.empty_cache()
            for s in slots:
                s.packed.log(f"a validation of {len(slots)} trials ran out of memory (batches: {batch_size})")
        mates = len(self.active) - len(slots)
        for s in slots:
            self.fail(s, f"out of memory in validation beside {mates} pack-mates ({error})")
        return None

    def _report(self, s: Slot, values: dict) -> None:
        objective = self.ctx.space.objective
        if objective not in values:
            raise TrialError(f"objective {objective} is not a logged validation metric")
        s.trial.report(values[objective], s.packed.global_step)
        self.ctx.progress(self.worker, value=values[objective])
        if not s.packed.done and s.trial.should_prune():
            raise optuna.TrialPruned(f"{objective} {values[objective]:.3f} at step {s.packed.global_step}")

    def generate(self, names: list[str], questions: list[list[str]], sampling, batch_size):
        """:func:`generate_packed` on this pack's model."""
        with self._mixed_precision():
            return generate_packed(self.lora, self.tokenizer, names, questions, sampling, batch_size)

    # ---- the end of a trial -----------------------------------------------------------------------
    def finish(self, done: list[Slot]) -> None:
        """Export each finished trial's best adapter, evaluate them together, tell Optuna."""
        ready = []
        for s in done:
            try:
                objective, checkpoint = s.packed.finish()
                s.record.update(objective=objective, checkpoint=str(checkpoint))
                s.trial.set_user_attr("checkpoint", study_relative(self.ctx, checkpoint))
                ready.append(s)
            except Exception as e:
                self.fail(s, e)
        # exact: one trial at a time; packed: groups of about EVALUATION_ROWS test rows. Each group
        # is told to Optuna as soon as it is scored, so a stopped pack loses one group's scoring
        size = 1
        if self.evaluation == "packed":
            size = max(1, -(-EVALUATION_ROWS // max(1, len(self._test_items()))))
        for i in range(0, len(ready), size):
            group = ready[i : i + size]
            if self.evaluation == "exact" and self._scorer_pool is not None:
                self._score_in_background(group[0])
                continue
            if self.evaluation == "exact":
                self.evaluate_exact(group[0])
            else:
                self.evaluate(group)
            for s in group:
                if s in self.active:
                    record_outcome(s.trial, self.ctx, s.run)
                    self._end(s, "complete")

    def evaluate_exact(self, s: Slot) -> None:
        """The test evaluation of finished trial ``s`` as its unpacked sweep runs it — ``evaluate
        --adapter <run>/adapter --compare_to <base>`` with the space's ``evaluation:`` flags, once
        per decoding — but in this process (no interpreter start): the same code and the same model
        construction (bf16 base + PEFT adapter on CUDA) as the unpacked sweep's and the base
        model's evaluations (:func:`~spellxfer.sweep.trial.evaluation_args`)."""
        for decoding in self.ctx.space.decodings:
            if s not in self.active:
                return
            self.ctx.progress(self.worker, trial=s.number, phase=f"evaluate ({decoding})")
            try:
                with open(s.run / "eval.log", "a", encoding="utf-8") as log:
                    with redirect_stdout(log), redirect_stderr(log):
                        evaluate_command(**evaluation_args(self.ctx, s.run, decoding))
            except Exception as e:
                self.fail(s, f"evaluate ({decoding}): {_reason(e)}")
            finally:
                gc.collect()  # the evaluation's model copy and its caches, before the pack goes on
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _new_scorer_pool(self) -> ThreadPoolExecutor | None:
        """The threads that wait on ``self.scorers`` scoring processes (None for none)."""
        name = f"pack-{self.worker}-scorer"
        return ThreadPoolExecutor(self.scorers, thread_name_prefix=name) if self.scorers else None

    def _share_card(self, base) -> None:
        """Leave each scorer process its share of the card (:func:`scorer_plan`, from the base
        model's size) and cap the pack at the rest; fewer scorers where the pack would keep less
        than half the card (none: trials are scored in this process)."""
        weights = sum(p.numel() * p.element_size() for p in base.parameters())
        total = torch.cuda.get_device_properties(self.device).total_memory
        scorers, share, pack_fraction = scorer_plan(self.scorers, weights, total)
        if scorers < self.scorers:
            print(
                f"--pack_scorers {self.scorers}: each scorer needs {share:.0%} of the card "
                f"for a {weights / 2**30:.1f} GiB model, so {scorers} run beside the pack"
                + ("" if scorers else " (trials are scored in the pack's process)"),
                file=sys.stderr,
                flush=True,
            )
            self._scorer_pool.shutdown(wait=False)
            self.scorers = scorers
            self._scorer_pool = self._new_scorer_pool()
        self.scorer_fraction = share if scorers else None
        if scorers:  # the scorers' `evaluate` processes need room the pack's allocator would hold
            torch.cuda.set_per_process_memory_fraction(pack_fraction, self.device)

    def _score_in_background(self, s: Slot) -> None:
        """Hand finished trial ``s`` to a scorer: its slot and adapter leave the pack at once (the
        next trial takes them), its trial stays running until :meth:`collect_scored` tells it."""
        self.active.remove(s)
        if self.lora is not None:
            self.lora.remove(s.packed.name)
        s.packed.log(f"test scoring by an `evaluate` process ({', '.join(self.ctx.space.decodings)})")
        env = self.ctx.env(self.worker)
        if self.scorer_fraction is not None:  # evaluate caps itself there (apply_memory_fraction)
            env[MEMORY_FRACTION_ENV] = f"{self.scorer_fraction:.4f}"
        future = self._scorer_pool.submit(self._score_process, s, env)
        self.scoring = [*self.scoring, (future, s)]

    def _score_process(self, s: Slot, env: dict) -> None:
        """In a scorer thread: ``evaluate`` of ``s``'s adapter per decoding, each a process of its
        own, as the unpacked sweep runs it (:func:`~spellxfer.sweep.trial.evaluate_trial`)."""
        for decoding in self.ctx.space.decodings:
            evaluate_trial(self.ctx, s.run, decoding, env)

    def collect_scored(self, wait: float = 0.0) -> None:
        """Tell Optuna the trials whose scoring processes have ended (waiting up to ``wait`` seconds
        for the first): complete with their scores, failed with the process's error, or queued for
        retry when the sweep was interrupted."""
        if not self.scoring:
            return
        if wait:
            futures_wait([f for f, _ in self.scoring], timeout=wait, return_when=FIRST_COMPLETED)
        ended = [(f, s) for f, s in self.scoring if f.done()]
        if not ended:
            return
        self.scoring = [(f, s) for f, s in self.scoring if not f.done()]
        for future, s in ended:
            self.scored_in_background += 1
            error = future.exception()
            if isinstance(error, Interrupted):
                s.trial.set_user_attr("interrupted", True)
                self._end(s, "failed", "interrupted (Ctrl-C or SIGTERM); retried on the next run")
            elif error is not None:
                self._end(s, "failed", _reason(error))
            else:
                try:
                    record_outcome(s.trial, self.ctx, s.run)
                except Exception as e:
                    self._end(s, "failed", _reason(e))
                    continue
                self._end(s, "complete")

    def _test_items(self) -> list:
        """The test questions every trial is evaluated on (read once)."""
        if self._items is None:
            limit = self.ctx.space.evaluation.get("limit")
            self._items = load_questions(self.ctx.test_files, limit=limit)
        return self._items

    def evaluate(self, slots: list[Slot]) -> None:
        """The test evaluation of finished trials (``evaluate --adapter`` of each, with the space's
        ``evaluation:`` flags): the likelihood probe once for all of them when the scoring asks for
        it (it does not depend on the decoding), then one generation pass per decoding."""
        flags = {k: v for k, v in self.ctx.space.evaluation.items() if v is not None}
        items = self._test_items()
        # the exact generation prompts, the same for every trial and decoding
        chat_prompts = [
            format_chat(self.tokenizer, [{"role": "user", "content": it.question}]) for it in items
        ]
        scoring = resolve_scoring(flags.get("scoring"), items)
        probes: dict[int, tuple] = {}
        if scoring != "generation":
            self.ctx.progress(self.worker, phase=f"probe {len(slots)} trials")
            with self._mixed_precision():
                results, prompts, seconds, scorer = probe_packed(
                    self.lora,
                    self.tokenizer,
                    [s.packed.name for s in slots],
                    items,
                    flags.get("batch_size", "auto"),
                )
            probes = {s.number: (r, prompts, seconds, scorer) for s, r in zip(slots, results)}
        for decoding in self.ctx.space.decodings:
            slots = [s for s in slots if s in self.active]
            if not slots:
                return
            sampling = default_sampling(
                decoding=decoding,
                samples=flags.get("samples"),
                seed=flags.get("seed"),
                max_new_tokens=flags.get("max_new_tokens"),
            )
            replies, engine, seconds = [None] * len(slots), None, 0.0
            if scoring != "likelihood":
                self.ctx.progress(self.worker, phase=f"evaluate {len(slots)} trials ({decoding})")
                t0 = time.perf_counter()
                replies, engine = self.generate(
                    [s.packed.name for s in slots],
                    [[it.question for it in items]] * len(slots),
                    sampling,
                    flags.get("batch_size", "auto"),
                )
                seconds = time.perf_counter() - t0
            for s, outs in zip(slots, replies):
                try:
                    self._write_evaluation(
                        s,
                        decoding,
                        items,
                        chat_prompts,
                        scoring,
                        sampling,
                        outs,
                        engine,
                        seconds,
                        len(slots),
                        probes.get(s.number),
                    )
                except Exception as e:
                    self.fail(s, f"evaluate ({decoding}): {_reason(e)}")

    def _write_evaluation(
        self,
        s: Slot,
        decoding: str,
        items,
        prompts: list[str],
        scoring: str,
        sampling,
        replies,
        engine,
        seconds: float,
        n_trials: int,
        probe: tuple | None,
    ) -> None:
        """``eval/<decoding>/`` as ``evaluate --compare_to <base>`` writes it (``probe``: this
        trial's probe results, the prompts + frames, the pass's seconds and scorer; None when the
        scoring is generation only)."""

        out, base = s.run / "eval" / decoding, self.ctx.base_dir(decoding)
        results, probe_prompts, probe_seconds, scorer = probe or (None, None, 0.0, None)
        predictions = list(score_items(items, replies, prompts, results, probe_prompts))
        metrics = summarise(items, predictions, results)
        metrics["scoring"] = scoring
        # the keys of evaluate's "run" (shots: the sweep evaluates zero-shot), and the pack's own
        metrics["run"] = {
            "model": self.ctx.model,
            "adapter": str(s.run / "adapter"),
            "scoring": scoring,
            "shots": 0,
            "shot_pool": None,
            "sampling": sampling.record(),
            "batch_size": engine.last_batch_size if engine else None,
            "decoder": engine.resolve_path(self.device) if engine else None,
            "questions": [str(p) for p in self.ctx.test_files],
            "limit": self.ctx.space.evaluation.get("limit"),
            "n_items": len(items),
            "seconds": round(seconds, 2),
            "items_per_second": round(len(items) * n_trials / seconds, 2) if seconds else None,
            # evaluate's timings: nothing is loaded (the pack's model), and the shared passes
            "load_seconds": 0.0,
            "kept_base_model": True,  # the pack's own, already loaded
            "wall_seconds": round(seconds + probe_seconds, 2),
            "likelihood": {
                "path": scorer.path,
                "batch_size": scorer.last_batch_size,
                "seconds": round(probe_seconds, 2),
                "items_per_second": round(len(items) * n_trials / probe_seconds, 2)
                if probe_seconds
                else None,
            }
            if scorer
            else None,
            "packed_trials": n_trials,
            "device": str(self.device),
            "versions": package_versions(),
            "policy": "trained on spelling only; evaluated on position and count only",
        }
        with atomic_output_dir(out, overwrite=True) as tmp:
            write_jsonl(tmp / "predictions.jsonl", predictions)
            write_json(tmp / "metrics.json", metrics)
            comparison = compare_predictions(
                read_predictions(base), predictions, base_name=str(base), other_name=str(out)
            )
            write_json(tmp / "compare.json", comparison)
            (tmp / "compare.md").write_text(comparison_markdown(comparison), encoding="utf-8")
        summary = ", ".join(
            f"{t}_{kind}accuracy {metrics[f'{t}_{kind}accuracy']:.3f}"
            for kind in ("", "likelihood_")
            for t in ("position", "count")
            if f"{t}_{kind}accuracy" in metrics
        )
        with open(s.run / "eval.log", "a", encoding="utf-8") as f:
            f.write(
                f"packed evaluation ({decoding}, {scoring}) with {n_trials} trial(s) in "
                f"{seconds + probe_seconds:.1f} s: {summary} → {out}\n"
            )

    def stats(self) -> dict:
        """What the pack did (for ``bench sweep``): steps, seconds per phase, peak device memory."""
        return {
            "slots": self.slots,
            "kernel": self.kernel,
            "window": self.window,
            "device": str(self.device),
            "steps": self.steps,
            "split_passes": self.splits,
            "scorers": self.scorers,
            "scored_in_background": self.scored_in_background,
            "pass_tokens": self.pass_tokens,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "peak_memory_gib": round(self.peak_memory / 2**30, 2) if self.device.type == "cuda" else None,
        }

    def fail(self, s: Slot, error) -> None:
        """End trial ``s`` alone as failed (its pack-mates go on)."""
        if s in self.active:
            self._end(s, "failed", _reason(error) if isinstance(error, BaseException) else str(error))

    def interrupt(self) -> None:
        """Ctrl-C or SIGTERM: every active trial is queued for retry, as the unpacked sweep does,
        and so is every trial still being scored (its ``evaluate`` process is stopped)."""
        for s in list(self.active):
            s.trial.set_user_attr("interrupted", True)
            self._end(s, "failed", "interrupted (Ctrl-C or SIGTERM); retried on the next run")
        if self.scoring:
            self.ctx.stop.set()  # the scorer threads stop their processes within half a second
            futures_wait([f for f, _ in self.scoring])
            self.collect_scored()

    def close(self) -> None:
        """Stop the scorer threads (none is running once the pack has ended or been interrupted)."""
        if self._scorer_pool is not None:
            self._scorer_pool.shutdown(wait=True)

    def _end(self, s: Slot, status: str, error: str | None = None, log=None) -> None:
        """Record ``s``'s end (``trial.json``, its log) and tell Optuna; its slot and adapter leave."""
        if s in self.active:
            self.active.remove(s)
        if s.packed is not None:
            s.packed.close("success" if status == "complete" else "failed")
            if self.lora is not None:
                self.lora.remove(s.packed.name)
        log = log or (s.packed.log if s.packed is not None else fit_log(s.run))
        write_trial_json(
            s.run,
            s.record | {"status": status, "error": error, "duration_s": round(time.time() - s.start, 1)},
        )
        state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}[
            status
        ]
        try:
            if error:
                log(f"error: {error}")
                s.trial.set_user_attr("error", error)
            self._tell(s.trial, state, s.record.get("objective") if status == "complete" else None)
        except optuna.exceptions.UpdateFinishedTrialError:
            # another worker found its heartbeat stale and failed it; its retry takes over
            log("the study already ended this trial (its heartbeat went stale); its retry takes over")

    def _tell(self, trial, state, value=None) -> None:
        frozen = self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        self.after_trial(self.study, frozen)


SCORER_MEMORY_FRACTION = 0.1
"""The least share of the card each ``--pack_scorers`` process is left (the pack caps itself at the
rest, at least :data:`PACK_MIN_FRACTION`; a pass beyond its cap is split like one beyond the card).
An ``evaluate`` of SmolLM2-135M-Instruct at its 2,048-row cap needs about 7 GiB, a tenth of an
80 GB card; a larger model's scorer gets :data:`SCORER_WEIGHTS_FACTOR` × its weights +
:data:`SCORER_HEADROOM_BYTES` (:func:`scorer_plan`)."""

SCORER_WEIGHTS_FACTOR = 1.5
SCORER_HEADROOM_BYTES = 2 * 2**30
"""A scorer's room beyond its weights: the generation batch (sized within the share by
``auto_batch_size``), CUDA graphs and the allocator's slack. Qwen3-4B (8.05 GB of bf16 weights):
13.2 GiB, 17% of an 80 GB card. On 2026-12-06 two Qwen3-4B-shaped scorers sized from the card's
free memory took ~17 GiB each and ran out of memory beside a 48–50 GiB pack."""

PACK_MIN_FRACTION = 0.5
"""The least share of the card a pack keeps for itself beside its scorers."""


def scorer_plan(requested: int, weights_bytes: int, total_bytes: int) -> tuple[int, float, float]:
    """``(scorers, share of each, pack's share)`` for ``requested`` scorers of a model with
    ``weights_bytes`` of weights on a card of ``total_bytes``: as many as leave the pack at least
    :data:`PACK_MIN_FRACTION`."""
    need = weights_bytes * SCORER_WEIGHTS_FACTOR + SCORER_HEADROOM_BYTES
    share = max(SCORER_MEMORY_FRACTION, need / total_bytes)
    scorers = min(requested, int((1 - PACK_MIN_FRACTION + 1e-9) / share))
    return scorers, share, max(PACK_MIN_FRACTION, 1 - scorers * share)

EVALUATION_ROWS = 4096
"""Test rows per packed evaluation group: small test sets share passes across trials, a full one
(10,400 questions) is evaluated one trial at a time (:meth:`Pack.finish`)."""


def _padded_tokens(part: list[tuple]) -> int:
    """The tokens of one pass over ``part``'s micro-batches: their rows × the longest row."""
    return sum(b["input_ids"].shape[0] for _, b, _ in part) * max(b["input_ids"].shape[1] for _, b, _ in part)


OOM_ENV = "SPELLXFER_TEST_OOM_ABOVE"
VALIDATION_OOM_ENV = "SPELLXFER_TEST_VALIDATION_OOM_ABOVE"
VALIDATION_RETRY_ROWS = 64
"""Prompts per batch when a validation pass is retried after running out of memory."""


def out_of_memory_for_tests(n: int, env: str = OOM_ENV) -> None:
    """Test hook: a pass of more than ``$SPELLXFER_TEST_OOM_ABOVE`` micro-batches (with ``env``
    :data:`VALIDATION_OOM_ENV`: a validation pass of more than that many trials) raises
    ``torch.OutOfMemoryError``, as a full card does, so the CPU tests reach the split passes and
    the failed validations. Unset — always, outside the tests — it does nothing."""
    limit = os.environ.get(env)
    if limit and n > int(limit):
        raise torch.OutOfMemoryError(f"{env}={limit}: a pass of {n}")


def run_pack(
    ctx: SweepContext,
    study,
    worker: int,
    slots: int,
    n_trials: int,
    after_trial: Callable,
    deadline: float | None,
    heartbeat_s: int,
    kernel: str = "loop",
    window: bool = False,
    evaluation: str = "exact",
    scorers: int = 0,
) -> Pack:
    """Run trials of ``study`` in one pack of ``slots`` until the budget is spent (see the module
    docstring); returns the pack (its step count and peak memory, for the bench)."""
    pack = Pack(ctx, study, worker, slots, kernel, after_trial, window, evaluation, scorers)
    beat = threading.Event()
    heart = threading.Thread(
        target=_heartbeat, args=(study, pack, heartbeat_s, beat), daemon=True, name=f"pack-{worker}-heartbeat"
    )
    heart.start()
    try:
        with keeping_base_models():  # exact scoring: one base model for all its evaluate calls
            while not ctx.stop.is_set():
                if len(pack.active) < slots:
                    for s in list(pack.active):  # fresh beats first: the pack's own trials are alive
                        _beat(study, s.trial)
                    optuna.storages.fail_stale_trials(study)
                while (
                    len(pack.active) < slots
                    and not ctx.stop.is_set()
                    and (deadline is None or time.monotonic() < deadline)
                ):
                    if plan(study, n_trials) != "run":
                        break
                    pack.start(study.ask())
                pack.collect_scored()
                if pack.active:
                    pack.step()
                    continue
                if pack.scoring:  # nothing to train: wait for a scorer (its trial may free the budget)
                    ctx.progress(worker, trial="-", phase=f"scoring {len(pack.scoring)} trials")
                    pack.collect_scored(wait=min(heartbeat_s, 5))
                    continue
                step = plan(study, n_trials)
                if step == "done" or (deadline is not None and time.monotonic() >= deadline):
                    break
                ctx.progress(worker, trial="-", phase="waiting for the other workers' trials")
                # another worker's trial runs; if it dies, its retry is ours
                ctx.stop.wait(min(heartbeat_s, 5))
        ctx.progress(worker, trial="-", phase="done")
    finally:
        if pack.active or pack.scoring:
            pack.interrupt()
        pack.close()
        beat.set()
        heart.join(5)
        with atomic_file(
            ctx.sweep_dir / "pack-stats" / f"{socket.gethostname()}-{os.getpid()}-{worker}.json"
        ) as f:
            json.dump(pack.stats(), f, indent=2)
    return pack


def generate_packed(
    lora: PackedLoRA,
    tokenizer,
    names: list[str],
    questions: list[list[str]],
    sampling,
    batch_size: int | str = "auto",
):
    """Replies to each adapter's questions (``questions[i]`` through adapter ``names[i]``), all in
    one engine pass: prompts of every adapter mixed in each batch, each row through its own
    adapter. Returns (replies per adapter, in question order; the engine, for its settings)."""
    flat = [q for qs in questions for q in qs]
    owner = [i for i, qs in enumerate(questions) for _ in qs]
    model = lora.model
    engine = GenerationEngine(
        model, tokenizer, sampling, batch_size=batch_size, decoder=SpellingLoRAModule.generation_decoder
    )
    # The adapters follow rows by their place in the batch: a prefill cut into runs of rows
    # would hand each layer a slice it cannot place, so each batch is prefilled in one call.
    static_decoder(model).prefill_chunk_tokens = sys.maxsize
    with lora.generation(names, bucket_rows(len(flat) * sampling.samples)) as set_rows:
        engine.before_batch = lambda idx: set_rows([owner[i] for i in idx for _ in range(sampling.samples)])
        try:
            replies = engine.generate(flat)
        finally:
            engine.release()
    out, start = [], 0
    for qs in questions:
        out.append(replies[start : start + len(qs)])
        start += len(qs)
    return out, engine


def probe_packed(lora: PackedLoRA, tokenizer, names: list[str], items, batch_size: int | str = "auto"):
    """The likelihood probe of every adapter of ``names`` on the same ``items``, in one scorer
    pass: the items repeated once per adapter, each row through its own adapter (the generation
    row plan, set before every forward). Zero-shot, as the sweep evaluates. Returns (the probe's
    results per adapter, in item order; the prompt + frame of each item; seconds; the scorer)."""
    model, n = lora.model, len(items)
    if static_decode_unsupported(model) is None:
        # the adapters follow rows by their place in the batch: no prefill cut into runs of rows
        static_decoder(model).prefill_chunk_tokens = sys.maxsize
    # the most rows one forward can hold: every (item, candidate) pair of every adapter (eager path)
    rows = len(names) * sum(len(candidate_answers(it.kind, it.answer)) for it in items)
    conversations = [[{"role": "user", "content": it.question}] for it in items] * len(names)
    with lora.generation(names, rows) as set_rows:
        results, prompts, seconds, scorer = probe_items(
            model,
            tokenizer,
            items * len(names),
            conversations,
            batch_size,
            label=None,
            before_rows=lambda idx: set_rows([i // n for i in idx]),
        )
    return [results[i * n : (i + 1) * n] for i in range(len(names))], prompts[:n], seconds, scorer


def _heartbeat(study, pack: Pack, every: int, stop: threading.Event) -> None:
    """Keep the pack's running trials alive in the storage while the pack runs."""
    while not stop.wait(every):
        for s in [*pack.active, *(s for _, s in pack.scoring)]:
            _beat(study, s.trial)


def _beat(study, trial) -> None:
    """One heartbeat of ``trial``. Ask-and-tell has no heartbeat thread of its own (Optuna's
    optimize loop runs one per trial, calling this same storage method)."""
    try:
        study._storage.record_heartbeat(trial._trial_id)
    except Exception:  # a storage hiccup: the next beat retries; a long outage marks the trial stale
        pass


def _pad_and_stack(batches: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The trials' micro-batches as one right-padded batch (rows in trial order). Extra right
    padding changes nothing a causal model computes at real tokens, and its labels are ignored."""
    width = max(b["input_ids"].shape[1] for b in batches)
    ids = torch.cat(
        [
            torch.nn.functional.pad(b["input_ids"], (0, width - b["input_ids"].shape[1]), value=pad_id)
            for b in batches
        ]
    )
    labels = torch.cat(
        [
            torch.nn.functional.pad(b["labels"], (0, width - b["labels"].shape[1]), value=IGNORE_INDEX)
            for b in batches
        ]
    )
    return ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def _wandb_beside_others(argv: list[str]) -> list[str]:
    """A W&B logger in a pack shares the process with its pack-mates' runs: ask W&B for a run of
    its own (``reinit="create_new"``) instead of the process's current one."""
    i = argv.index("--trainer.logger") + 1
    loggers = json.loads(argv[i])
    for lg in loggers:
        if lg["class_path"].endswith("WandbLogger"):
            lg["init_args"]["reinit"] = "create_new"
    return [*argv[:i], json.dumps(loggers), *argv[i + 1 :]]


def _reason(e: BaseException | str) -> str:
    if isinstance(e, str):
        return e
    if isinstance(e, SpellxferError | TrialError | TrialFailed):  # messages of our own
        return str(e)
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
