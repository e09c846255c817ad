"""``spellxfer bench eval``: questions per second of the generation engine, beside ``generate``.

Every variant runs :class:`~spellxfer.models.generation.GenerationEngine` in one process, on
the same card and the same position and count questions (the data build's test files,
interleaved), with the same sampling settings (the ``Sampling`` defaults unless ``--decoding greedy``)
and the same reply cap:

* ``reference`` — ``reference=True``: transformers' ``model.generate``, batch ``reference_batch_size``;
* ``spellxfer`` — the engine's own loop, batch ``batch_size``. ``engine=`` picks its decoder:
  ``graph`` (static KV cache, CUDA-graph decode steps: the default on a GPU), ``static`` (the same
  cache, steps run op by op) or ``eager`` (the previous loop: a dynamic cache, eager steps);
* ``validation`` — a real Lightning ``Trainer.validate`` of a LoRA-wrapped model (hf backend) at a
  training config's validation settings (``config=``, default ``configs/r16.yaml``: greedy, its
  ``val_max_new_tokens``, ``val_limit`` position + count questions, ``eval_batch_size``), timed
  over the validation epoch; run twice, the second is reported (the first loads the model).

A variant carries overrides as ``NAME:key=value,…``: ``batch_size`` (an integer or ``auto``),
``engine``, ``decoding``, ``max_new_tokens`` for ``spellxfer``; ``batch_size`` for ``reference``;
``config``, ``engine``, ``batch_size``, ``val_limit`` for ``validation``. Graph variants run the
questions once untimed first, so every batch shape is captured before the clock starts (the
capture cost is reported as ``first_pass_seconds``).

Random-weight models never end a turn, so every reply runs to ``max_new_tokens`` (12 by default:
a letter or number, the end-of-turn token, and room for a short sentence) — the work a trained
model does at most. MFU counts ``2 × N_body`` FLOPs per prompt and generated token plus
``2 × vocab × hidden`` per generated token. The JSON records the card, the package versions, the
git commit and the command that reproduces the run.
"""

from __future__ import annotations

import functools
import gc
import json
import time
import traceback
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from spellxfer.bench.train import (
    H100_BF16_PEAK,
    _print_table,
    _sync,
    bench_dir,
    command_line,
    flops_per_token,
    matmul_rate,
    profile_table,
    refuse_gpu_model_on_cpu,
    run_environment,
)
from spellxfer.core.configs import config_path
from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import atomic_file
from spellxfer.data.build import build
from spellxfer.models.generation import GenerationEngine, default_sampling
from spellxfer.models.registry import apply_fused_kernels, check_model_name, load_model, load_tokenizer
from spellxfer.tasks.chat import format_prompt
from spellxfer.training.datamodule import SpellingDataModule
from spellxfer.training.module import SpellingLoRAModule

VARIANT_KEYS = {
    "reference": {"batch_size"},
    "spellxfer": {"batch_size", "engine", "decoding", "max_new_tokens"},
    "validation": {"config", "engine", "batch_size", "val_limit"},
}
ENGINES = ("auto", "graph", "static", "eager")


def parse_eval_variant(spec: str) -> tuple[str, dict]:
    """A ``--variants`` entry parsed: ``"spellxfer:engine=graph,batch_size=2048"`` →
    ``("spellxfer", {"engine": "graph", "batch_size": 2048})``."""
    name, _, rest = spec.partition(":")
    if name not in VARIANT_KEYS:
        raise SpellxferError(
            f"--variants: unknown variant {name!r} in {spec!r}; use {', '.join(VARIANT_KEYS)}[:key=value,…]"
        )
    out: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in VARIANT_KEYS[name]:
            raise SpellxferError(
                f"--variants: {spec!r}: {item!r} is not key=value with key in {sorted(VARIANT_KEYS[name])}"
            )
        ok = {
            "batch_size": value == "auto" or (value.isdigit() and int(value) >= 1),
            "max_new_tokens": value.isdigit() and int(value) >= 1,
            "val_limit": value.isdigit() and int(value) >= 1,
            "engine": value in ENGINES,
            "decoding": value in ("sampled", "greedy"),
            "config": bool(value),
        }[key]
        if not ok:
            raise SpellxferError(f"--variants: {spec!r}: {item!r} has an invalid value")
        out[key] = int(value) if value.isdigit() else value
    return name, out


