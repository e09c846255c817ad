"""``spellxfer bench train``: real tokens per second of the training path, beside a plain reference.

The same spelling rows (the ``full`` build's length mix) for every variant, one card each unless
``--devices`` asks for more:

* ``reference`` — a plain transformers + PEFT training loop, the usual starting point: random batches of
  ``reference_batch_size`` rows, right-padded, ``model(..., labels=...).loss`` (full-vocabulary
  logits at every position), PEFT's defaults (float32 adapters), AdamW. Kept only as a yardstick.
* ``spellxfer`` — the real thing: :class:`~spellxfer.training.module.SpellingLoRAModule`
  and :class:`~spellxfer.training.datamodule.SpellingDataModule` driven by a Lightning
  ``Trainer`` (length-grouped batches, completion-only chunked loss, no attention mask,
  bf16 autocast without PEFT's float32 input copies, Liger kernels when installed).

A variant can carry overrides, ``NAME:key=value,key=value`` — ``batch_size``, ``kernels``,
``gradient_checkpointing``, ``backend``, ``load_in_4bit`` for ``spellxfer``, plus the ablation
switches ``attention_mask=true`` (pass the padding mask as before), ``peft_input_cast=true``
(leave PEFT's float32 input cast on) and ``cudnn_attention=true`` (let SDPA use cuDNN), which is
how docs/performance.md measures what each optimisation buys, one at a time.

``--devices 1 2`` measures every ``spellxfer`` variant on one device and on two (the same
Trainer with ``strategy="ddp"``, ``batch_size`` rows per device: a global batch of
``batch_size × devices``), side by side in one JSON; tokens/s is then summed over the ranks.
The reference loop is single-device and runs with ``devices 1`` only.

Throughput counts real (non-pad) tokens only, over ``steps`` optimizer steps after ``warmup``
steps, with the GPU synchronised at both ends. MFU counts the useful work of a LoRA step,
``4 × N_body`` FLOPs per token (forward 2N, backward through the frozen weights 2N; adapter
weight gradients are < 1% at r 16) plus ``4 × vocab × hidden`` per supervised token for the
output layer, against the card's dense bf16 peak (H100 SXM: 989 TFLOP/s) and against the rate
a large matmul reaches on it, measured here.
"""

from __future__ import annotations

import gc
import importlib.metadata as md
import json
import platform
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import atomic_file, git_commit, package_versions
from spellxfer.core.tables import print_table
from spellxfer.data.build import build
from spellxfer.models.registry import check_model_name, load_model, load_tokenizer
from spellxfer.training.datamodule import (
    TRAIN_FILE,
    SpellingCollator,
    SpellingDataModule,
    read_training_rows,
    tokenize_examples,
)
from spellxfer.training.module import ALL_LINEAR, SpellingLoRAModule

H100_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s of an H100 SXM (NVIDIA datasheet)
SPELLXFER_KEYS = {
    "batch_size",
    "kernels",
    "gradient_checkpointing",
    "backend",
    "load_in_4bit",
    "attention_mask",
    "peft_input_cast",
    "lora_r",
    "cudnn_attention",
    "compile_layers",
}
REFERENCE_KEYS = {"batch_size", "gradient_checkpointing", "lora_r"}


def parse_variant(spec: str) -> tuple[str, dict]:
    """A ``--variants`` entry parsed: ``"spellxfer:kernels=none,batch_size=64"`` →
    ``("spellxfer", {"kernels": "none", "batch_size": 64})``."""
    name, _, rest = spec.partition(":")
    if name not in ("reference", "spellxfer"):
        raise SpellxferError(
            f"--variants: unknown variant {name!r} in {spec!r}; use reference or spellxfer[:key=value,…]"
        )
    allowed = SPELLXFER_KEYS if name == "spellxfer" else REFERENCE_KEYS
    overrides: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise SpellxferError(
                f"--variants: {spec!r}: {item!r} is not key=value with key in {sorted(allowed)}"
            )
        if value.lower() in ("true", "false"):
            overrides[key] = value.lower() == "true"
        elif value.isdigit():
            overrides[key] = int(value)
        else:
            overrides[key] = value
    return name, overrides


