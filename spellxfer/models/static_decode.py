"""A preallocated KV cache and CUDA-graph decode steps, under :class:`GenerationEngine`.

The eager decode loop (``generation.py``) grows a ``DynamicCache`` by concatenation at every step
and launches every kernel of every layer from Python: about 1,500 launches per generated token
for Qwen3-4B, more with LoRA wrappers. At batch 64 (validation) that host work *is* the step.
Here instead:

* **Static cache.** Each layer's keys and values live in one preallocated ``[rows, kv_heads,
  length, head_dim]`` buffer (views of one flat store per layer, so buckets of different shape
  share the memory). Prompts are **right**-padded: row ``b``'s prompt fills slots ``[0, n_b)`` and
  its ``t``-th new token goes to slot ``n_b + t``, which is also its rotary position — the same
  positions the left-padded eager loop feeds (``cumsum(mask) − 1``). A slot past a row's current
  one is masked out and always written by the step that first reads it, so stale values from an
  earlier batch are never seen.
* **Prefill in one fused call per layer.** With right padding a real token never sees a pad
  (they all come after it), so the prompt needs no mask: SDPA's causal flash kernel, with grouped
  query heads and no copies of the keys. The logits are taken at each row's last real token only.
  Long batches are prefilled in runs of rows padded to their own longest prompt
  (:attr:`StaticDecoder.PREFILL_CHUNK_TOKENS`), which takes most padding out of the prefill.
* **A captured decode step.** One step — embed the fed token, every layer's attention over the
  static cache, write the new keys, project the last hidden state to the vocabulary, advance each
  row's slot — is recorded once per (rows, length) bucket into a CUDA graph and replayed: one
  launch per token instead of thousands. Sampling stays outside the graph (a handful of kernels,
  and the engine's seeded RNG stream is consumed exactly as in the eager loop).

Bucketing: rows round up to a power of two up to 256, then to a multiple of 256; cache length
(prompt + reply cap) to a multiple of 32. Rows added to fill a bucket start empty and are dropped.
On a CPU, or for models this does not support (:func:`static_decode_unsupported`), or with
``graphs=False``, the very same step runs eagerly.

:meth:`StaticDecoder.prefill` is public so that other scorers (a likelihood probe) can prefill
prompts once and step through continuation tokens with :meth:`DecodeState.step`.
"""

from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from spellxfer.models.attention import STATIC_NAME, attention_implementation

SUPPORTED_MODEL_TYPES = ("qwen3", "llama")
"""Decoder-only models whose causal-LM head is a plain ``lm_head(hidden)`` and whose layers read
the cache only through ``cache.update`` (Qwen3, Llama / SmolLM2)."""

LENGTH_BUCKET = 32
"""Cache lengths round up to a multiple of this many slots (attention cost grows with it)."""


