"""``spellxfer bench sweep``: the makespan of one set of sweep trials, one at a time, by W workers
sharing the card, and packed K to a process on one base model.

Every mode runs the same N trials — the space file's hyperparameters drawn by the random sampler
from one seed (trial n's draw depends only on the seed and n), ``max_steps`` fixed for all,
validation every ``validate_every_steps`` optimizer steps on ``val_limit`` position + count
questions, a greedy test evaluation on ``eval_limit`` of each, early stopping off so every trial
does the same work in every mode — as a real ``python -m spellxfer sweep`` in its own process:

* ``serial``: one trial at a time (``--workers 1``): a ``fit`` process, then an ``evaluate`` process;
* ``workers:W``: ``--workers W``, W such processes sharing the card at once;
* ``pack:K`` (``pack:K:KERNEL``, ``pack:K[:KERNEL]:window``): ``--pack K``, K trials in one process
  on one base model (:mod:`spellxfer.sweep.pack`), KERNEL the per-row LoRA product (loop,
  concat, grouped); ``window``: ``--pack_window true``, each step a whole accumulation window.

A mode ``NAME@n`` runs only the first n trials and reports the makespan also scaled to N
(trials of one mode run back to back, so a long serial run can be sampled).

For each mode: makespan (wall seconds of the sweep command; the base model's evaluation is made
once beforehand and shared), trials per GPU-hour, peak memory (the card's used memory polled with
``nvidia-smi``, so several worker processes add up; the largest process's RSS on a CPU), trial
outcomes, and for packs the seconds per phase (setup, train, validate, evaluate). Then, in this
process, the kernels alone: one packed forward + backward of the first K trials' micro-batches
with each kernel, milliseconds per step and the largest loss difference to ``loop``.

The JSON (default ``results/bench/<card>-<date>/sweep-<model>.json``) records the card, versions,
commit and command; ``--append true`` merges the modes of another invocation into an existing
JSON (one mode per call keeps each command short). Trained on spelling, evaluated on position
and count only.
"""

from __future__ import annotations

import csv
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import optuna
import torch
import yaml
from rich.console import Console
from rich.table import Table

from spellxfer.bench.train import bench_dir, command_line, refuse_gpu_model_on_cpu, run_environment
from spellxfer.core.configs import config_path
from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import atomic_file
from spellxfer.core.tables import print_table
from spellxfer.models.losses import completion_loss_from_hidden, decoder_and_head
from spellxfer.models.registry import check_model_name, load_model
from spellxfer.sweep.run import base_settings, prepare_data_and_base
from spellxfer.sweep.space import load_space, make_sampler
from spellxfer.training.module import ALL_LINEAR, lora_config
from spellxfer.training.packed import KERNELS, PackedLoRA

MODE = re.compile(r"^(serial|workers:(\d+)|pack:(\d+)(?::(loop|concat|grouped))?(:window)?)(?:@(\d+))?$")
# What packing must buy to be worth it: makespan ratios (× faster) and the pack's peak memory (GiB),
# which must leave room on an 80 GB card.
TARGETS = {"pack_vs_serial": 15.0, "pack_vs_best_workers": 3.0, "pack_peak_gib": 60.0}


def parse_mode(spec: str) -> dict:
    """``"pack:16:grouped:window@4"`` → ``{"mode": "pack", "workers": 1, "pack": 16, "kernel": "grouped",
    "window": True, "trials": 4}``."""
    m = MODE.match(spec)
    if m is None:
        raise SpellxferError(
            f"--modes: {spec!r} is not serial, workers:W or pack:K[:loop|concat|grouped][:window], "
            "optionally followed by @n (the first n trials only)"
        )
    name = spec.split(":")[0].split("@")[0]
    workers = int(m.group(2)) if m.group(2) else 1
    pack = int(m.group(3)) if m.group(3) else None
    if workers < 1 or (pack is not None and pack < 1) or (m.group(6) and int(m.group(6)) < 1):
        raise SpellxferError(f"--modes: {spec!r}: counts must be ≥ 1")
    return {
        "spec": spec,
        "mode": name,
        "workers": workers,
        "pack": pack,
        "kernel": m.group(4) or "auto",
        "window": bool(m.group(5)),
        "trials": int(m.group(6)) if m.group(6) else None,
    }