def flops_per_token(config, supervised_fraction: float) -> float:
    """Useful FLOPs per real token of a LoRA step (see the module docstring)."""
    h, v = config.hidden_size, config.vocab_size
    q = config.num_attention_heads * getattr(config, "head_dim", h // config.num_attention_heads)
    kv = config.num_key_value_heads * getattr(config, "head_dim", h // config.num_attention_heads)
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size
    return 4 * per_layer * config.num_hidden_layers + 4 * v * h * supervised_fraction


def matmul_rate(device: torch.device, seconds: float = 1.0) -> float:
    """FLOP/s a large square matmul reaches here (bf16 on CUDA, float32 on CPU)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        runs += 1
        if device.type == "cuda" and runs % 10:
            continue
        _sync(device)
    _sync(device)
    return 2 * n**3 * runs / (time.perf_counter() - t0)


def profile_table(fn, rows: int = 25) -> str:
    """Run ``fn()`` under the torch profiler; the ops that took the most device (or CPU) time."""
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _examples(data_dir: Path, model: str, n: int, seed: int) -> list[dict]:
    rows = read_training_rows(data_dir / TRAIN_FILE, limit=n).to_list()
    random.Random(seed).shuffle(rows)
    return tokenize_examples(
        load_tokenizer(model), [r["question"] for r in rows], [r["answer"] for r in rows]
    )


def run_reference(
    model: str,
    examples: list[dict],
    batch_size: int,
    steps: int,
    warmup: int,
    lora_r: int,
    gradient_checkpointing: bool,
    device: torch.device,
) -> dict:
    """The plain padded transformers + PEFT loop (see the module docstring)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = load_model(model, dtype=dtype, device=str(device))
    base.requires_grad_(False)
    lm = get_peft_model(
        base,
        LoraConfig(
            r=lora_r,
            lora_alpha=2 * lora_r,
            lora_dropout=0.0,
            target_modules=list(ALL_LINEAR),
            task_type="CAUSAL_LM",
        ),
    )
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.enable_input_require_grads()
    lm.train()
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)
    collate = SpellingCollator(base.generation_config.pad_token_id or 0)
    need = (warmup + steps) * batch_size
    if need > len(examples):
        raise SpellxferError(
            f"bench train: {need} rows needed, {len(examples)} available; lower --steps or --batch_size"
        )
    real = padded = 0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
        b = collate(examples[step * batch_size : (step + 1) * batch_size])
        out = lm(
            input_ids=b["input_ids"].to(device),
            attention_mask=b["attention_mask"].to(device),
            labels=b["labels"].to(device),
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            real += b["n_real_tokens"]
            padded += b["input_ids"].numel()
    _sync(device)
    seconds = time.perf_counter() - t0
    result = {"real_tokens": real, "padded_tokens": padded, "seconds": seconds, "config": base.config}
    del lm, base, opt
    return result


def run_spellxfer(
    model: str,
    data_dir: Path,
    n_rows: int,
    steps: int,
    warmup: int,
    seed: int,
    device: torch.device,
    batch_size: int,
    profile: bool = False,
    devices: int = 1,
    **overrides,
) -> dict:
    """The real LightningModule + DataModule under a Lightning Trainer, timed by a callback.

    With ``devices`` > 1 the Trainer runs DDP (Lightning relaunches this command once per extra
    rank); the result counts the tokens of every rank over the slowest rank's time, and its
    ``rank`` tells the caller whether it is rank 0, the one that reports.
    """
    attention_mask = overrides.pop("attention_mask", False)
    peft_input_cast = overrides.pop("peft_input_cast", False)
    cudnn_attention = overrides.pop("cudnn_attention", False)
    lora_r = overrides.pop("lora_r", 16)
    module = SpellingLoRAModule(
        model=model, lora_r=lora_r, lora_alpha=2 * lora_r, warmup_steps=0, seed=seed, **overrides
    )
    module.use_attention_mask = attention_mask
    module.keep_peft_input_cast = peft_input_cast
    module.cudnn_attention = cudnn_attention
    data = SpellingDataModule(
        str(data_dir),
        model,
        build_profile=None,
        seed=seed,
        batch_size=batch_size,
        train_limit=n_rows,
        val_limit=1,
    )
    timer = _StepTimer(warmup, steps, device, profile)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=devices,
        # the length-grouped sampler shards batches over ranks itself (SpellingDataModule)
        strategy="ddp" if devices > 1 else "auto",
        use_distributed_sampler=False,
        max_steps=warmup + steps + profile,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    result = {
        "real_tokens": timer.real,
        "padded_tokens": timer.padded,
        "seconds": timer.seconds,
        "config": module.lm.config,
        "kernels": module.kernels_applied,
        "backend": module.resolved_backend,
        "rank": trainer.global_rank,
    }
    del trainer, module, data
    return result


class _StepTimer(Callback):
    """Wall time and real / padded tokens of the steps after ``warmup``."""

    def __init__(self, warmup: int, steps: int, device: torch.device, profile: bool = False):
        self.warmup, self.steps, self.device, self.profile = warmup, steps, device, profile
        self.real = self.padded = 0
        self.seconds = 0.0
        self._t0 = self._prof = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            _sync(self.device)
            self._t0 = time.perf_counter()
        if self.warmup <= batch_idx < self.warmup + self.steps:
            self.real += batch["n_real_tokens"]
            self.padded += batch["input_ids"].numel()
        if batch_idx == self.warmup + self.steps:  # one extra, profiled step after the timed ones
            self._stop_clock()
            cuda = self.device.type == "cuda"
            self._prof = torch.profiler.profile(
                activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            )
            self._prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._prof is not None:
            _sync(self.device)
            self._prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            print(
                "--- profile of one step\n"
                + self._prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60),
                flush=True,
            )
            self._prof = None

    def on_train_end(self, trainer, pl_module):
        if self._t0 is None:
            raise SpellxferError("bench train: the run ended before the warmup steps were over")
        if not self.seconds:
            self._stop_clock()
        if trainer.world_size > 1:
            # every rank's tokens, over the slowest rank's time: the global batch's throughput
            counts = torch.tensor([self.real, self.padded], dtype=torch.float64, device=pl_module.device)
            self.real, self.padded = (int(x) for x in trainer.strategy.reduce(counts, reduce_op="sum"))
            seconds = torch.tensor([self.seconds], dtype=torch.float64, device=pl_module.device)
            self.seconds = float(trainer.strategy.all_gather(seconds).max())

    def _stop_clock(self):
        _sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def run_variant(
    spec: str,
    model: str,
    data_dir: Path,
    examples: list[dict],
    steps: int,
    warmup: int,
    batch_size: int,
    reference_batch_size: int,
    seed: int,
    device: torch.device,
    profile: bool = False,
    devices: int = 1,
) -> dict:
    """Measure one variant on ``devices`` devices; the GPU's peak memory counter is reset first and
    freed after (rank 0's card under DDP)."""
    name, overrides = parse_variant(spec)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    bs = overrides.pop("batch_size", reference_batch_size if name == "reference" else batch_size)
    t_start = time.perf_counter()
    try:
        if name == "reference":
            r = run_reference(
                model,
                examples,
                bs,
                steps,
                warmup,
                overrides.get("lora_r", 16),
                overrides.get("gradient_checkpointing", False),
                device,
            )
        else:
            r = run_spellxfer(
                model,
                data_dir,
                (warmup + steps + profile) * bs * devices,  # each rank trains on its own batches
                steps,
                warmup,
                seed,
                device,
                bs,
                profile=profile,
                devices=devices,
                **overrides,
            )
    except torch.OutOfMemoryError as e:  # a finding, not a crash: the table says which setting does not fit
        r = {"failed": "out of memory: " + str(e).splitlines()[0], "config": None}
    except Exception as e:  # e.g. a kernel that fails to build: record it, measure the other variants
        traceback.print_exc()
        r = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "config": None}
    r.update(
        variant=spec,
        devices=devices,
        batch_size=bs,  # per device
        global_batch_size=bs * devices,
        wall_seconds=time.perf_counter() - t_start,
    )
    r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def bench_train(
    model: str = "tiny-qwen3",
    data_dir: str = "results/data/full",
    variants: list[str] = ["reference", "spellxfer"],  # noqa: B006  (jsonargparse needs a literal default)
    batch_size: int = 128,
    reference_batch_size: int = 64,
    steps: int = 10,
    warmup: int = 5,
    seed: int = 0,
    profile: bool = False,
    devices: list[int] = [1],  # noqa: B006  (jsonargparse needs a literal default)
    out: str | None = None,
) -> int:
    """Training throughput: the plain transformers + PEFT loop beside spellxfer's fit, in one run.

    Prints real tokens/s, MFU, peak GPU memory and each variant's ratio to the first; writes JSON
    (default results/bench/train-<model>.json). Trained on spelling, evaluated on position and
    count only — this measures the training step, no accuracy.

    Args:
        model: qwen3-4b-shape on a GPU (random weights: speed does not depend on them), tiny-qwen3 on a CPU.
        data_dir: A ``data build`` directory; its spelling rows give the length mix (built with
            ``--profile full`` if absent).
        variants: ``reference`` / ``spellxfer``, each optionally ``:key=value,…`` (see docs/performance.md).
        batch_size: Rows per step and device for spellxfer variants (global batch: × devices).
        reference_batch_size: Rows per step for the reference (64: its best setting on an H100).
        steps: Timed optimizer steps per variant.
        warmup: Untimed steps first (CUDA context, kernel autotuning, allocator growth).
        seed: Seed for the row order and the random-weight model.
        profile: Also profile the last timed step of each spellxfer variant and print its
            costliest operations.
        devices: Device counts to measure each spellxfer variant on (``1 2``: one device, then
            two under DDP, one row each); the reference runs on one device only.
        out: JSON output path.
    """
    check_model_name(model)
    refuse_gpu_model_on_cpu("train", model)
    if steps < 1 or warmup < 1 or batch_size < 1 or reference_batch_size < 1:
        raise SpellxferError(
            "bench train: --steps, --warmup, --batch_size and --reference_batch_size must be ≥ 1"
        )
    for spec in variants:  # validate every spec before any work
        parse_variant(spec)
    if not devices or min(devices) < 1 or len(set(devices)) != len(devices):
        raise SpellxferError(f"bench train: --devices must be distinct counts ≥ 1, got {devices}")
    if torch.cuda.is_available() and max(devices) > torch.cuda.device_count():
        raise SpellxferError(
            f"bench train: --devices {max(devices)} but {torch.cuda.device_count()} GPU(s) are visible"
        )
    # (variant, devices) pairs: every variant on each count, the single-device reference once
    runs = [
        (spec, n) for n in devices for spec in variants if n == 1 or parse_variant(spec)[0] != "reference"
    ]
    if not runs:
        raise SpellxferError("bench train: the reference runs on one device; add 1 to --devices")
    data = Path(data_dir)
    if not (data / "spelling_train.jsonl").is_file():
        build(str(data), profile="full", seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_path = Path(out) if out else bench_dir(device) / f"train-{model}.json"
    command = command_line(
        ["bench", "train"],
        model=model,
        data_dir=data_dir,
        variants=variants,
        batch_size=batch_size,
        reference_batch_size=reference_batch_size,
        steps=steps,
        warmup=warmup,
        seed=seed,
        profile=profile,
        devices=devices,
        out=out,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(results: list[dict], rate, supervised) -> dict:
        """The report so far, rewritten after every variant: a run cut short keeps what it measured."""
        base = results[0]["tokens_per_second"] or float("nan")
        for r in results:
            r["ratio_to_first"] = r["tokens_per_second"] / base
        report = {
            "kind": "train",
            "model": model,
            "date": time.strftime("%Y-%m-%d"),
            **run_environment(device),
            "command": command,
            "matmul_flops_per_second": rate,
            "supervised_fraction": supervised,
            "steps": steps,
            "warmup": warmup,
            "data_dir": str(data),
            "results": results,
        }
        with atomic_file(out_path) as f:
            json.dump(report, f, indent=2, default=str)
        return report

    if len(runs) > 1:
        # Each variant in a fresh process: kernel patches (Liger swaps module classes globally),
        # cuDNN plan caches and allocator state cannot leak from one measurement into the next.
        results: list[dict] = []
        for spec, n in runs:
            one = _run_isolated(
                spec, model, data, batch_size, reference_batch_size, steps, warmup, seed, profile, n
            )
            results.append(one["results"][0])
            report = write(results, one["matmul_flops_per_second"], one["supervised_fraction"])
            print(
                f"{spec} on {n} device(s): {results[-1].get('tokens_per_second')} real tokens/s "
                f"(written to {out_path})",
                flush=True,
            )
    else:
        ((spec, n),) = runs
        rate, supervised, results = _measure(
            spec, model, data, batch_size, reference_batch_size, steps, warmup, seed, profile, device, n
        )
        if results[0].pop("rank", 0):
            return 0  # a DDP rank Lightning launched: rank 0 reports for all of them
        report = write(results, rate, supervised)
    _print_table(report, "real tokens/s", "tokens_per_second")
    print(f"wrote {out_path}")
    return 0


def _measure(
    spec, model, data, batch_size, reference_batch_size, steps, warmup, seed, profile, device, devices=1
):
    """One variant in this process (and the ranks DDP launches): (matmul FLOP/s, supervised
    fraction, [result])."""
    bs = max(batch_size, reference_batch_size, parse_variant(spec)[1].get("batch_size", 0))
    examples = _examples(data, model, (warmup + steps + 1) * bs, seed)
    supervised = sum(sum(t != -100 for t in e["labels"]) for e in examples) / sum(
        len(e["labels"]) for e in examples
    )
    rate = matmul_rate(device)
    print(f"bench train: {spec} …", flush=True)
    r = run_variant(
        spec,
        model,
        data,
        examples,
        steps,
        warmup,
        batch_size,
        reference_batch_size,
        seed,
        device,
        profile,
        devices,
    )
    config = r.pop("config")
    if "failed" in r:
        print(f"bench train: {spec} failed: {r['failed']}", flush=True)
        r.update(tokens_per_second=0.0, padding_fraction=None, mfu_vs_matmul=0.0, mfu_vs_peak=0.0)
        return rate, supervised, [r]
    r["tokens_per_second"] = r["real_tokens"] / r["seconds"]
    r["padding_fraction"] = 1 - r["real_tokens"] / r["padded_tokens"]
    # per device: the summed rate of `devices` cards against one card's peak, shared out
    useful = r["tokens_per_second"] * flops_per_token(config, supervised) / devices
    r["mfu_vs_matmul"] = useful / rate
    r["mfu_vs_peak"] = useful / H100_BF16_PEAK if device.type == "cuda" else None
    return rate, supervised, [r]


def _run_isolated(
    spec, model, data, batch_size, reference_batch_size, steps, warmup, seed, profile, devices
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        cmd = [
            sys.executable,
            "-m",
            "spellxfer",
            "bench",
            "train",
            "--model",
            model,
            "--data_dir",
            str(data),
            "--variants",
            spec,
            "--batch_size",
            str(batch_size),
            "--reference_batch_size",
            str(reference_batch_size),
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--seed",
            str(seed),
            "--profile",
            str(profile).lower(),
            "--devices",
            str(devices),
            "--out",
            str(out),
        ]
        rc = subprocess.run(cmd).returncode
        if rc != 0 or not out.is_file():
            raise SpellxferError(f"bench train: variant {spec!r} exited with code {rc}")
        return json.loads(out.read_text())


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_environment(device: torch.device) -> dict:
    """What a benchmark JSON needs to be compared with another: the card (name, memory, compute
    capability, driver, CUDA runtime), the package versions and the git commit."""
    card: dict = {"name": _device_name(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        card.update(
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            driver=_driver_version(),
        )
    versions = package_versions()
    for pkg in ("triton", "liger-kernel", "accelerate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return {"device": card["name"], "card": card, "versions": versions, "git_commit": git_commit()}


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


# Models of Qwen3-4B's size (8 GB of bf16 weights, far more for training): a CPU run builds the full
# data, then is killed by the out-of-memory killer minutes later, so they refuse up front.
GPU_ONLY_MODELS = ("qwen3-4b-shape", "Qwen/Qwen3-4B", "unsloth/Qwen3-4B")


def refuse_gpu_model_on_cpu(command: str, model: str) -> None:
    """One ``error:`` line, before any data is built or weights are loaded, when ``model`` is
    GPU-sized and no CUDA device is visible."""
    if model in GPU_ONLY_MODELS and not torch.cuda.is_available():
        raise SpellxferError(
            f"bench {command}: --model {model} needs a CUDA GPU and none is visible here; "
            "on a CPU use --model tiny-qwen3 (or smollm2-135m)"
        )


def bench_dir(device: torch.device) -> Path:
    """``results/bench/<card>-<date>/``: ``h200-2026-12-01``, ``cpu-2026-12-01``."""
    name = _device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().removeprefix("nvidia ")).strip("-")
    return (
        Path("results/bench")
        / f"{slug.split('-')[0] if device.type == 'cuda' else slug}-{time.strftime('%Y-%m-%d')}"
    )


def command_line(command: list[str], **args) -> str:
    """The ``python -m spellxfer …`` line that repeats a run, every argument spelled out."""
    parts = ["python", "-m", "spellxfer", *command]
    for key, value in args.items():
        if value is None:
            continue
        parts.append(f"--{key}")
        parts += (
            [str(v) for v in value]
            if isinstance(value, list)
            else [str(value).lower() if isinstance(value, bool) else str(value)]
        )
    return shlex.join(parts)


def _print_table(report: dict, rate_label: str, key: str) -> None:
    table = Table(title=f"{report['model']} on {report['device']} ({report['date']})")
    table.add_column("variant")
    for col in ("devices", "batch", rate_label, "× first", "MFU (peak)", "MFU (matmul)", "peak GiB"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        table.add_row(
            r["variant"],
            str(r.get("devices", 1)),
            str(r["batch_size"]),
            f"{r[key]:,.0f}",
            f"{r['ratio_to_first']:.2f}",
            "–" if r["mfu_vs_peak"] is None else f"{r['mfu_vs_peak']:.1%}",
            f"{r['mfu_vs_matmul']:.1%}",
            "–" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
        )
    print_table(table, Console(width=None if sys.stdout.isatty() else 200))  # whole rows in a log file