def bench_eval(
    model: str = "tiny-qwen3",
    data_dir: str = "results/data/full",
    variants: list[str] = ["reference", "spellxfer"],  # noqa: B006  (jsonargparse needs a literal default)
    n_questions: int = 2048,
    batch_size: int = 1024,
    reference_batch_size: int = 256,
    max_new_tokens: int = 12,
    decoding: str = "sampled",
    profile: bool = False,
    out: str | None = None,
) -> int:
    """Evaluation throughput: transformers' generate beside spellxfer's engines, one card, one run.

    Prints questions/s, generated tokens/s, MFU, peak GPU memory and each variant's ratio to the
    first; writes JSON (default results/bench/<card>-<date>/eval-<model>.json) with the card,
    versions, commit and command. Position and count questions only.

    Args:
        model: qwen3-4b-shape on a GPU, tiny-qwen3 or smollm2-135m on a CPU.
        data_dir: A ``data build`` directory (its position / count test and validation files;
            built with ``--profile full`` if absent).
        variants: ``reference``, ``spellxfer`` or ``validation``, each optionally ``:key=value,…``
            (``spellxfer:engine=graph,batch_size=2048``; see docs/performance.md).
        n_questions: Questions per reference / spellxfer variant (position and count alternating).
        batch_size: Prompts per batch for spellxfer variants without their own ``batch_size``.
        reference_batch_size: Prompts per batch for the reference.
        max_new_tokens: Reply cap in tokens (spellxfer variants may override it).
        decoding: sampled (T 0.6, top-p 0.95, top-k 20, min-p 0) or greedy.
        profile: Also profile one batch of each spellxfer variant and print its costliest operations.
        out: JSON output path.
    """
    check_model_name(model)
    refuse_gpu_model_on_cpu("eval", model)
    specs = [(v, *parse_eval_variant(v)) for v in variants]
    if n_questions < 1 or batch_size < 1 or reference_batch_size < 1 or max_new_tokens < 1:
        raise SpellxferError(
            "bench eval: --n_questions, --batch_size, --reference_batch_size, --max_new_tokens must be ≥ 1"
        )
    if decoding not in ("sampled", "greedy"):
        raise SpellxferError(f"bench eval: --decoding must be sampled or greedy, got {decoding!r}")
    for _, name, o in specs:
        if name == "validation":
            _validation_config(o.get("config", "configs/r16.yaml"))  # a bad path fails before any model loads
    command = command_line(
        ["bench", "eval"],
        model=model,
        data_dir=data_dir,
        variants=variants,
        n_questions=n_questions,
        batch_size=batch_size,
        reference_batch_size=reference_batch_size,
        max_new_tokens=max_new_tokens,
        decoding=decoding,
        profile=profile,
        out=out,
    )
    data = Path(data_dir)
    if not (data / "position_test.jsonl").is_file():
        build(str(data), profile="full", seed=0)
    rows = [
        [json.loads(line) for line in open(data / f"{t}_test.jsonl", encoding="utf-8")]
        for t in ("position", "count")
    ]
    qs = [r["question"] for pair in zip(*rows) for r in pair][:n_questions]
    if len(qs) < n_questions:
        raise SpellxferError(f"bench eval: {data} holds only {len(qs)} questions; lower --n_questions")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rate = matmul_rate(device)
    bench = _EvalBench(
        model, device, qs, decoding, max_new_tokens, batch_size, reference_batch_size, profile, rate
    )
    environment = run_environment(device)
    out_path = Path(out) if out else bench_dir(device) / f"eval-{model}.json"
    results = []
    for spec, name, o in specs:
        print(f"bench eval: {spec} …", flush=True)
        try:
            r = bench.validation(o, data) if name == "validation" else bench.engine_variant(name, o)
        except (
            torch.OutOfMemoryError
        ) as e:  # a finding, not a crash: the table says which setting does not fit
            r = {"failed": "out of memory: " + str(e).splitlines()[0]}
        except SpellxferError:
            raise
        except Exception as e:  # e.g. a kernel that fails to build or capture: record it, measure the rest
            traceback.print_exc()
            r = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        if "failed" in r:
            print(f"bench eval: {spec} failed: {r['failed']}", flush=True)
            r.update(
                questions_per_second=0.0,
                mfu_vs_matmul=0.0,
                mfu_vs_peak=None,
                peak_gib=None,
                batch_size=o.get("batch_size"),
            )
        results.append({"variant": spec, **r})
        base = results[0]["questions_per_second"] or float("nan")
        for r in results:
            r["ratio_to_first"] = r["questions_per_second"] / base
        r = results[-1]
        print(
            f"bench eval: {spec}: {r['questions_per_second']:,.1f} questions/s "
            f"at batch {r.get('batch_size')}, "
            f"phases {r.get('one_batch_phases_seconds')}",
            flush=True,
        )
        # after every variant, so a run cut short (a time limit on a lent GPU) keeps what it measured
        report = {
            "kind": "eval",
            "model": model,
            "date": time.strftime("%Y-%m-%d"),
            **environment,
            "command": command,
            "sampling": vars(bench.sampling()),
            "matmul_flops_per_second": rate,
            "complete": len(results) == len(specs),
            "results": results,
        }
        _write_json(out_path, report)
    _print_table(report, "questions/s", "questions_per_second")
    print(f"wrote {out_path}")
    return 0


