"""The one generation engine: batches of chat prompts → raw replies.

Used by ``evaluate``, by the Lightning validation / test steps and by the API server, so one code
path produces every reply that spellxfer scores or serves. Prompts come from
:func:`~spellxfer.training.qwen3_utils.format_prompt` / ``format_chat`` (Qwen3: always non-thinking),
tokenized by :func:`~spellxfer.training.qwen3_utils.chat_token_ids` (message content as plain
text, never control tokens). Batches are left-padded and bucketed by prompt length (sorted, so a
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
from spellxfer.evaluation.attention import grouped_decode_attention
from spellxfer.training.qwen3_utils import chat_token_ids, end_of_turn_ids

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


def next_token_probs(logits: torch.Tensor, s: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling distribution over each row's candidate tokens: ``(probs, token_ids)``.

    Same distribution as transformers' warpers in their order (temperature → top-k → top-p →
    min-p), computed on the top-k candidates only: ``topk`` picks ``k`` of the 151,936 logits
    without sorting the vocabulary, temperature is monotonic so it commutes with the selection,
    and top-p / min-p then work on ``k`` sorted values instead of a full-vocabulary sort per step.
    A token is kept by top-p when the probability mass strictly before it (in descending order)
    is below ``top_p`` — transformers' rule "drop while the ascending tail mass ≤ 1 − top_p",
    restated — so the most likely token always survives. Ties at the k-th logit: transformers
    keeps every tied token, this keeps exactly ``k`` (measure-zero with real logits).

    Args:
        logits: ``[batch, vocab]`` next-token logits (any float dtype; probabilities in float32).
        s: sampled decoding settings.

    Returns:
        ``probs`` ``[batch, k]`` (rows sum to 1, zeros for dropped candidates) and the candidates'
        vocabulary ids ``[batch, k]``, most likely first.
    """
    k = s.top_k if 0 < s.top_k < logits.shape[-1] else logits.shape[-1]
    # topk before the float32 upcast: bf16 logits upcast exactly, so the selection is the same
    # and only k values per row are converted, not 151,936.
    values, ids = logits.topk(k, dim=-1)  # sorted, descending
    probs = (values.float() / s.temperature).softmax(-1)
    if s.top_p < 1.0:
        mass_before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(mass_before >= s.top_p, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if s.min_p > 0:
        probs = probs.masked_fill(probs < s.min_p * probs[:, :1], 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs, ids


def pick_next_tokens(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """One token per row: argmax for greedy decoding, else a draw from :func:`next_token_probs`
    (with the global torch RNG, which :class:`GenerationEngine` seeds per batch)."""
    if s.decoding == "greedy":
        return logits.argmax(-1)
    probs, ids = next_token_probs(logits, s)
    return ids.gather(-1, torch.multinomial(probs, 1)).squeeze(-1)


class GenerationEngine:
    """Generate ``samples`` replies for each question with a causal LM and its tokenizer.

    Two implementations of one decoding, chosen by ``reference``:

    * ``False`` (default, the fast path): a decode loop written here — prefill with only the last
      position's logits, a KV cache, :func:`pick_next_tokens` (top-k before top-p, so no
      full-vocabulary sort per step), and a check for "every row has ended" only every
      :attr:`EXIT_CHECK_EVERY` steps, so the GPU is not stalled by a host sync each token.
    * ``True``: ``model.generate`` from transformers, kept as the reference the fast path is
      tested against (greedy replies identical; sampled distributions equal) and benchmarked
      against (``spellxfer bench eval``).

    Both left-pad, feed the same position ids (``cumsum(mask) − 1``) and stop a row at its first
    end-of-turn token.
    """

    EXIT_CHECK_EVERY = 4
    """Decode steps between checks whether all rows have ended (each check syncs with the GPU)."""

    def __init__(self, model, tokenizer, sampling: Sampling | None = None, batch_size: int = 32,
                 reference: bool = False):  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling or default_sampling()
        self.batch_size = batch_size
        self.reference = reference
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        tokenizer.padding_side = "left"
        self.new_tokens = 0
        """Tokens generated so far, padding after a row's end excluded (for throughput reports)."""
        self.timings: dict[str, float] | None = None
        """Set to ``{}`` to collect seconds spent in ``prompts`` (formatting, tokenizing),
        ``prefill`` and ``decode`` (synchronising the GPU at each boundary: for benchmarks only)."""

    @torch.inference_mode()
    def generate(self, questions: Sequence[str], progress=None) -> list[list[str]]:
        """Replies per question (``samples`` each), decoded without the prompt, in input order.

        ``progress`` is an optional callable ``(n_questions_done) -> None`` for progress bars.
        """
        self._lap(None)
        ids = chat_token_ids(self.tokenizer, [[{"role": "user", "content": q}] for q in questions])
        self._lap("prompts")
        return self.generate_ids(ids, progress)

    def generate_chats(self, conversations: Sequence[list[dict[str, str]]]) -> list[list[str]]:
        """Replies to whole conversations (the API's chat requests), in input order."""
        return self.generate_ids(chat_token_ids(self.tokenizer, conversations))

    def generate_prompts(self, prompts: Sequence[str], progress=None) -> list[list[str]]:
        """Replies to already rendered prompts (``samples`` each), in input order. The text is
        trusted: control tokens in it are control tokens (use :meth:`generate_chats` for content)."""
        return self.generate_ids(self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"], progress)

    @torch.inference_mode()
    def generate_ids(self, prompts: Sequence[list[int]], progress=None) -> list[list[str]]:
        """Replies to tokenized prompts (``samples`` each), in input order."""
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
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

    def _generate_batch(self, prompts: list[list[int]], batch_index: int, device) -> list[str]:
        self._lap(None)
        enc = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(device)
        self._lap("prompts")
        # One seed per batch: same inputs, seed and batch size → same replies.
        torch.manual_seed(self.sampling.seed * 1_000_003 + batch_index)
        run = self._transformers_generate if self.reference else self._decode_loop
        out = run(enc["input_ids"], enc["attention_mask"])
        is_stop = torch.isin(out, torch.tensor(self.stop_ids, device=out.device))
        self.new_tokens += int((is_stop.cumsum(1) - is_stop.long() == 0).sum())  # up to each row's end
        texts = [self._decode(tokens) for tokens in out.tolist()]
        self._lap("decode" if self.reference else "finish")
        return texts

    def _lap(self, name: str | None) -> None:
        """Benchmark timing (see :attr:`timings`): charge the time since the last lap to ``name``."""
        if self.timings is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if name is not None:
            self.timings[name] = self.timings.get(name, 0.0) + now - self._t
        self._t = now

    def _transformers_generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=s.max_new_tokens,
            num_return_sequences=s.samples,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            **s.generate_kwargs(),
        )
        return out[:, input_ids.shape[1] :]

    def _decode_loop(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """New tokens ``[rows × samples, ≤ max_new_tokens]``, pad after each row's end of turn."""
        from transformers import DynamicCache

        s = self.sampling
        if s.samples > 1:  # rows i*K … i*K+K-1 are question i's samples, as num_return_sequences
            input_ids = input_ids.repeat_interleave(s.samples, 0)
            attention_mask = attention_mask.repeat_interleave(s.samples, 0)
        # Left padding: real tokens are numbered from 0 (pads get 0 and are masked out anyway).
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        stop = torch.tensor(self.stop_ids, device=input_ids.device)
        ended = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        cache = DynamicCache(config=self.model.config)
        with grouped_decode_attention(self.model):
            new = self._steps(input_ids, attention_mask, position_ids, cache, ended, stop)
        out = torch.stack(new, dim=1)
        self._lap("decode")
        return out

    def _steps(self, ids, attention_mask, position_ids, cache, ended, stop) -> list[torch.Tensor]:
        """Prefill, then one token per step until ``max_new_tokens`` or every row has ended."""
        s, new = self.sampling, []
        for step in range(s.max_new_tokens):
            logits = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # fmt: skip
            if step == 0:
                self._lap("prefill")
            token = pick_next_tokens(logits, s).masked_fill(ended, self.pad_id)
            new.append(token)
            ended |= torch.isin(token, stop)
            if (step + 1) % self.EXIT_CHECK_EVERY == 0 and bool(ended.all()):
                break
            ids = token[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((ids.shape[0], 1))], dim=-1)
            position_ids = position_ids[:, -1:] + 1
        return new

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