def bench_space(
    space: str,
    base: str,
    model: str,
    trials: int,
    max_steps: int,
    validate_every_steps: int,
    val_limit: int,
    eval_limit: int,
    data_dir: str,
    gradient_checkpointing: bool | str,
    seed: int,
    cuda: bool,
) -> dict:
    """The bench's space file: ``space``'s hyperparameters (all but max_steps), the rest fixed."""
    grid = load_space(space)
    fixed = {
        "model.model": model,
        "model.backend": "hf",
        "model.load_in_4bit": False,
        "model.optimizer": "adamw",
        "model.gradient_checkpointing": gradient_checkpointing,
        "trainer.max_steps": max_steps,
        "trainer.accelerator": "gpu" if cuda else "cpu",
        "trainer.precision": "bf16-mixed" if cuda else "32-true",
        "data.data_dir": data_dir,
        "data.build_profile": "full",
        "data.val_limit": val_limit,
        # every trial runs its max_steps in every mode: the same work, comparable makespans
        "early_stopping.patience": 1_000_000,
    }
    return {
        "base": base,
        "objective": "val/transfer_score",
        "sampler": "random",
        "pruner": "none",
        "seed": seed,
        "budget": {"trials": trials},
        "decodings": ["greedy"],
        "evaluation": {"limit": eval_limit},
        "validate_every_steps": validate_every_steps,
        "fixed": fixed,
        "parameters": {p.name: list(p.values) for p in grid.parameters if p.name != "max_steps"},
    }


class MemoryPoll:
    """The peak memory used on each GPU (``nvidia-smi`` once a second) while a mode runs."""

    def __init__(self):
        self.peak_mib: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in out.strip().splitlines():
                index, used = (x.strip() for x in line.split(","))
                self.peak_mib[index] = max(self.peak_mib.get(index, 0), int(used))
            self._stop.wait(1.0)


