"""The one generation engine: batches of chat prompts → raw replies.

Used by ``evaluate``, by the Lightning validation / test steps and by the API server, so one code
path produces every reply that spellxfer scores or serves. Prompts come from
:func:`~spellxfer.tasks.chat.format_prompt` / ``format_chat`` (Qwen3: always non-thinking),
tokenized by :func:`~spellxfer.tasks.chat.chat_token_ids` (message content as plain
text, never control tokens). Batches are bucketed by prompt length (sorted, so a batch holds
prompts of similar length and pads little) and sized from free device memory by default;
generation stops at the end of the turn. On CUDA the decode step is a replayed CUDA graph over a
static KV cache (:mod:`spellxfer.models.static_decode`).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import DynamicCache

from spellxfer.core.errors import SpellxferError
from spellxfer.core.progress import PlainProgress, is_terminal
from spellxfer.models import static_decode
from spellxfer.models.attention import grouped_decode_attention
from spellxfer.tasks.chat import chat_token_ids, end_of_turn_ids


@dataclass(frozen=True)
class Sampling:
    """Decoding settings for every generation spellxfer does (evaluation, Lightning validation,
    the API); the one place their defaults are defined.

    The project's sampling defaults are temperature 0.6, top-p 0.95, top-k 20, min-p 0.
    Qwen's published recommendation for non-thinking mode is 0.7 / 0.8 / 20 / 0; pass
    ``--temperature 0.7 --top_p 0.8`` to use it. Qwen3 always runs in non-thinking mode: no
    setting here (or anywhere) turns thinking on.
    """

    decoding: Literal["sampled", "greedy"] = "sampled"  # greedy ignores the four knobs below
    temperature: float = 0.6  # < 1 sharpens the distribution (Qwen suggests 0.7)
    top_p: float = 0.95  # nucleus mass kept after top_k (Qwen suggests 0.8)
    top_k: int = 20  # candidates kept before top_p (Qwen suggests 20)
    min_p: float = 0.0  # drop tokens below min_p × p(top token); 0 disables (Qwen suggests 0)
    max_new_tokens: int = 32  # answers are one letter or number; 32 leaves room for a short sentence
    samples: int = 1  # replies per question (K); > 1 reports item-level bootstrap intervals
    seed: int = 0  # same seed, inputs and batch size → same replies

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

    def record(self) -> dict:
        """The settings as written to metrics.json: greedy decoding lists no temperature, top-p,
        top-k or min-p (they play no part in it)."""
        out = asdict(self)
        if self.decoding == "greedy":
            for key in ("temperature", "top_p", "top_k", "min_p"):
                del out[key]
        return out

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
    """The :class:`Sampling` defaults with keyword overrides (None = keep the default)."""
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


Decoder = Literal["auto", "graph", "static", "eager"]

CPU_BATCH_SIZE = 32
"""Questions per batch when ``batch_size="auto"`` on a CPU (throughput there barely grows past it)."""

AUTO_MAX_BATCH_SIZE = 2048
"""The most rows an auto-sized batch holds (docs/performance.md: 2,048 is where the decode step on
an H100 / H200 became compute-bound; larger batches only add memory)."""

AUTO_MEMORY_FRACTION = 0.8
"""Share of the free device memory an auto-sized batch may plan for (the rest: allocator
fragmentation, the captured graphs' pools, whatever else the process holds)."""


def generation_bytes_per_row(config, prompt_tokens: int, new_tokens: int, element_bytes: int = 2) -> int:
    """Device memory one generated row needs at the peak, in bytes: its static KV cache over the
    bucketed length, the largest prefill activations of one layer for its prompt tokens, and two
    vocabulary-wide logit rows (prefill's and the decode step's).

    Qwen3-4B, a 48-token prompt and 32 new tokens (a 96-slot cache): 14.2 MB of cache, 6.6 MB of
    prefill activations, 0.6 MB of logits: ~21 MB a row, so ~4,000 rows in 80 GiB.
    """
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    slots = static_decode.bucket_length(prompt_tokens + new_tokens)
    cache = 2 * config.num_hidden_layers * kv * slots * element_bytes
    # one layer at a time: residual, norm, q/k/v, attention and o outputs, MLP gate / up / product
    # in the compute dtype, plus the float32 temporaries of RMSNorm
    prefill = prompt_tokens * ((6 * h + 3 * i + 3 * q + 2 * kv) * element_bytes + 8 * h)
    logits = 2 * config.vocab_size * element_bytes
    return cache + prefill + logits


MEMORY_FRACTION_ENV = "SPELLXFER_CUDA_MEMORY_FRACTION"
"""The share of the card a process may allocate (a pack's ``--pack_scorers`` processes are given
theirs); :func:`auto_batch_size` sizes batches within it."""


def apply_memory_fraction(device: str | torch.device) -> float | None:
    """Cap this process's CUDA allocations at :data:`MEMORY_FRACTION_ENV` of ``device``'s memory
    when that variable is set (a value outside (0, 1] is a one-line error naming it); returns the
    share, or None where it is unset or ``device`` is not CUDA."""
    raw = os.environ.get(MEMORY_FRACTION_ENV)
    if raw is None or raw == "":
        return None
    try:
        share = float(raw)
    except ValueError:
        share = float("nan")
    if not 0 < share <= 1:
        raise SpellxferError(f"{MEMORY_FRACTION_ENV}={raw!r}: must be a share of the card in (0, 1]")
    device = torch.device(device)
    if device.type != "cuda":
        return None
    # an index: torch refuses a bare "cuda" here
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(share, index)
    return share


def auto_batch_size(model, prompt_tokens: int, new_tokens: int, samples: int = 1,
                    cap: int = AUTO_MAX_BATCH_SIZE) -> int:
    """Questions per generation batch chosen from free device memory, at most ``cap`` rows.

    On CUDA: :data:`AUTO_MEMORY_FRACTION` of the free memory (within this process's memory
    fraction, if one is set; plus what PyTorch's allocator holds unused) over
    :func:`generation_bytes_per_row` for the longest prompt, rounded down to a
    captured batch shape (so a full batch pads no rows), divided by ``samples`` (each question's
    samples are rows of one batch). On a CPU: :data:`CPU_BATCH_SIZE`.
    """
    param = next(model.parameters())
    if param.device.type != "cuda":
        return max(1, min(CPU_BATCH_SIZE, cap) // samples)
    free, total = torch.cuda.mem_get_info(param.device)
    reserved = torch.cuda.memory_reserved(param.device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:  # a process capped below the card (a pack beside its scoring processes)
        free = min(free, max(0, int(total * fraction(param.device)) - reserved))
    free += reserved - torch.cuda.memory_allocated(param.device)
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    element = 2 if param.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cuda") else 4
    per_row = generation_bytes_per_row(config, prompt_tokens, new_tokens, element)
    rows = min(cap, int(free * AUTO_MEMORY_FRACTION) // per_row)
    if rows >= 1 and static_decode.bucket_rows(rows) != rows:  # down to the largest captured shape that fits
        rows = 1 << (rows.bit_length() - 1) if rows < 256 else rows // 256 * 256
    return max(1, rows // samples)


class GenerationEngine:
    """Generate ``samples`` replies for each question with a causal LM and its tokenizer.

    Three implementations of one decoding:

    * ``decoder="graph"`` (what ``auto`` picks on CUDA): a preallocated KV cache, prefill through
      SDPA's fused causal kernel, and a decode step captured once per batch shape as a CUDA graph
      and replayed per token (:mod:`spellxfer.models.static_decode`);
    * ``decoder="static"`` (``auto`` on a CPU, and ``graph`` where CUDA is missing): the same
      cache and step, run op by op;
    * ``decoder="eager"`` (``auto`` for models the static path does not support): the previous
      loop — left padding, a ``DynamicCache`` grown every step.

    Unsloth-patched models always generate through their own ``model.generate``: Unsloth swaps in
    its inference kernels and KV cache there, and its patched attention cannot continue a
    transformers ``DynamicCache`` in a hand-written loop (a shape error at the first decode step,
    seen on an H200 on 2026-12-02, ``configs/r16.yaml``'s validation).

    All three share the rest: prefill keeps only the last position's logits,
    :func:`pick_next_tokens` (top-k before top-p, so no full-vocabulary sort per step), one seed
    per batch, and a check for "every row has ended" only every :attr:`EXIT_CHECK_EVERY` steps,
    so the GPU is not stalled by a host sync each token. Greedy replies are identical across the
    three and to ``generate`` (tests), and sampling consumes the RNG stream identically.

    ``reference=True`` runs ``model.generate`` from transformers instead, kept as the reference the
    fast paths are tested against and benchmarked against (``spellxfer bench eval``).

    ``batch_size="auto"`` sizes batches from free device memory (:func:`auto_batch_size`, at most
    ``max_batch_size``); an int fixes it. Batches hold prompts of similar length (sorted).
    """

    EXIT_CHECK_EVERY = 4
    """Decode steps between checks whether all rows have ended (each check syncs with the GPU)."""

    def __init__(self, model, tokenizer, sampling: Sampling | None = None, batch_size: int | str = "auto",
                 reference: bool = False, decoder: Decoder = "auto",
                 max_batch_size: int = AUTO_MAX_BATCH_SIZE):
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise SpellxferError(f"batch_size must be 'auto' or an integer ≥ 1, got {batch_size!r}")
        if decoder not in ("auto", "graph", "static", "eager"):
            raise SpellxferError(f"decoder must be auto, graph, static or eager, got {decoder!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling or default_sampling()
        self.batch_size = batch_size
        self.max_batch_size = max_batch_size
        self.reference = reference
        self.decoder = decoder
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        tokenizer.padding_side = "left"
        self.new_tokens = 0
        """Tokens generated so far, padding after a row's end excluded (for throughput reports)."""
        self.timings: dict[str, float] | None = None
        """Set to ``{}`` to collect seconds spent in ``prompts`` (padding, copying to the device),
        ``prefill``, ``decode`` and ``finish`` (synchronising the GPU at each boundary: for
        benchmarks only)."""
        self.paths: Counter[str] = Counter()
        """Batches generated per path: ``reference``, ``eager``, ``static`` or ``graph``."""
        self.last_batch_size: int | None = None
        """Questions per batch of the last call (what ``auto`` resolved to)."""
        self.before_batch = None
        """Optional callable ``(indices) -> None``, called with the input indices of each batch, in
        row order, before it is generated (packed sweep trials point each row at its trial's adapter)."""
        self.on_step = None
        """Optional callable ``(indices, tokens) -> None``, called after every decode step with the
        batch's input indices (row order, as ``before_batch``) and the token each row drew (a list
        of ints, ``samples`` rows per question; the pad id once a row has ended). The API server
        streams replies from it. Each call waits for the device (one host sync per token), so it is
        None everywhere else and the loops then never sync per step."""
        self.last_reply_ids: list[list[list[int]]] = []
        """The token ids of the last call's replies, as its replies are ordered: everything generated
        up to and including the end-of-turn token (no such token: the reply hit max_new_tokens)."""

    def resolve_path(self, device: torch.device) -> str:
        """The path a batch takes here: ``reference``, ``graph``, ``static`` or ``eager``."""
        if self.reference or unsloth_patched(self.model):
            return "reference"
        if self.decoder == "eager":
            return "eager"
        if static_decode.static_decode_unsupported(self.model) is not None:
            return "eager"
        return "graph" if device.type == "cuda" and self.decoder in ("auto", "graph") else "static"

    def release(self) -> None:
        """Free the static cache and captured graphs of this engine's model (kept between calls
        otherwise, so a server or a repeated evaluation captures each shape once)."""
        static_decode.release_static_decoder(self.model)

    @torch.inference_mode()
    def generate(self, questions: Sequence[str], progress=None) -> list[list[str]]:
        """Replies per question (``samples`` each), decoded without the prompt, in input order.

        ``progress`` is an optional callable ``(n_questions_done) -> None`` for progress bars.
        """
        self._lap(None)
        ids = chat_token_ids(self.tokenizer, [[{"role": "user", "content": q}] for q in questions])
        self._lap("prompts")
        return self.generate_ids(ids, progress)

    def generate_chats(self, conversations: Sequence[list[dict[str, str]]], progress=None) -> list[list[str]]:
        """Replies to whole conversations (the API's chat requests, few-shot prompts), in input order."""
        return self.generate_ids(chat_token_ids(self.tokenizer, conversations), progress)

    def generate_prompts(self, prompts: Sequence[str], progress=None) -> list[list[str]]:
        """Replies to already rendered prompts (``samples`` each), in input order. The text is
        trusted: control tokens in it are control tokens (use :meth:`generate_chats` for content)."""
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return self.generate_ids(ids, progress)

    @torch.inference_mode()
    def generate_ids(self, prompts: Sequence[list[int]], progress=None) -> list[list[str]]:
        """Replies to tokenized prompts (``samples`` each), in input order."""
        if not prompts:
            return []
        encoded = prompts
        order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
        replies: list[list[str]] = [[] for _ in prompts]
        reply_ids: list[list[list[int]]] = [[] for _ in prompts]
        device = next(self.model.parameters()).device
        path = self.resolve_path(device)
        s = self.sampling
        longest = len(encoded[order[-1]])
        size = self.batch_size
        if size == "auto":
            size = min(len(prompts), auto_batch_size(self.model, longest, s.max_new_tokens, s.samples,
                                                     self.max_batch_size))
        self.last_batch_size = size
        if path in ("graph", "static"):
            rows, width = min(size, len(prompts)) * s.samples, longest + s.max_new_tokens
            static_decode.static_decoder(self.model).reserve(rows, width)
        was_training = self.model.training
        self.model.eval()
        # Sampling seeds its own RNG stream per batch; forking leaves the caller's RNG where it
        # was, so validation in the middle of a training run does not change the training run.
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for b, start in enumerate(range(0, len(order), size)):
                    idx = order[start : start + size]
                    if self.before_batch is not None:
                        self.before_batch(idx)
                    step = (None if self.on_step is None
                            else lambda tokens, idx=idx: self.on_step(idx, tokens.tolist()))
                    texts, tokens = self._generate_batch([encoded[i] for i in idx], b, device, path, step)
                    for j, (text, ids) in enumerate(zip(texts, tokens)):
                        replies[idx[j // s.samples]].append(text)
                        reply_ids[idx[j // s.samples]].append(ids)
                    if progress is not None:
                        progress(len(idx))
        finally:
            self.model.train(was_training)
        self.last_reply_ids = reply_ids
        return replies

    def _generate_batch(self, prompts: list[list[int]], batch_index: int, device, path: str,
                        step=None) -> tuple[list[str], list[list[int]]]:
        self._lap(None)
        # One seed per batch: same inputs, seed and batch size → same replies.
        torch.manual_seed(self.sampling.seed * 1_000_003 + batch_index)
        if path in ("graph", "static"):
            out = self._static_loop(prompts, device, graphs=path == "graph", step=step)
        else:
            input_ids, attention_mask = self._left_padded(prompts, device)
            self._lap("prompts")
            loop = self._transformers_generate if path == "reference" else self._decode_loop
            out = loop(input_ids, attention_mask, step)
        self.paths[path] += 1
        is_stop = torch.isin(out, torch.tensor(self.stop_ids, device=out.device))
        self.new_tokens += int((is_stop.cumsum(1) - is_stop.long() == 0).sum())  # up to each row's end
        tokens = [self._reply_tokens(t) for t in out.tolist()]
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=False)
        self._lap("decode" if path == "reference" else "finish")
        return texts, tokens

    def _left_padded(self, prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` as the tokenizer pads them on the left."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return ids.to(device), mask.to(device)

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

    def _transformers_generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               step=None) -> torch.Tensor:
        s = self.sampling
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=s.max_new_tokens,
            num_return_sequences=s.samples,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            streamer=None if step is None else _StepStreamer(step),
            **s.generate_kwargs(),
        )
        return out[:, input_ids.shape[1] :]

    def _static_loop(self, prompts: list[list[int]], device, graphs: bool, step=None) -> torch.Tensor:
        """New tokens ``[rows × samples, ≤ max_new_tokens]`` through the static cache (rows i*K …
        i*K+K-1 are question i's samples, as ``num_return_sequences`` orders them)."""
        s = self.sampling
        rows = [p for p in prompts for _ in range(s.samples)]
        width = max(len(p) for p in rows)
        input_ids = torch.tensor([p + [self.pad_id] * (width - len(p)) for p in rows]).to(device)
        lengths = torch.tensor([len(p) for p in rows]).to(device)
        self._lap("prompts")
        decoder = static_decode.static_decoder(self.model)
        state = decoder.prefill(input_ids, lengths, s.max_new_tokens, graphs=graphs)
        self._lap("prefill")
        stop = torch.tensor(self.stop_ids, device=device)
        ended = torch.zeros(len(rows), dtype=torch.bool, device=device)
        logits, new = state.logits, []
        for k in range(s.max_new_tokens):
            if k:
                logits = state.step(new[-1])
            token = pick_next_tokens(logits, s).masked_fill(ended, self.pad_id)
            new.append(token)
            if step is not None:
                step(token)
            ended |= torch.isin(token, stop)
            if (k + 1) % self.EXIT_CHECK_EVERY == 0 and bool(ended.all()):
                break
        out = torch.stack(new, dim=1)
        self._lap("decode")
        return out

    def _decode_loop(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, step=None) -> torch.Tensor:
        """New tokens ``[rows × samples, ≤ max_new_tokens]``, pad after each row's end of turn."""
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
            new = self._steps(input_ids, attention_mask, position_ids, cache, ended, stop, step)
        out = torch.stack(new, dim=1)
        self._lap("decode")
        return out

    def _steps(self, ids, attention_mask, position_ids, cache, ended, stop, step=None) -> list[torch.Tensor]:
        """Prefill, then one token per step until ``max_new_tokens`` or every row has ended."""
        s, new = self.sampling, []
        for k in range(s.max_new_tokens):
            logits = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            if k == 0:
                self._lap("prefill")
            token = pick_next_tokens(logits, s).masked_fill(ended, self.pad_id)
            new.append(token)
            if step is not None:
                step(token)
            ended |= torch.isin(token, stop)
            if (k + 1) % self.EXIT_CHECK_EVERY == 0 and bool(ended.all()):
                break
            ids = token[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((ids.shape[0], 1))], dim=-1)
            position_ids = position_ids[:, -1:] + 1
        return new

    def _reply_tokens(self, tokens: list[int]) -> list[int]:
        """Everything generated up to and including the first end-of-turn token."""
        for k, t in enumerate(tokens):
            if t in self.stop_ids:
                return tokens[: k + 1]
        return tokens


class _StepStreamer:
    """transformers' streamer protocol (``put`` the prompt first, then each step's tokens; ``end``)
    as :attr:`GenerationEngine.on_step` calls for the reference path."""

    def __init__(self, step):
        self.step, self.prompt_seen = step, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.step(value)
        self.prompt_seen = True

    def end(self) -> None:
        """Nothing to flush: every step was handed over in :meth:`put`."""


def unsloth_patched(model) -> bool:
    """Whether Unsloth has replaced the model's attention (``FastLanguageModel`` does on load)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", base), "layers", None) or [None]
    attn = getattr(layers[0], "self_attn", None)
    return attn is not None and type(attn).forward.__module__.startswith("unsloth")


def timed_generate(engine: GenerationEngine, questions: Sequence[str], label: str = "generating",
                   conversations: Sequence[list[dict[str, str]]] | None = None):
    """Run the engine under a rich progress bar (items/s) — plain lines every 30 s when stdout
    is not a terminal (:mod:`spellxfer.core.progress`); returns (replies, seconds). With
    ``conversations`` (one per question, e.g. few-shot turns before it) those are what is sent."""
    class Rate(TextColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return f"{speed:.1f} items/s" if speed else "– items/s"

    def run(advance):
        if conversations is None:
            return engine.generate(questions, progress=advance)
        return engine.generate_chats(conversations, progress=advance)

    t0 = time.perf_counter()
    if not is_terminal():  # a log file: a live bar would show nothing until the end
        plain = PlainProgress(label, len(questions), unit="items")
        plain.update(0, force=True)
        replies = run(lambda n: plain.update(plain.done + n))
    else:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      Rate(""), TimeElapsedColumn(), transient=False) as bar:
            task = bar.add_task(label, total=len(questions))
            replies = run(lambda n: bar.advance(task, n))
    return replies, time.perf_counter() - t0
