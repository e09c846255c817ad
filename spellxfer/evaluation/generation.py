"""The one generation engine: batches of chat prompts → raw replies.

Used by ``evaluate``, by the Lightning validation / test steps and by the API server, so one code
path produces every reply that spellxfer scores or serves. Prompts come from
:func:`~spellxfer.training.qwen3_utils.format_prompt` / ``format_chat`` (Qwen3: always non-thinking). Batches are left-padded and bucketed by prompt length (sorted, so a
batch holds prompts of similar length and pads little); generation stops at the end of the turn.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml

from spellxfer.errors import SpellxferError
from spellxfer.training.qwen3_utils import end_of_turn_ids, format_chat, format_prompt

QWEN3_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "models" / "qwen3_config.yaml"


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. Defaults are the user's (T 0.6, top-p 0.95, top-k 20, min-p 0);
    Qwen's published non-thinking recommendation is 0.7 / 0.8 / 20 / 0. Both are documented in
    ``configs/models/qwen3_config.yaml``, whose values a test pins to these."""

    decoding: Literal["sampled", "greedy"] = "sampled"
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    min_p: float = 0.0
    max_new_tokens: int = 32
    samples: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.decoding not in ("sampled", "greedy"):
            raise SpellxferError(f"decoding must be 'sampled' or 'greedy', got {self.decoding!r}")
        if self.decoding == "sampled" and not self.temperature > 0:
            raise SpellxferError(f"temperature must be > 0 for sampled decoding, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SpellxferError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or not 0 <= self.min_p < 1:
            raise SpellxferError(f"top_k must be ≥ 0 and min_p in [0, 1), got {self.top_k}, {self.min_p}")
        if self.max_new_tokens < 1 or self.samples < 1:
            raise SpellxferError(
                f"max_new_tokens and samples must be ≥ 1, got {self.max_new_tokens}, {self.samples}"
            )

    @classmethod
    def from_yaml(cls, path: str | Path = QWEN3_CONFIG, **overrides) -> Sampling:
        """Settings from a YAML file's ``sampling:`` block, then keyword overrides (None = keep)."""
        path = Path(path)
        try:
            block = yaml.safe_load(path.read_text())["sampling"]
        except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
            raise SpellxferError(f"{path}: cannot read a 'sampling:' block ({e})") from None
        unknown = set(block) - set(cls.__dataclass_fields__)
        if unknown:
            raise SpellxferError(f"{path}: unknown sampling key(s) {sorted(unknown)}")
        return cls(**{**block, **{k: v for k, v in overrides.items() if v is not None}})

    def generate_kwargs(self) -> dict:
        if self.decoding == "greedy":
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "min_p": None}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p or None,
        }


def default_sampling(**overrides) -> Sampling:
    """The configured defaults: qwen3_config.yaml when running from a checkout, else the dataclass."""
    if QWEN3_CONFIG.is_file():
        return Sampling.from_yaml(QWEN3_CONFIG, **overrides)
    return Sampling(**{k: v for k, v in overrides.items() if v is not None})


class GenerationEngine:
    """Generate ``samples`` replies for each question with a causal LM and its tokenizer."""

    def __init__(self, model, tokenizer, sampling: Sampling | None = None, batch_size: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling or default_sampling()
        self.batch_size = batch_size
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        tokenizer.padding_side = "left"

    @torch.inference_mode()
    def generate(self, questions: Sequence[str], progress=None) -> list[list[str]]:
        """Replies per question (``samples`` each), decoded without the prompt, in input order.

        ``progress`` is an optional callable ``(n_questions_done) -> None`` for progress bars.
        """
        return self.generate_prompts([format_prompt(self.tokenizer, q) for q in questions], progress)

    def generate_chats(self, conversations: Sequence[list[dict[str, str]]]) -> list[list[str]]:
        """Replies to whole conversations (the API's chat requests), in input order."""
        return self.generate_prompts([format_chat(self.tokenizer, c) for c in conversations])

    @torch.inference_mode()
    def generate_prompts(self, prompts: Sequence[str], progress=None) -> list[list[str]]:
        """Replies to already rendered prompts (``samples`` each), in input order."""
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
        replies: list[list[str]] = [[] for _ in prompts]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        # Sampling seeds its own RNG stream per batch; forking leaves the caller's RNG where it
        # was, so validation in the middle of a training run does not change the training run.
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for b, start in enumerate(range(0, len(order), self.batch_size)):
                    idx = order[start : start + self.batch_size]
                    for j, text in enumerate(self._generate_batch([prompts[i] for i in idx], b, device)):
                        replies[idx[j // self.sampling.samples]].append(text)
                    if progress is not None:
                        progress(len(idx))
        finally:
            self.model.train(was_training)
        return replies

    def _generate_batch(self, prompts: list[str], batch_index: int, device) -> list[str]:
        s = self.sampling
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        # One seed per batch: same inputs, seed and batch size → same replies.
        torch.manual_seed(s.seed * 1_000_003 + batch_index)
        out = self.model.generate(
            **enc,
            max_new_tokens=s.max_new_tokens,
            num_return_sequences=s.samples,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            **s.generate_kwargs(),
        )
        return [self._decode(tokens) for tokens in out[:, enc["input_ids"].shape[1] :].tolist()]

    def _decode(self, tokens: list[int]) -> str:
        """Raw reply text: everything generated up to and including the first end-of-turn token."""
        for k, t in enumerate(tokens):
            if t in self.stop_ids:
                tokens = tokens[: k + 1]
                break
        return self.tokenizer.decode(tokens, skip_special_tokens=False)


def timed_generate(engine: GenerationEngine, questions: Sequence[str], label: str = "generating"):
    """Run the engine under a rich progress bar (items/s); returns (replies, seconds)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    class Rate(TextColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return f"{speed:.1f} items/s" if speed else "– items/s"

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  Rate(""), TimeElapsedColumn(), transient=False) as bar:  # fmt: skip
        task = bar.add_task(label, total=len(questions))
        t0 = time.perf_counter()
        replies = engine.generate(questions, progress=lambda n: bar.advance(task, n))
        seconds = time.perf_counter() - t0
    return replies, seconds