def run_mode(
    mode: dict, space: dict, work: Path, base_eval: Path, n_trials: int, cuda: bool, pack_scorers: int = 0
) -> dict:
    """One mode's sweep in its own process; returns its measurements (a pack scores finished trials
    in ``pack_scorers`` evaluate processes beside it, ``sweep --pack_scorers``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", mode["spec"])
    results = work / slug
    if results.exists():
        shutil.rmtree(results)
    trials = min(mode["trials"] or n_trials, n_trials)
    mode_space = json.loads(json.dumps(space))
    mode_space["budget"]["trials"] = trials
    gc = mode_space["fixed"]["model.gradient_checkpointing"]
    if gc == "auto":
        mode_space["fixed"]["model.gradient_checkpointing"] = mode["pack"] is not None
    space_path = work / f"space-{slug}.yaml"
    space_path.write_text(yaml.safe_dump(mode_space, sort_keys=False))
    shutil.copytree(base_eval, results / "sweeps" / "bench" / "base")
    argv = [
        sys.executable,
        "-m",
        "spellxfer",
        "sweep",
        "--space",
        str(space_path),
        "--study",
        "bench",
        "--results_dir",
        str(results),
        "--workers",
        str(mode["workers"]),
    ]
    if mode["pack"] is not None:
        argv += [
            "--pack",
            str(mode["pack"]),
            "--pack_kernel",
            mode["kernel"],
            "--pack_window",
            str(mode["window"]).lower(),
            "--pack_scorers",
            str(pack_scorers),
        ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    print(f"bench sweep: {mode['spec']} ({trials} trials) …", flush=True)
    log = work / f"{slug}.log"
    t0 = time.perf_counter()
    with MemoryPoll() as memory, open(log, "w") as f:
        rc = subprocess.run(
            argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        ).returncode
    makespan = time.perf_counter() - t0
    rows = _csv(results / "metrics" / "bench.csv")
    done = [r for r in rows if r["status"] == "complete"]
    all_ran = trials > 0 and len(done) == trials
    out = {
        **{k: mode[k] for k in ("spec", "mode", "workers", "pack", "kernel", "window")},
        "trials": trials,
        "pack_scorers": pack_scorers if mode["pack"] is not None else None,
        "exit_code": rc,
        "makespan_s": round(makespan, 1),
        "complete": len(done),
        "failed": sum(r["status"] == "failed" for r in rows),
        # a mode where a trial failed measured a different amount of work: no throughput for it
        "makespan_s_for_all": round(makespan * n_trials / trials, 1) if all_ran else None,
        "trials_per_gpu_hour": round(trials / (makespan / 3600), 2) if all_ran and makespan else None,
        "errors": sorted({r["error"] for r in rows if r.get("error")})[:5],
        "log": str(log),
    }
    if cuda:
        out["peak_memory_gib"] = round(max(memory.peak_mib.values(), default=0) / 1024, 1)
    else:
        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
    evaluation = evaluation_seconds(results / "sweeps" / "bench")
    if evaluation:
        out["evaluation_seconds"] = evaluation
    stats = [json.loads(p.read_text()) for p in (results / "sweeps" / "bench" / "pack-stats").glob("*.json")]
    if stats:
        out["pack_stats"] = stats
    if rc != 0:
        out["log_tail"] = log.read_text(errors="replace")[-2000:]
    return out


def evaluation_seconds(study: Path) -> dict | None:
    """Where the mode's test evaluations spent their time, summed over its trials' ``eval/*/
    metrics.json`` (``evaluate``'s own record): the whole calls, loading the model and adapter
    (the longest one, and how many calls found the base model kept by a pack's earlier call),
    generation and the likelihood probe. A packed evaluation's passes are shared by its group, so
    each of its trials carries the group's seconds. None where no trial was evaluated."""
    runs = [json.loads(p.read_text())["run"] for p in sorted(study.glob("trial-*/eval/*/metrics.json"))]
    if not runs:
        return None

    def total(get) -> float:
        return round(sum(get(r) or 0.0 for r in runs), 1)

    return {
        "evaluations": len(runs),
        "wall_s": total(lambda r: r.get("wall_seconds")),
        "load_s": total(lambda r: r.get("load_seconds")),
        "load_s_max": round(max(r.get("load_seconds") or 0.0 for r in runs), 1),
        "kept_base_model": sum(bool(r.get("kept_base_model")) for r in runs),
        "generate_s": total(lambda r: r.get("seconds")),
        "probe_s": total(lambda r: (r.get("likelihood") or {}).get("seconds")),
    }


def _csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def kernel_bench(model: str, params: list[dict], steps: int, device: torch.device, seed: int) -> list[dict]:
    """One packed forward + backward of these trials' micro-batches per kernel: ms/step, agreement."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = load_model(model, dtype=dtype, device=device, seed=seed).train()
    for p in base.parameters():
        p.requires_grad_(False)
    packed = PackedLoRA(base)
    groups, rows = [], 0
    for i, p in enumerate(params):
        hp = SimpleNamespace(
            lora_r=p["lora_r"], lora_alpha=p["lora_alpha"], lora_dropout=0.0, target_modules=ALL_LINEAR
        )
        packed.add(f"t{i:04d}", lora_config(hp), seed + i)
        groups.append((f"t{i:04d}", p["batch_size"]))
        rows += p["batch_size"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, base.config.vocab_size - 1, (rows, 40), generator=g).to(device)
    labels = ids.clone()
    labels[:, :28] = -100  # ~30% of a spelling row is its answer
    decoder, head = decoder_and_head(packed.model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    results, reference = [], None
    for kernel in KERNELS:
        packed.kernel = kernel
        try:
            times, losses = [], None
            for step in range(steps + 2):  # two untimed steps: autotuning, allocator growth
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    if step == 2:
                        torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                with packed.rows(groups), autocast:
                    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
                    per, start = [], 0
                    for _, n in groups:
                        per.append(
                            completion_loss_from_hidden(
                                hidden[start : start + n], head.weight, labels[start : start + n]
                            )
                        )
                        start += n
                    sum(per).backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                losses = [x.item() for x in per]
                for p_ in packed.lm.parameters():
                    p_.grad = None
            reference = reference or losses
            ms = sum(times[2:]) / steps * 1000
            results.append(
                {
                    "kernel": kernel,
                    "trials": len(params),
                    "rows": rows,
                    "ms_per_step": round(ms, 2),
                    "tokens_per_second": round(rows * 40 / (ms / 1000)),
                    "max_loss_diff_vs_loop": max(abs(a - b) for a, b in zip(losses, reference)),
                    "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                    if device.type == "cuda"
                    else None,
                }
            )
        except Exception as e:  # e.g. a grouped GEMM this card or build lacks: reported, not fatal
            results.append(
                {"kernel": kernel, "failed": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            )
    return results


def bench_sweep(
    model: str = "tiny-qwen3",
    trials: int = 4,
    max_steps: int = 20,
    validate_every_steps: int = 10,
    val_limit: int = 8,
    eval_limit: int = 8,
    modes: list[str] = ["serial", "pack:4"],  # noqa: B006  (jsonargparse needs a literal default)
    space: str = "configs/sweeps/seed_grid.yaml",
    base: str | None = None,
    data_dir: str = "results/data/full",
    gradient_checkpointing: Literal["auto", "true", "false"] = "auto",
    kernel_steps: int = 5,
    pack_scorers: int = 0,
    seed: int = 0,
    out: str | None = None,
    append: bool = False,
    work_dir: str | None = None,
) -> int:
    """Sweep makespan: the same trials one at a time, by --workers W, and packed --pack K (one card).

    Prints and writes (default results/bench/<card>-<date>/sweep-<model>.json) each mode's
    makespan, trials per GPU-hour and peak memory, and each packed LoRA kernel's step time, with
    the card, versions, commit and command. Trained on spelling, evaluated on position and count only.

    Args:
        model: qwen3-4b-shape or smollm2-135m on a GPU; tiny-qwen3 on a CPU.
        trials: N, the trials every mode runs (the sampler's draws 0 … N-1).
        max_steps: Optimizer steps of every trial.
        validate_every_steps: Validation interval in optimizer steps.
        val_limit: Position and count questions per validation (each).
        eval_limit: Position and count test questions per trial (each), greedy.
        modes: serial, workers:W, pack:K[:loop|concat|grouped][:window], each optionally @n (first n trials).
        space: The space file whose hyperparameters are drawn (its max_steps is replaced by --max_steps).
        base: The fit config every trial starts from (default configs/r16.yaml on CUDA,
            configs/tiny.yaml on a CPU).
        data_dir: A data build directory (built with the full profile if absent).
        gradient_checkpointing: true, false, or auto (on for packs, off otherwise).
        kernel_steps: Timed steps per kernel in the kernel comparison (0: skip it).
        pack_scorers: Evaluate processes that score a pack's finished trials beside it
            (``sweep --pack_scorers``; 0: the pack scores them itself).
        seed: The sampler's seed (which trials are drawn) and the model's.
        out: JSON output path.
        append: Merge into an existing JSON at the output path (a mode measured again replaces its entry).
        work_dir: Where the modes' sweeps run (default: a temporary directory, removed afterwards).
    """
    check_model_name(model)
    refuse_gpu_model_on_cpu("sweep", model)
    parsed = [parse_mode(m) for m in modes]
    for name, value in (
        ("trials", trials),
        ("max_steps", max_steps),
        ("validate_every_steps", validate_every_steps),
        ("val_limit", val_limit),
        ("eval_limit", eval_limit),
    ):
        if value < 1:
            raise SpellxferError(f"bench sweep: --{name} must be ≥ 1, got {value}")
    if kernel_steps < 0:
        raise SpellxferError(f"bench sweep: --kernel_steps must be ≥ 0, got {kernel_steps}")
    if pack_scorers < 0:
        raise SpellxferError(f"bench sweep: --pack_scorers must be ≥ 0, got {pack_scorers}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    base = str(config_path(base or ("configs/r16.yaml" if cuda else "configs/tiny.yaml")))
    space = str(config_path(space))
    gc = {"true": True, "false": False}.get(gradient_checkpointing, "auto")
    spec = bench_space(
        space,
        base,
        model,
        trials,
        max_steps,
        validate_every_steps,
        val_limit,
        eval_limit,
        data_dir,
        gc,
        seed,
        cuda,
    )
    out_path = Path(out) if out else bench_dir(device) / f"sweep-{model}.json"
    command = command_line(
        ["bench", "sweep"],
        model=model,
        trials=trials,
        max_steps=max_steps,
        validate_every_steps=validate_every_steps,
        val_limit=val_limit,
        eval_limit=eval_limit,
        modes=modes,
        space=space,
        base=base,
        data_dir=data_dir,
        gradient_checkpointing=gradient_checkpointing,
        kernel_steps=kernel_steps,
        pack_scorers=pack_scorers or None,
        seed=seed,
        out=out,
        append=append or None,
    )
    # an appended file's modes as they were before this invocation (its own partial writes replace
    # them, so they are read once)
    previous = json.loads(out_path.read_text()) if append and out_path.is_file() else None

    def report_of(results: list[dict], kernels: list[dict]) -> dict:
        report = {
            "kind": "sweep",
            "model": model,
            "date": time.strftime("%Y-%m-%d"),
            **run_environment(device),
            "command": command,
            "settings": {k: v for k, v in spec.items() if k != "parameters"},
            "trials": draws,
            "modes": results,
            "kernels": kernels,
        }
        if previous is not None:
            specs = {r["spec"] for r in results}
            report["modes"] = [r for r in previous.get("modes", []) if r["spec"] not in specs] + results
            report["commands"] = [*previous.get("commands", [previous.get("command")]), command]
            report["kernels"] = kernels or previous.get("kernels", [])
        report["summary"] = summarise(report["modes"])
        return report

    tmp = tempfile.TemporaryDirectory(prefix="spellxfer-bench-sweep-") if work_dir is None else None
    work = Path(work_dir) if work_dir else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        space_path = work / "space.yaml"
        space_path.write_text(
            yaml.safe_dump(
                {**spec, "fixed": {**spec["fixed"], "model.gradient_checkpointing": False}}, sort_keys=False
            )
        )
        loaded = load_space(space_path)
        # the trials every mode runs: the random sampler's draws for trial numbers 0 … N-1
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        draw = optuna.create_study(direction="maximize", sampler=make_sampler(loaded, "random"))
        draws = []
        for _ in range(trials):
            t = draw.ask()
            draws.append({"number": t.number, "params": loaded.suggest(t)})
            draw.tell(t, 0.0)
        model_name, data = base_settings(loaded)
        print(f"bench sweep: preparing the data and the base model's evaluation in {work} …", flush=True)
        prepare_data_and_base(loaded, model_name, data, work / "base-study", Console(quiet=True))
        results = []
        for m in parsed:  # the JSON after every mode, so a run cut short keeps the modes it finished
            results.append(run_mode(m, spec, work, work / "base-study" / "base", trials, cuda, pack_scorers))
            if len(results) < len(parsed):
                pending = [m["spec"] for m in parsed[len(results) :]]
                write_report({**report_of(results, []), "pending_modes": pending}, out_path)
        biggest = max((m["pack"] for m in parsed if m["pack"]), default=min(trials, 4))
        kernels = (
            kernel_bench(model, [d["params"] for d in draws[:biggest]], kernel_steps, device, seed)
            if kernel_steps
            else []
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
    print_report(write_report(report_of(results, kernels), out_path))
    print(f"wrote {out_path}")
    return 0


def write_report(report: dict, out_path: Path) -> dict:
    """Write ``report`` as JSON to ``out_path`` (atomically); returns it."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_path) as f:
        json.dump(report, f, indent=2, default=str)
    return report


def summarise(modes: list[dict]) -> dict:
    """Speed-ups of the best pack over serial and over the best workers setting, against
    :data:`TARGETS`."""

    def span(m):  # the makespan of all N trials (scaled from a sample when the mode ran fewer)
        return m["makespan_s_for_all"] if m["complete"] else None

    ok = [m for m in modes if span(m)]
    best = {
        kind: min((m for m in ok if m["mode"] == kind), key=span, default=None)
        for kind in ("serial", "workers", "pack")
    }
    out: dict = {"best": {k: (v["spec"] if v else None) for k, v in best.items()}, "targets": TARGETS}
    if best["pack"] and best["serial"]:
        out["pack_vs_serial"] = round(span(best["serial"]) / span(best["pack"]), 2)
        out["pack_vs_serial_met"] = out["pack_vs_serial"] >= TARGETS["pack_vs_serial"]
    if best["pack"] and best["workers"]:
        out["pack_vs_best_workers"] = round(span(best["workers"]) / span(best["pack"]), 2)
        out["pack_vs_best_workers_met"] = out["pack_vs_best_workers"] >= TARGETS["pack_vs_best_workers"]
    if best["pack"] and best["pack"].get("peak_memory_gib") is not None:
        out["pack_peak_gib_met"] = best["pack"]["peak_memory_gib"] <= TARGETS["pack_peak_gib"]
    return out


def print_report(report: dict) -> None:
    table = Table(title=f"bench sweep: {report['model']} on {report['device']} ({report['date']})")
    for col in ("mode", "trials", "complete", "makespan s", "for all N", "trials / GPU-h", "peak GiB"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    for m in report["modes"]:
        peak = m.get("peak_memory_gib", m.get("peak_rss_gib"))
        table.add_row(
            m["spec"],
            str(m["trials"]),
            str(m["complete"]),
            f"{m['makespan_s']:.0f}",
            f"{m['makespan_s_for_all']:.0f}" if m["makespan_s_for_all"] else "–",
            f"{m['trials_per_gpu_hour']:.1f}" if m["trials_per_gpu_hour"] else "–",
            "–" if peak is None else f"{peak:.1f}",
        )
    console = Console(width=None if sys.stdout.isatty() else 160)  # whole rows in a log file
    print_table(table, console)
    if report["kernels"]:
        kt = Table(title="packed LoRA kernels: one forward + backward of the first K trials' micro-batches")
        for col in ("kernel", "trials", "rows", "ms / step", "tokens/s", "max |Δ loss| vs loop", "peak GiB"):
            kt.add_column(col, justify="right" if col != "kernel" else "left")
        for k in report["kernels"]:
            if "failed" in k:
                kt.add_row(k["kernel"], "", "", "failed", k["failed"][:60], "", "")
                continue
            kt.add_row(
                k["kernel"],
                str(k["trials"]),
                str(k["rows"]),
                f"{k['ms_per_step']:.1f}",
                f"{k['tokens_per_second']:,}",
                f"{k['max_loss_diff_vs_loop']:.2g}",
                "–" if k["peak_memory_gib"] is None else f"{k['peak_memory_gib']:.1f}",
            )
        print_table(kt, console)
    console.print(f"summary: {json.dumps(report['summary'])}")