def bucket_rows(n: int) -> int:
    """Rows of the captured shape that holds ``n`` rows: the next power of two up to 256, then the
    next multiple of 256 (a full auto-sized batch is rounded *down* to such a size, so it pads none)."""
    if n <= 256:
        return 1 << max(0, n - 1).bit_length()
    return -(-n // 256) * 256


def bucket_length(n: int) -> int:
    return -(-n // LENGTH_BUCKET) * LENGTH_BUCKET


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def static_decode_unsupported(model) -> str | None:
    """Why the static path cannot decode with ``model``; None when it can.

    It needs a supported architecture with full attention in every layer, the stock transformers
    attention module (Unsloth replaces it with its own inference path) and an SDPA or eager
    attention implementation to stand in for.
    """
    base = _base(model)
    cfg = base.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {cfg.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "sliding-window attention layers"
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return f"attention implementation {cfg._attn_implementation!r}"
    body = base.get_decoder()
    attn = getattr(getattr(body, "layers", [None])[0], "self_attn", None)
    if attn is None or not type(attn).forward.__module__.startswith("transformers."):
        return "a patched attention module (e.g. Unsloth's)"
    return None


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def static_decoder(model) -> StaticDecoder:
    """The model's decoder: one per model object, so captured graphs and the cache outlive any one
    engine (the server builds an engine per request batch)."""
    decoder = _DECODERS.get(model)
    if decoder is None:
        decoder = _DECODERS[model] = StaticDecoder(model)
    return decoder


def release_static_decoder(model) -> None:
    """Free the model's cache and graphs (e.g. after validation, so training gets the memory back)."""
    decoder = _DECODERS.pop(model, None)
    if decoder is not None:
        decoder.release()


class StaticKVCache:
    """What transformers' attention layers call ``cache.update(key, value, layer_idx)`` on.

    Prefill (more than one query position): the prompt's keys and values are copied into slots
    ``[0, P)`` and returned as they are, so attention runs over the prompt alone. Decode (one
    position): each row's key goes to its own slot ``slot[b]`` and the whole buffer is returned.
    """

    def __init__(self, bucket: _Bucket, first_row: int = 0):
        self.bucket, self.first_row = bucket, first_row  # a prefill chunk's rows start at first_row

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        b = self.bucket
        if b.keys is None:
            b.decoder._bind(b, key.dtype, value.dtype)
        keys, values = b.keys[layer_idx], b.values[layer_idx]
        if key.shape[2] > 1:
            rows = slice(self.first_row, self.first_row + key.shape[0])
            keys[rows, :, : key.shape[2]].copy_(key)
            values[rows, :, : key.shape[2]].copy_(value)
            return key, value
        index = b.slot.view(-1, 1, 1, 1).expand(-1, key.shape[1], 1, key.shape[3])
        keys.scatter_(2, index, key)
        values.scatter_(2, index, value)
        return keys, values


@dataclass(eq=False)
class _Bucket:
    """The static buffers of one (rows, length) shape, and its captured step once recorded."""

    decoder: StaticDecoder
    rows: int
    length: int
    ids: torch.Tensor  # [rows, 1] token fed at the next step
    slot: torch.Tensor  # [rows] each row's next cache slot (= its rotary position)
    slots: torch.Tensor  # [length] 0 … length − 1
    keys: list[torch.Tensor] | None = None
    values: list[torch.Tensor] | None = None
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # the graph's output, [rows, vocab]


@dataclass(eq=False)
class DecodeState:
    """A prefilled batch: ``logits`` ``[n, vocab]`` at each row's last prompt token, and the cache
    behind it. :meth:`step` feeds one token per row and returns the next logits. A later
    ``prefill`` of the same decoder and shape reuses the buffers, which ends this state."""

    bucket: _Bucket
    n: int
    logits: torch.Tensor
    graphs: bool

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``[n]`` (one per row) and return the logits after them, ``[n, vocab]``
        (a view that the next step overwrites when the step is a replayed graph)."""
        b = self.bucket
        b.ids[: self.n, 0].copy_(tokens)
        decoder = b.decoder
        if self.graphs and b.graph is None:
            decoder._capture(b)
        if b.graph is not None and self.graphs:
            b.graph.replay()
            decoder.replays += 1
            return b.logits[: self.n]
        decoder.eager_steps += 1
        return decoder._step(b)[: self.n]


class StaticDecoder:
    """Prefill and decode steps of one model over a static KV cache (see the module docstring).

    Counters (for tests and benchmarks): ``prefills``, ``captures`` (graphs recorded),
    ``replays`` (decode steps run as a replayed graph) and ``eager_steps`` (run op by op).
    """

    WARMUP_STEPS = 2
    """Eager steps on a side stream before a capture (cuBLAS handles, Triton autotuning)."""

    PREFILL_CHUNK_TOKENS = 32_768
    """Padded prompt tokens per prefill call. A batch is cut into runs of consecutive rows, each
    padded only to its own longest prompt: the engine sorts rows by length, so at 2,048 rows of the
    bench's questions (28–48 tokens) padding falls from 19% of the prefill to ~4%; 32k tokens keep
    every matrix product large enough to run at full rate."""

    def __init__(self, model):
        base = _base(model)
        # weakly: :data:`_DECODERS` keys decoders by their model weakly, and a decoder that held its
        # model would keep it alive, and its weights, cache and graphs with it, for the life of the
        # process (a pack that evaluates trial after trial in its own process ran out of memory)
        self._model, self._base = weakref.ref(model), weakref.ref(base)
        self.body = base.get_decoder()
        self.head = base.get_output_embeddings()
        cfg = base.config
        self.layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        params = inspect.signature(self.body.forward).parameters
        # transformers ≥ 5.2x calls it `cache`, earlier 5.x `past_key_values`
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.reserved = 0
        self.prefills = self.prefill_chunks = self.captures = self.replays = self.eager_steps = 0
        self.prefill_chunk_tokens = self.PREFILL_CHUNK_TOKENS
        self._store: tuple[torch.Tensor, torch.Tensor] | None = None  # [layers, capacity] keys, values
        self._buckets: dict[tuple, _Bucket] = {}
        self._pool = None
        self._fingerprint = None

    @property
    def model(self):
        """The model (None once it is gone)."""
        return self._model()

    @property
    def base(self):
        """The model under its PEFT wrapper, or the model itself."""
        return self._base()

    # ---- memory ---------------------------------------------------------------------------------
    def reserve(self, rows: int, length: int) -> None:
        """Size the store for ``rows × length`` slots up front (the engine knows its batches), so
        it is not reallocated — and every graph recaptured — as batches grow."""
        self.reserved = max(self.reserved, bucket_rows(rows) * bucket_length(length))

    def release(self) -> None:
        """Drop the store, the buffers and the graphs."""
        self._drop()
        self.reserved = 0

    def _drop(self) -> None:
        self._store, self._buckets, self._pool = None, {}, None

    def _bind(self, bucket: _Bucket, key_dtype: torch.dtype, value_dtype: torch.dtype) -> None:
        """Give ``bucket`` its cache views, (re)allocating the store if it is too small or of
        another dtype; a reallocation drops every other bucket (their graphs read the old store)."""
        need = bucket.rows * bucket.length
        per_slot = self.kv_heads * self.head_dim
        store = self._store
        dtypes = None if store is None else (store[0].dtype, store[1].dtype)
        if store is None or store[0].shape[1] < need * per_slot or dtypes != (key_dtype, value_dtype):
            capacity = max(need, self.reserved) * per_slot
            device = bucket.ids.device
            self._store = None
            self._buckets = {k: v for k, v in self._buckets.items() if v is bucket}
            # zeros, not empty: a masked slot multiplies its value by a probability of 0, and a
            # NaN bit pattern left in fresh memory would survive that
            store = self._store = (torch.zeros(self.layers, capacity, dtype=key_dtype, device=device),
                                   torch.zeros(self.layers, capacity, dtype=value_dtype, device=device))
        shape = (bucket.rows, self.kv_heads, bucket.length, self.head_dim)
        size = need * per_slot
        bucket.keys = [store[0][i, :size].view(shape) for i in range(self.layers)]
        bucket.values = [store[1][i, :size].view(shape) for i in range(self.layers)]

    def _bucket(self, rows: int, length: int, device: torch.device) -> _Bucket:
        key = (rows, length, _autocast_state(device))
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(self, rows, length,
                                             ids=torch.zeros(rows, 1, dtype=torch.long, device=device),
                                             slot=torch.zeros(rows, dtype=torch.long, device=device),
                                             slots=torch.arange(length, device=device))
        return b

    def _check_unchanged(self) -> None:
        """Graphs replay the kernels and weight addresses seen at capture: drop them if the model's
        parameters moved or its adapters were merged, disabled or switched since."""
        fingerprint = hash((tuple(p.data_ptr() for p in self.model.parameters()),
                            tuple((m.merged, m.disable_adapters, tuple(m.active_adapters))
                                  for m in self.model.modules() if isinstance(m, BaseTunerLayer))))
        if fingerprint != self._fingerprint:
            if self._fingerprint is not None:
                self._drop()
            self._fingerprint = fingerprint

    # ---- prefill and steps ----------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int,
                graphs: bool = False) -> DecodeState:
        """Run the prompts through the model and keep their keys and values.

        Args:
            input_ids: ``[n, P]`` right-padded prompt tokens on the model's device.
            lengths: ``[n]`` real prompt lengths (≥ 1) on the same device.
            max_new_tokens: Decode steps the cache must hold room for after the longest prompt.
            graphs: Replay a captured CUDA graph per decode step (CUDA only; otherwise eager).

        Returns:
            The :class:`DecodeState`, whose ``logits`` are each row's next-token logits.
        """
        device = input_ids.device
        graphs = graphs and device.type == "cuda"
        if graphs:
            self._check_unchanged()
        n, width = input_ids.shape
        b = self._bucket(bucket_rows(n), bucket_length(width + max_new_tokens), device)
        logits = []
        with attention_implementation(self.base, STATIC_NAME):
            for start, stop, chunk_width in self._chunks(lengths.tolist()):
                # positions 0 … P − 1 in every row: right padding puts each row's real tokens first
                hidden = self.body(input_ids=input_ids[start:stop, :chunk_width], use_cache=True,
                                   position_ids=torch.arange(chunk_width, device=device)[None],
                                   **{self.cache_kwarg: StaticKVCache(b, start)}).last_hidden_state
                last = lengths[start:stop] - 1
                logits.append(self.head(hidden[torch.arange(stop - start, device=device), last]))
                self.prefill_chunks += 1
        logits = logits[0] if len(logits) == 1 else torch.cat(logits)
        b.slot[:n].copy_(lengths)
        b.slot[n:].zero_()  # filler rows: attend to slot 0 only, results dropped
        b.ids.zero_()
        self.prefills += 1
        return DecodeState(b, n, logits, graphs)

    def _chunks(self, lengths: list[int]):
        """``(start, stop, width)`` runs of consecutive rows with ``rows × width`` at most
        :attr:`prefill_chunk_tokens` (one row at least), ``width`` the run's longest prompt."""
        start, widest = 0, 0
        for i, n in enumerate(lengths):
            if i > start and (i - start + 1) * max(widest, n) > self.prefill_chunk_tokens:
                yield start, i, widest
                start, widest = i, 0
            widest = max(widest, n)
        yield start, len(lengths), widest

    def _step(self, b: _Bucket) -> torch.Tensor:
        """One decode step over the whole bucket: what a graph records. Returns ``[rows, vocab]``."""
        visible = (b.slots[None, :] <= b.slot[:, None])[:, None, None, :]  # [rows, 1, 1, length]
        with attention_implementation(self.base, STATIC_NAME):
            hidden = self.body(input_ids=b.ids, attention_mask=visible, position_ids=b.slot[:, None],
                               use_cache=True, **{self.cache_kwarg: StaticKVCache(b)}).last_hidden_state
        logits = self.head(hidden[:, -1])
        b.slot.add_(1)
        return logits

    def _capture(self, b: _Bucket) -> None:
        """Record :meth:`_step` for ``b`` into a CUDA graph (all buckets share one memory pool:
        they are replayed one at a time). The warm-up and the capture each run a real step, so
        the row slots and fed tokens are put back afterwards; the keys they wrote lie in slots
        that the real steps overwrite before reading."""
        saved = b.slot.clone(), b.ids.clone()
        with _capture_autocast(b.ids.device):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(self.WARMUP_STEPS):
                    self._step(b)
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._step(b)
        b.slot.copy_(saved[0])
        b.ids.copy_(saved[1])
        b.graph, b.logits = graph, logits
        self.captures += 1


def _autocast_state(device: torch.device) -> tuple:
    if device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return (False,)
    return (True, torch.get_autocast_dtype("cuda"))


@contextmanager
def _capture_autocast(device: torch.device):
    """The caller's autocast, with its weight-cast cache off: a cast cached during capture would
    live in the graph's pool while autocast believes it owns it (PyTorch's CUDA-graph notes)."""
    state = _autocast_state(device)
    ctx = torch.autocast("cuda", dtype=state[1], cache_enabled=False) if state[0] else nullcontext()
    with ctx:
        yield