def _write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        json.dump(report, f, indent=2, default=str)


def _validation_config(path: str) -> dict:
    p = config_path(path)  # configs/… is the shipped file where no such path exists here
    try:
        cfg = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SpellxferError(f"--variants validation:config={path}: cannot read it ({e})") from None
    if not isinstance(cfg, dict):
        raise SpellxferError(f"--variants validation:config={path}: not a training config (a YAML mapping)")
    return cfg


class _EvalBench:
    """One model and tokenizer shared by the reference and spellxfer variants (loaded on first use)."""

    def __init__(
        self, model, device, qs, decoding, max_new_tokens, batch_size, reference_batch_size, profile, rate
    ):
        self.name, self.device, self.qs, self.decoding = model, device, qs, decoding
        self.max_new_tokens, self.batch_size, self.reference_batch_size = (
            max_new_tokens,
            batch_size,
            reference_batch_size,
        )
        self.profile, self.rate = profile, rate
        self.lm = self.tok = None
        self.kernels = "none"

    def sampling(self, **overrides):
        return default_sampling(
            **{"decoding": self.decoding, "max_new_tokens": self.max_new_tokens, **overrides}
        )

    def _load(self):
        if self.lm is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.lm = load_model(self.name, dtype=dtype, device=str(self.device))
            self.tok = load_tokenizer(self.name)
        return self.lm, self.tok

    def _useful_flops(self, config, prompt_tokens: int, new_tokens: int) -> float:
        body = flops_per_token(config, 0.0) / 2  # 2 × N_body: forward only
        return body * (prompt_tokens + new_tokens) + 2 * config.vocab_size * config.hidden_size * new_tokens

    def _rates(self, config, questions: int, seconds: float, prompt_tokens: int, new_tokens: int) -> dict:
        useful = self._useful_flops(config, prompt_tokens, new_tokens)
        cuda = self.device.type == "cuda"
        return {
            "questions": questions,
            "seconds": seconds,
            "questions_per_second": questions / seconds,
            "new_tokens": new_tokens,
            "new_tokens_per_second": new_tokens / seconds,
            "prompt_tokens": prompt_tokens,
            "mfu_vs_matmul": useful / seconds / self.rate,
            "mfu_vs_peak": useful / seconds / H100_BF16_PEAK if cuda else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        }

    def engine_variant(self, name: str, o: dict) -> dict:
        lm, tok = self._load()
        qs = self.qs
        reference = name == "reference"
        # the reference runs unpatched; spellxfer variants get the fused kernels `evaluate`
        # applies (Liger patches classes for good, so list the reference first)
        if not reference and self.kernels == "none":
            self.kernels = apply_fused_kernels(lm)
        bs = o.get("batch_size", self.reference_batch_size if reference else self.batch_size)
        sampling = self.sampling(**{k: o[k] for k in ("decoding", "max_new_tokens") if k in o})
        engine = GenerationEngine(
            lm, tok, sampling, batch_size=bs, reference=reference, decoder=o.get("engine", "auto")
        )
        prompt_tokens = sum(
            len(ids)
            for ids in tok([format_prompt(tok, q) for q in qs], add_special_tokens=False)["input_ids"]
        )
        path = engine.resolve_path(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        # warm-up (CUDA context, kernels, allocator); a graph variant sees every question once so
        # that each batch shape is captured before the clock starts
        engine.generate(qs if path == "graph" else qs[: min(engine.last_batch_size or 64, 64)])
        _sync(self.device)
        first = time.perf_counter() - t0
        engine.new_tokens = 0
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(self.device)
        t0 = time.perf_counter()
        engine.generate(qs)
        _sync(self.device)
        seconds = time.perf_counter() - t0
        resolved = engine.last_batch_size
        # again, split into phases (each boundary syncs the GPU, so only the split is reported)
        new_tokens, engine.new_tokens, engine.timings = engine.new_tokens, 0, {}
        engine.generate(qs[:resolved])
        phases = {k: round(v, 4) for k, v in engine.timings.items()}
        engine.timings = None
        if self.profile and not reference:
            table = profile_table(functools.partial(engine.generate, qs[:resolved]))
            print(f"--- profile of one batch of {name} {o}\n{table}", flush=True)
        r = {
            "batch_size": resolved,
            "engine": path,
            **self._rates(lm.config, len(qs), seconds, prompt_tokens, new_tokens),
            "first_pass_seconds": first if path == "graph" else None,
            "one_batch_phases_seconds": phases,
            "kernels": "none" if reference else self.kernels,
            "sampling": vars(sampling),
        }
        engine.release()
        del engine
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return r

    def validation(self, o: dict, data: Path) -> dict:
        """``Trainer.validate`` at a config's validation settings, LoRA-wrapped, hf backend."""
        config_path = o.get("config", "configs/r16.yaml")
        cfg = _validation_config(config_path)
        m, d, t = cfg.get("model") or {}, cfg.get("data") or {}, cfg.get("trainer") or {}
        # free the shared model first: the module loads its own copy
        self.lm = self.tok = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        module = SpellingLoRAModule(
            model=self.name,
            backend="hf",
            lora_r=m.get("lora_r", 16),
            lora_alpha=m.get("lora_alpha", 32),
            lora_dropout=m.get("lora_dropout", 0.0),
            val_decoding=m.get("val_decoding", "greedy"),
            val_max_new_tokens=m.get("val_max_new_tokens", 16),
            seed=cfg.get("seed_everything", 0),
        )
        module.generation_decoder = o.get("engine", "auto")
        eval_batch_size = o.get("batch_size", d.get("eval_batch_size", "auto"))
        val_limit = o.get("val_limit", d.get("val_limit"))  # None: the DataModule's default, every question
        dm = SpellingDataModule(
            str(data), self.name, build_profile=None, eval_batch_size=eval_batch_size, val_limit=val_limit
        )
        cuda = self.device.type == "cuda"
        timer = _EpochTimer(self.device)
        trainer = L.Trainer(
            accelerator="gpu" if cuda else "cpu",
            devices=1,
            precision=t.get("precision", "bf16-mixed") if cuda else "32-true",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        trainer.validate(module, datamodule=dm, verbose=False)  # loads the model; captures graphs
        first = timer.seconds
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        module._generation_engine.new_tokens = 0
        module._generation_engine.paths.clear()
        trainer.validate(module, datamodule=dm, verbose=False)
        engine = module._generation_engine
        qs = [it.question for task in ("position", "count") for it in dm.eval_items["val"][task]]
        tok = module.tokenizer
        prompt_tokens = sum(
            len(ids)
            for ids in tok([format_prompt(tok, q) for q in qs], add_special_tokens=False)["input_ids"]
        )
        r = {
            "batch_size": engine.last_batch_size,
            "eval_batch_size": eval_batch_size,
            "engine": dict(engine.paths),
            **self._rates(module.lm.config, len(qs), timer.seconds, prompt_tokens, engine.new_tokens),
            "first_pass_seconds": first,
            "config": config_path,
            "kernels": module.kernels_applied,
            "sampling": vars(engine.sampling),
            "lora_r": module.hparams.lora_r,
        }
        del trainer, module, dm, engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return r


class _EpochTimer(Callback):
    """Seconds of the last validation epoch, the GPU synchronised at both ends."""

    def __init__(self, device):
        self.device, self.seconds, self._t0 = device, 0.0, 0.0

    def on_validation_epoch_start(self, trainer, pl_module):
        _sync(self.device)
        self._t0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        _sync(self.device)
        self.seconds = time.perf_counter() - self._t0
