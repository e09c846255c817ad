"""The LightningModule: a base LM with LoRA, trained on spelling, validated on position and count.

Lifecycle (one hook, one job):

- ``__init__`` validates every hyperparameter (a bad config fails before any model loads);
- ``configure_model`` loads the base model through a backend switch and wraps it in LoRA —
  ``unsloth`` (FastLanguageModel on CUDA, optional 4-bit), ``hf`` (transformers + PEFT; optional
  bitsandbytes 4-bit on CUDA; fp32 on CPU, bf16 on CUDA) or ``auto`` (Unsloth when CUDA and the
  package are present, else ``hf``);
- ``training_step``: completion-only cross-entropy on spelling examples, logged with the
  learning rate of its optimizer step;
- ``validation_step`` / ``test_step``: generate replies to position and count questions with the
  shared engine, parse them, update the torchmetrics exact-match metric;
- ``on_validation_epoch_end``: log ``val/position_accuracy``, ``val/count_accuracy``,
  ``val/transfer_score`` and per-subtask values (with ``scoring: both`` also the likelihood
  probe's ``val/position_likelihood_accuracy``, ``val/count_likelihood_accuracy`` and per subtask,
  a diagnostic that checkpoints and early stopping never follow);
- every logged row of a fit is numbered with the optimizer steps done — the N of
  ``step{N}.ckpt`` — (:meth:`SpellingLoRAModule._log_step`);
- ``predict_step``: the raw replies to the test questions, parsed and scored (``predict``
  writes them to ``<default_root_dir>/predictions.jsonl``).

Trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import importlib.util
import time
from contextlib import nullcontext
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from spellxfer.core.errors import SpellxferError
from spellxfer.evaluation.likelihood import probe_items
from spellxfer.evaluation.metrics import TransferAccuracy
from spellxfer.models.generation import GenerationEngine, default_sampling
from spellxfer.models.losses import completion_only_loss
from spellxfer.models.registry import (
    apply_fused_kernels,
    check_lora_state,
    check_model_name,
    compile_decoder_layers,
    load_model,
    load_tokenizer,
    materialize,
    quiet_peft_wrap,
)
from spellxfer.tasks.parsing import score

# Wider than any layer a LoRA rank would sensibly adapt (Qwen3-4B's hidden size is 2560); the
# bound keeps a typo such as 1e30 from reaching PEFT's allocation.
MAX_LORA_RANK = 4096
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SpellingLoRAModule(L.LightningModule):
    """LoRA fine-tuning of a causal LM on spelling, scored by generation on position / count.

    Args:
        model: smollm2-135m, tiny-qwen3, qwen3-4b-shape, a hub id (Qwen/Qwen3-4B) or a local directory.
        backend: auto (Unsloth on CUDA when installed, else hf), hf (transformers + PEFT) or unsloth.
        lora_r: LoRA rank; higher rank adapts more, costs more memory. 1 to 4096 (a rank beyond the
            layer width adds nothing).
        lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        lora_dropout: Dropout on the LoRA input, in [0, 1).
        target_modules: Linear layers that get LoRA adapters (all seven by default).
        load_in_4bit: Quantise the frozen base to 4-bit (CUDA only; needs bitsandbytes).
        gradient_checkpointing: Trade compute for memory (recompute activations in backward).
        kernels: Fused Triton kernels for the hf backend on CUDA: ``liger`` (Liger-Kernel's
            RMSNorm, SwiGLU and RoPE for Qwen3 / Llama-family models), ``none``, or ``auto``
            (Liger when installed and the architecture is supported). See docs/performance.md.
        compile_layers: hf backend: compile each decoder layer's training forward with
            ``torch.compile`` (dynamic shapes, so every sequence length reuses one graph), which
            fuses RMSNorm, SwiGLU, RoPE and the LoRA adds the way Liger does, plus what lies
            between them. Generation (validation, test) runs the layers uncompiled. Liger is not
            applied with it (inductor cannot trace Liger's autograd functions).
        learning_rate: Peak AdamW learning rate after warmup (> 0); configs/sweeps/seed_grid.yaml
            tries 1e-4 / 2e-4 / 5e-4 / 1e-3.
        weight_decay: AdamW weight decay on LoRA weights only (the base is frozen); LoRA rarely
            needs any.
        optimizer: adamw (torch), or adamw_8bit (bitsandbytes, CUDA only: ~1/4 the optimizer
            state memory).
        scheduler: Learning-rate decay to 0 at ``trainer.max_steps`` after warmup: linear, cosine
            or constant.
        warmup_steps: Linear warmup from 0 over this many optimizer steps (~5% of a short run is
            typical).
        val_decoding: Decoding for validation generation: greedy (default, low variance) or sampled.
        val_max_new_tokens: Reply length cap during validation (≥ 1).
        seed: Seed for random-weight models and validation sampling.
        scoring: Validation scoring: ``generation`` (parsed replies, exact match) or ``both``
            (also the likelihood probe of ``evaluate --scoring likelihood`` on the same items,
            logged as ``val/{task}_likelihood_accuracy`` and ``val/{task}/{subtask}_likelihood_accuracy``;
            it costs a second pass per validation). Checkpoints and early stopping follow the
            generation metrics either way.
    """

    use_attention_mask = False
    """Ablation switch for ``spellxfer bench train``: pass the padding mask to the training
    forward, as the plain loop does (the default leaves it out; see ``training_step``)."""
    keep_peft_input_cast = False
    """Ablation switch for ``spellxfer bench train``: keep PEFT's float32 input copies (see
    ``_mixed_precision``)."""
    generation_decoder = "auto"
    """Ablation switch for ``spellxfer bench eval``'s validation variant: the engine's decoder
    (``auto``: CUDA-graph steps over a static cache on a GPU; ``eager``: the previous loop)."""
    cudnn_attention = False
    """Ablation switch for ``spellxfer bench train``: let SDPA pick cuDNN attention for training.
    Off by default: cuDNN builds an execution plan per new sequence length (milliseconds of host
    time per layer), and length-grouped batches bring a new length most steps; the flash and
    memory-efficient kernels need no plan (docs/performance.md)."""

    def __init__(
        self,
        model: str = "tiny-qwen3",
        backend: Literal["auto", "hf", "unsloth"] = "auto",
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        target_modules: list[str] = list(ALL_LINEAR),  # noqa: B006  (jsonargparse needs a literal default)
        load_in_4bit: bool = False,
        gradient_checkpointing: bool = False,
        kernels: Literal["auto", "liger", "none"] = "auto",
        compile_layers: bool = False,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        optimizer: Literal["adamw", "adamw_8bit"] = "adamw",
        scheduler: Literal["linear", "cosine", "constant"] = "linear",
        warmup_steps: int = 10,
        val_decoding: Literal["greedy", "sampled"] = "greedy",
        val_max_new_tokens: int = 16,
        seed: int = 0,
        scoring: Literal["generation", "both"] = "generation",
    ):
        super().__init__()
        try:
            check_model_name(model)
        except SpellxferError as e:
            raise SpellxferError(f"model.model: {e}", key="model.model") from None
        _require(
            1 <= lora_r <= MAX_LORA_RANK, "model.lora_r", f"must be in [1, {MAX_LORA_RANK}], got {lora_r}"
        )
        _require(
            val_max_new_tokens >= 1, "model.val_max_new_tokens", f"must be ≥ 1, got {val_max_new_tokens}"
        )
        _require(lora_alpha > 0, "model.lora_alpha", f"must be > 0, got {lora_alpha}")
        _require(0 <= lora_dropout < 1, "model.lora_dropout", f"must be in [0, 1), got {lora_dropout}")
        _require(learning_rate > 0, "model.learning_rate", f"must be > 0, got {learning_rate}")
        _require(warmup_steps >= 0, "model.warmup_steps", f"must be ≥ 0, got {warmup_steps}")
        _require(bool(target_modules), "model.target_modules", "must name at least one layer")
        _require(
            scoring in ("generation", "both"),
            "model.scoring",
            f"must be generation or both (validation always scores by generation: checkpoints follow it), "
            f"got {scoring!r}",
        )
        cuda = torch.cuda.is_available()
        if backend == "unsloth":
            _require(cuda, "model.backend", "unsloth needs a CUDA GPU; use backend: hf on this machine")
            _require(
                importlib.util.find_spec("unsloth") is not None,
                "model.backend",
                "unsloth is not installed (pip install 'spellxfer[gpu]')",
            )
        if kernels == "liger":
            _require(
                cuda and importlib.util.find_spec("liger_kernel") is not None,
                "model.kernels",
                "liger needs CUDA and the liger-kernel package (pip install liger-kernel)",
            )
        if compile_layers:
            _require(
                backend != "unsloth",
                "model.compile_layers",
                "applies to the hf backend (Unsloth compiles its own)",
            )
            _require(
                kernels != "liger",
                "model.compile_layers",
                "replaces Liger's kernels; set model.kernels to auto or none",
            )
        if load_in_4bit or optimizer == "adamw_8bit":
            _require(cuda, "model.load_in_4bit/optimizer", "4-bit weights and 8-bit AdamW need CUDA")
        self.save_hyperparameters()
        self.lm = None
        self.tokenizer = None
        self.val_metric = TransferAccuracy()
        self.test_metric = TransferAccuracy()
        self.val_probe_metric = TransferAccuracy()  # the likelihood probe's verdicts (scoring: both)
        # Checkpoints hold only the trainable (LoRA) weights; the frozen base comes from `model`.
        self.strict_loading = False
        self._generation_engine = None
        self._last_step_time: float | None = None
        self._last_step_tokens = 0
        self._bf16_autocast = False
        self.kernels_applied = "none"
        """Fused kernels actually in use after ``configure_model`` (``liger``, ``compiled`` or ``none``)."""

    # ---- model ------------------------------------------------------------------------------------
    @property
    def resolved_backend(self) -> str:
        b = self.hparams.backend
        if b == "auto":
            return "unsloth" if torch.cuda.is_available() and importlib.util.find_spec("unsloth") else "hf"
        return b

    def configure_model(self) -> None:
        if self.lm is not None:
            return
        hp = self.hparams
        if self.resolved_backend == "unsloth":
            self.lm, self.tokenizer = _load_unsloth(hp)
        else:
            self.lm = _load_hf(hp, self.device)
            self.tokenizer = load_tokenizer(hp.model)
        self.lm.train()  # the registry hands out eval-mode models (for generation)
        if self.resolved_backend == "hf":  # Unsloth brings its own kernels and checkpointing
            if hp.gradient_checkpointing:
                self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                self.lm.enable_input_require_grads()
            if hp.get("compile_layers"):
                self.kernels_applied = compile_decoder_layers(self.lm)
            else:
                self.kernels_applied = apply_fused_kernels(self.lm, hp.kernels)
            if (
                self.lm.dtype == torch.bfloat16
                and self.lm.device.type == "cuda"
                and not self.keep_peft_input_cast
            ):
                from peft.tuners.tuners_utils import BaseTunerLayer  # heavy: with a model, not for fit --help

                for m in self.lm.modules():
                    if isinstance(m, BaseTunerLayer):
                        m.cast_input_dtype_enabled = False  # see _mixed_precision
                self._bf16_autocast = True
            # A process-wide switch, not a context manager: activation checkpointing recomputes
            # in backward, outside training_step, and must pick the same kernel as the forward.
            torch.backends.cuda.enable_cudnn_sdp(self.cudnn_attention)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning loads the state next with strict=False (the frozen base is not in it), which
        # would keep any missing LoRA tensor at its initial value: check the set and shapes first.
        if self.lm is None:
            return
        path = self._trainer.ckpt_path if self._trainer is not None else None
        check_lora_state(checkpoint.get("state_dict", {}), self.trainable_state_dict(), f"checkpoint {path}")

    # ---- training ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # attention_mask=None: the collator pads on the right, and causal attention never lets a
        # real token see the pads after it, so the mask changes nothing for supervised positions —
        # but without one, SDPA can run its fused causal (flash) kernel. Pinned by a test.
        with self._mixed_precision():
            mask = batch["attention_mask"] if self.use_attention_mask else None
            loss = completion_only_loss(self.lm, batch["input_ids"], mask, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/real_tokens", float(batch["n_real_tokens"]), reduce_fx="sum", batch_size=1)
        # the rate this batch's optimizer step uses (the schedule steps after it), named as
        # Lightning's LearningRateMonitor names it; float64, so 1e-3 is logged as 1e-3
        optimizer = self.trainer.optimizers[0]
        lr = torch.tensor(optimizer.param_groups[0]["lr"], dtype=torch.float64, device=self.device)
        self.log(f"lr-{type(optimizer).__name__}", lr, batch_size=1)
        self._log_step(self.global_step + 1)  # the row is written once this batch's step is taken
        # Throughput between consecutive steps (data, forward, backward, optimizer: all of it),
        # counting real tokens only — padding is not work we wanted done.
        now = time.perf_counter()
        if self._last_step_time is not None:
            rate = self._last_step_tokens / (now - self._last_step_time)
            self.log("train/tokens_per_second", rate, prog_bar=True, batch_size=1)
        self._last_step_time, self._last_step_tokens = now, batch["n_real_tokens"]
        return loss

    def _mixed_precision(self):
        """bf16 autocast with float32 LoRA weights, as Lightning's ``bf16-mixed`` does — plus one fix.

        PEFT keeps adapter weights in float32 and, before each LoRA product, casts the layer's
        *input* to float32: a full-size float32 copy of every activation entering the seven
        adapted layers, kept for backward (≈105 KB per token per Qwen3-4B layer). Under autocast
        the cast is pointless — the product runs in bf16 anyway — so ``configure_model`` turns it
        off for bf16 CUDA models and every forward (training, validation, prediction) runs here.
        The autocast state is what activation checkpointing restores when it recomputes, so
        recomputed tensors match. CPU and float32 models are untouched.
        """
        if not self._bf16_autocast:
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def on_train_end(self) -> None:
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**30
            rank_zero_info(f"peak GPU memory allocated: {peak:.1f} GiB ({torch.cuda.get_device_name()})")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt, sched = build_optimizer(self.hparams, params, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation / test: generation, parsing, exact match -----------------------------------
    def _engine(self):
        """The shared generation engine, built once (it reads the sampling YAML) per loaded model."""
        if self._generation_engine is None:
            hp = self.hparams
            sampling = default_sampling(
                decoding=hp.val_decoding, max_new_tokens=hp.val_max_new_tokens, seed=hp.seed
            )
            # batches sized from free memory, at most the dataloader's batch (data.eval_batch_size)
            self._generation_engine = GenerationEngine(
                self.lm, self.tokenizer, sampling, batch_size="auto", decoder=self.generation_decoder
            )
        return self._generation_engine

    def _release_generation_memory(self) -> None:
        """Hand the static KV cache and captured graphs back after an evaluation epoch, so the
        training steps in between have that memory (the next validation captures again: ~1 s)."""
        if self._generation_engine is not None:
            self._generation_engine.release()

    def _score_batch(self, items: list, metric: TransferAccuracy) -> None:
        with self._mixed_precision():
            replies = self._engine().generate([it.question for it in items])
        correct = [score(r[0], it.answer)[1] for r, it in zip(replies, items)]
        metric.update([it.task for it in items], [it.subtask for it in items], correct)

    def predict_step(self, batch: list, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """Raw reply, parsed answer and correctness per test item (written by PredictionsWriter)."""
        with self._mixed_precision():
            replies = self._engine().generate([it.question for it in batch])
        rows = []
        for r, it in zip(replies, batch):
            parsed, correct = score(r[0], it.answer)
            rows.append(
                {
                    "id": it.id,
                    "file": it.file,
                    "task": it.task,
                    "subtask": it.subtask,
                    "question": it.question,
                    "answer": it.answer,
                    "output": r[0],
                    "parsed": parsed,
                    "correct": correct,
                }
            )
        return rows

    def _probe_batch(self, items: list, metric: TransferAccuracy) -> None:
        """The likelihood probe's verdicts on ``items``, zero-shot, as ``evaluate`` ranks them."""
        conversations = [[{"role": "user", "content": it.question}] for it in items]
        with self._mixed_precision():
            results, _, _, _ = probe_items(self.lm, self.tokenizer, items, conversations, label=None)
        metric.update([it.task for it in items], [it.subtask for it in items], [r.correct for r in results])

    def validation_step(self, batch: list, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._score_batch(batch, self.val_metric)
        if self.hparams.get("scoring", "generation") == "both":
            self._probe_batch(batch, self.val_probe_metric)

    def test_step(self, batch: list, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._score_batch(batch, self.test_metric)

    def on_validation_epoch_end(self) -> None:
        if self.hparams.get("scoring", "generation") == "both":
            # position_accuracy → position_likelihood_accuracy, position/nth_letter_accuracy →
            # position/nth_letter_likelihood_accuracy (evaluate's names); no transfer score: the
            # probe is a diagnostic, never a selection metric
            values = self.val_probe_metric.compute()
            self.log_dict(
                {
                    f"val/{k.removesuffix('_accuracy')}_likelihood_accuracy": v
                    for k, v in values.items()
                    if k != "transfer_score"
                },
                sync_dist=True,
            )
            self.val_probe_metric.reset()
        self._log_metric(self.val_metric, "val")
        self._release_generation_memory()

    def on_test_epoch_end(self) -> None:
        self._log_metric(self.test_metric, "test")
        self._release_generation_memory()

    def _log_metric(self, metric: TransferAccuracy, prefix: str) -> None:
        values = metric.compute()  # summed across ranks by torchmetrics: every rank holds the total
        # sync_dist averages identical values (a no-op on the numbers); it tells Lightning the
        # epoch-level value is global, which keeps its multi-device warning quiet.
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, prog_bar=False, sync_dist=True)
        if prefix == "val" and self._trainer is not None and self.trainer.state.fn == "fit":
            self._log_step(self.trainer.global_step, sync_dist=True)  # 0 for the base model's validation
        metric.reset()

    def _log_step(self, steps_done: int, **kwargs) -> None:
        """Number the row being logged with the optimizer steps done.

        Lightning numbers a row with the optimizer steps done *before* the current batch (the
        training row of step 10, and the validation after it, at 9), while checkpoints are named
        after the steps done (``step10.ckpt``). A logged ``step`` is the row's step in every logger
        (CSV, ``metrics.jsonl``, W&B's ``trainer/global_step`` axis) and ``{step}`` in checkpoint
        names; ``global_step`` keeps the count in the row, as in logs written before rows were
        renumbered (whose other rows are one less: see ``loggers.optimizer_step``), and ``epoch``
        is what Lightning adds to a row it numbers itself.
        """
        self.log_dict(
            {"step": float(steps_done), "global_step": float(steps_done), "epoch": float(self.current_epoch)},
            batch_size=1,
            **kwargs,
        )


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise SpellxferError(f"{key}: {message}", key=key)


def build_optimizer(hp, params: list, total_steps: int):
    """The optimizer and per-step LR schedule of a fit (``hp``: the module's hyper-parameters):
    AdamW (or bitsandbytes' 8-bit AdamW) over ``params``, linear warmup over ``warmup_steps``, then
    ``scheduler`` decay to 0 at ``total_steps`` optimizer steps. Packed sweep trials build theirs here too."""
    if hp.optimizer == "adamw_8bit":
        import bitsandbytes as bnb  # optional extra, for adamw_8bit only

        opt = bnb.optim.AdamW8bit(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    return opt, _schedule(opt, hp.scheduler, hp.warmup_steps, max(total_steps, 1))


def _schedule(opt, kind: str, warmup: int, total: int):
    """transformers' schedules: linear warmup from 0 over ``warmup`` optimizer steps, then linear
    or cosine decay to 0 at ``total`` steps, or constant."""
    from transformers import get_scheduler  # heavy: with a model, not for fit --help

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[kind]
    return get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)


def lora_config(hp):
    """The PEFT ``LoraConfig`` of the module's hyper-parameters ``hp`` (rank, alpha, dropout, targets)."""
    from peft import LoraConfig  # heavy: with a model, not for fit --help

    return LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=list(hp.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )


def _load_hf(hp, device):
    from peft import get_peft_model  # heavy: with a model, not for fit --help

    base = load_base(hp)
    with quiet_peft_wrap():
        return get_peft_model(base, lora_config(hp))


def load_base(hp):
    """The frozen base model of the hf backend as ``fit`` trains on it: bf16 on CUDA (4-bit with
    ``load_in_4bit``), float32 on a CPU, every weight with ``requires_grad`` off."""
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    if hp.load_in_4bit:
        from peft import prepare_model_for_kbit_training  # heavy: only for a 4-bit model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # heavy: only for a 4-bit model

        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
        base = AutoModelForCausalLM.from_pretrained(hp.model, quantization_config=q, dtype=dtype)
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=hp.gradient_checkpointing)
    else:
        base = load_model(hp.model, dtype=dtype, device="cuda" if cuda else "cpu", seed=hp.seed)
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def _load_unsloth(hp):
    from unsloth import FastLanguageModel  # optional extra; it needs a GPU to import

    # Unsloth opens models by path or hub id: embedded names are saved to the cache once.
    lm, tok = FastLanguageModel.from_pretrained(
        model_name=materialize(hp.model, seed=hp.seed), load_in_4bit=hp.load_in_4bit, dtype=None
    )
    lm = FastLanguageModel.get_peft_model(
        lm,
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=list(hp.target_modules),
        bias="none",
        use_gradient_checkpointing="unsloth" if hp.gradient_checkpointing else False,
        random_state=hp.seed,
    )
    tok.padding_side = "left"
    return lm, tok
