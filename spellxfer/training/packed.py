"""Several trials' LoRA adapters on one frozen base model, each batch row through its own trial's adapter.

The shared model is a PEFT model holding one named adapter per packed trial (``t0007``, …). Each is
created by PEFT's own ``add_adapter`` right after the RNG is seeded as a fit seeds it, so its rank,
alpha, dropout, target modules and initial weights are exactly those ``get_peft_model`` gives the
trial run alone; ``delete_adapter`` drops it when the trial ends. PEFT's own forward is switched to
the base layer only (``enable_adapters(False)``), and a forward hook on every LoRA layer adds each
row's own update ``B_t A_t dropout_t(x) · alpha_t / r_t`` following the *row plan* of the forward:

* training (:meth:`PackedLoRA.rows`): rows grouped by trial, ``[(trial, n_rows), …]`` in batch order;
* generation (:meth:`PackedLoRA.generation`): one trial (or none) per row, in the generation
  engine's own order (its prompts sorted by length), set before each batch.

A trial's loss is computed on its own rows only, and rows of a batch never mix in a transformer,
so one backward of the summed losses gives each trial's adapter exactly the gradient it would get
alone (the adapters' parameters are disjoint). Three kernels compute the training update; all give
the same numbers, and ``spellxfer bench sweep`` measures which is faster on a card:

* ``loop`` (the reference): per trial, its rows through its A and B — two small matrix products
  per trial and layer, so the launches grow with the number of trials;
* ``concat``: every trial's A stacked into one ``[Σr, in]`` matrix, one product for all rows, each
  row keeping only its own trial's columns (``where``, so a non-finite value of one trial cannot
  reach another's rows), one product with the stacked B: Σr/r times the adapter FLOPs, but two
  products per layer whatever the number of trials;
* ``grouped``: ``torch._grouped_mm`` over the row groups with ranks zero-padded to the largest
  (a multiple of 8): the exact FLOPs in two grouped kernels per layer.

Generation always uses the ``concat`` form with a per-row owner mask (its rows are not grouped by
trial), precomputed once per pass and read from buffers that a captured CUDA graph can replay.
LoRA dropout draws each micro-batch's masks from a generator seeded by (the trial's seed, the
micro-batch's index, the layer), so a trial's masks do not depend on its pack-mates, and are the
same when its micro-batches run one per step or a whole accumulation window at once (they are not
the masks of an unpacked run, which draws from the process-wide RNG).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import atomic_output_dir
from spellxfer.models.registry import check_lora_state, quiet_peft_wrap

KERNELS = ("loop", "concat", "grouped")
GROUPED_RANK_MULTIPLE = 8  # grouped GEMMs want 16-byte aligned matrix widths (8 bf16 values)


@dataclass
class _Plan:
    """Which rows the current forward sends through which adapter."""

    segments: list[tuple[str, int, int]] | None = None  # training: (trial, first row, end row), one per trial
    batches: list[tuple[str, int, int, int | None, int | None]] = field(default_factory=list)
    """Training: each micro-batch's (trial, first row, end row, own padded length, dropout seed)."""
    row_owner: torch.Tensor | None = None  # generation: per row an index into `names`, -1 for none
    names: tuple[str, ...] = ()
    cache: dict = field(default_factory=dict)  # per-plan tensors shared by the layers (masks, offsets)


class PackedLoRA:
    """Named LoRA adapters on one base model, applied per row (see the module docstring).

    Lifecycle: :meth:`add` an adapter per trial (its parameters come back, for its optimizer) →
    forward inside :meth:`rows` (training) or :meth:`generation` → :meth:`state` / :meth:`load_state`
    for checkpoints (named as ``SpellingLoRAModule`` names them, so the files are a fit's) →
    :meth:`save_adapter` for the PEFT directory → :meth:`remove` when the trial ends.

    Args:
        base: The frozen base causal LM (``SpellingLoRAModule``'s ``load_base``).
        kernel: ``loop``, ``concat`` or ``grouped`` for the training update.
    """

    def __init__(self, base: torch.nn.Module, kernel: str = "loop"):
        if kernel not in KERNELS:
            raise SpellxferError(f"packed LoRA kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.base = base
        self.lm = None  # the PeftModel, once the first adapter exists
        self.kernel = kernel
        self._plan: _Plan | None = None
        self._hooked: set[int] = set()
        self._layer_key: dict[int, int] = {}
        self._rng: torch.Generator | None = None  # reseeded for every micro-batch and layer
        self._gen_stacks: dict[int, tuple | None] = {}

    @property
    def model(self) -> torch.nn.Module:
        """What to run forward: the PEFT model once an adapter exists, else the base."""
        return self.lm if self.lm is not None else self.base

    @property
    def names(self) -> list[str]:
        return list(self.lm.peft_config) if self.lm is not None else []

    # ---- adapters ---------------------------------------------------------------------------------
    def add(self, name: str, config, seed: int) -> list[torch.nn.Parameter]:
        """Create adapter ``name`` from a PEFT ``LoraConfig``; returns its parameters in module order
        (the order a fit's optimizer holds them in, so optimizer states are interchangeable).

        The torch RNG is seeded with ``seed`` first (and restored after), as ``seed_everything``
        leaves it right before a fit creates its adapter, so the initial weights are the same.
        """
        if name in self.names:
            raise ValueError(f"adapter {name} is already packed")
        with torch.random.fork_rng(devices=[]), quiet_peft_wrap():
            torch.manual_seed(seed)
            if self.lm is None:
                self.lm = get_peft_model(self.base, config, adapter_name=name)
            else:
                self.lm.add_adapter(name, config)
        self._refresh()
        return self.parameters(name)

    def remove(self, name: str) -> None:
        """Drop adapter ``name`` (its memory and its rows' updates)."""
        if name in self.names:
            self.lm.delete_adapter(name)
        self._refresh()

    def _refresh(self) -> None:
        """Hook new LoRA layers, keep PEFT's own adapter forward off, and let exactly the packed
        adapters' weights require gradients (PEFT switches them with its active adapter)."""
        if self.lm is None:
            return
        names = self.names
        if names and not set(self.lm.active_adapters) & set(names):
            # PEFT answers get_base_model() and friends through its active adapter: keep one that exists
            self.lm.set_adapter(names[0])
        for qualified, module in self.lm.named_modules():
            if isinstance(module, LoraLayer):
                if id(module) not in self._hooked:
                    module.register_forward_hook(self._hook)
                    self._hooked.add(id(module))
                    # dropout seeds mix in the layer's name: stable whatever adapters came before
                    layer_name = qualified.removeprefix("base_model.model.")
                    self._layer_key[id(module)] = zlib.crc32(layer_name.encode())
                module.enable_adapters(False)
        for name in names:
            for p in self.parameters(name):
                p.requires_grad_(True)

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for _, p in self._named(name)]

    def _named(self, name: str) -> list[tuple[str, torch.nn.Parameter]]:
        marks = (f".lora_A.{name}.", f".lora_B.{name}.")
        return [(k, p) for k, p in self.lm.named_parameters() if any(m in k for m in marks)]

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s weights under the names a fit's checkpoint uses
        (``lm.base_model.…lora_A.default.weight``), detached copies on the CPU."""
        return {_fit_key(k, name): p.detach().to("cpu", copy=True) for k, p in self._named(name)}

    def load_state(self, name: str, state: dict, source: str) -> None:
        """Copy a fit checkpoint's LoRA weights into adapter ``name`` (names and shapes checked)."""
        params = dict((_fit_key(k, name), p) for k, p in self._named(name))
        check_lora_state(state, params, source)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k])

    def save_adapter(self, name: str, out: Path) -> Path:
        """Write adapter ``name`` as a PEFT directory (``adapter_config.json`` +
        ``adapter_model.safetensors``), the files a fit's ``best_adapter/`` holds."""
        with atomic_output_dir(out, overwrite=True) as tmp:
            self.lm.save_pretrained(str(tmp), selected_adapters=[name])
            # PEFT writes a named adapter into a subfolder of that name; a fit's has no subfolder
            for f in (tmp / name).iterdir():
                os.replace(f, tmp / f.name)
            (tmp / name).rmdir()
        return out

    # ---- row plans --------------------------------------------------------------------------------
    @contextmanager
    def rows(self, groups: Sequence[tuple]) -> Iterator[None]:
        """Forward (and backward: activation checkpointing recomputes inside it) with the batch's
        rows grouped by trial, one group per micro-batch in row order: ``(adapter, n_rows)``, or
        ``(adapter, n_rows, width, dropout_seed)``. A trial's micro-batches are consecutive.

        ``width``: the micro-batch's own padded length, where the packed batch is wider;
        ``dropout_seed``: seeds its LoRA dropout masks (with the layer's name). Both make a trial's
        masks its own: drawn at its own shape from its own seed, whatever its pack-mates.
        """
        segments, batches, start = [], [], 0
        for name, n, *more in groups:
            width, seed = (list(more) + [None, None])[:2]
            batches.append((name, start, start + n, width, seed))
            if segments and segments[-1][0] == name:
                segments[-1] = (name, segments[-1][1], start + n)
            else:
                segments.append((name, start, start + n))
            start += n
        if len({n for n, _, _ in segments}) != len(segments):
            raise ValueError("a trial's micro-batches must be consecutive rows")
        self._plan = _Plan(segments=segments, batches=batches, names=tuple(n for n, _, _ in segments))
        try:
            yield
        finally:
            self._plan = None

    @contextmanager
    def generation(self, names: Sequence[str], max_rows: int) -> Iterator[Callable[[Sequence[int]], None]]:
        """A generation pass over adapters ``names``; yields ``set_rows(owners)``, to call before each
        batch with each row's index into ``names`` (-1: the base model alone).

        The stacked weights and the per-row owner buffer (``max_rows`` rows, more than any batch or
        captured bucket holds) are made once, so the same memory serves every batch and graph.
        """
        device = next(self.base.parameters()).device
        dtype = next(p for p in self.base.parameters() if p.is_floating_point()).dtype
        owner = torch.full((max_rows,), -1, dtype=torch.long, device=device)
        self._gen_stacks = {}
        with torch.no_grad():
            for module in self.lm.modules():
                if isinstance(module, LoraLayer):
                    self._gen_stacks[id(module)] = _stack(module, names, dtype, device)
        self._plan = _Plan(row_owner=owner, names=tuple(names))

        def set_rows(owners: Sequence[int]) -> None:
            if len(owners) > max_rows:
                raise ValueError(f"{len(owners)} rows in a batch, more than the {max_rows} planned")
            owner.fill_(-1)
            owner[: len(owners)].copy_(torch.tensor(list(owners), dtype=torch.long))

        try:
            yield set_rows
        finally:
            self._plan, self._gen_stacks = None, {}

    # ---- the update -------------------------------------------------------------------------------
    def _hook(self, module, args, output):
        plan = self._plan
        if plan is None:
            return output
        x = args[0]
        if plan.row_owner is not None:
            stacks = self._gen_stacks.get(id(module))
            return (
                output
                if stacks is None
                else output + _generation_delta(x, stacks, plan.row_owner).to(output.dtype)
            )
        present = [s for s in plan.segments if s[0] in module.lora_A]
        if not present:
            return output
        x = self._dropout(module, x, plan)
        kernel = {"loop": self._loop, "concat": self._concat, "grouped": self._grouped}[self.kernel]
        return output + kernel(module, x, plan).to(output.dtype)

    def _dropout(self, module, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Each micro-batch's rows through its trial's LoRA dropout, the mask drawn at the
        micro-batch's own shape from a generator seeded by (its seed, the layer): its pack-mates
        cannot change it, and activation checkpointing's recomputation draws it again exactly."""
        if not module.training:
            return x
        ps = [_dropout_p(module, b[0]) for b in plan.batches]
        if not any(ps):
            return x
        if self._rng is None or self._rng.device != x.device:
            self._rng = torch.Generator(device=x.device)
        parts = []
        for (_, start, stop, width, seed), p in zip(plan.batches, ps):
            xs = x[start:stop]
            if p:
                self._rng.manual_seed((int(seed or 0) * 1_000_003 + self._layer_key[id(module)]) % 2**63)
                width = width or xs.shape[1]
                keep = torch.empty((xs.shape[0], width, *xs.shape[2:]), dtype=xs.dtype, device=xs.device)
                keep.bernoulli_(1 - p, generator=self._rng)
                if width < xs.shape[1]:  # the pack's extra padding: never read by a real token
                    keep = F.pad(keep, (0, 0, 0, xs.shape[1] - width), value=1.0)
                xs = xs * keep / (1 - p)
            parts.append(xs)
        return torch.cat(parts)

    def _loop(self, module, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
        parts = []
        for name, start, stop in plan.segments:
            xs = x[start:stop]
            if name in module.lora_A:
                parts.append(module.lora_B[name](module.lora_A[name](xs)) * module.scaling[name])
            else:
                parts.append(xs.new_zeros((*xs.shape[:-1], module.out_features)))
        return torch.cat(parts)

    def _concat(self, module, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
        names = [n for n, _, _ in plan.segments if n in module.lora_A]
        a = torch.cat([module.lora_A[n].weight for n in names])  # [Σr, in]
        b = torch.cat([module.lora_B[n].weight for n in names], dim=1)  # [out, Σr]
        key = ("concat", tuple(names))
        if key not in plan.cache:
            # row r keeps the columns of its own trial, scaled by that trial's alpha / r
            keep = torch.zeros(x.shape[0], a.shape[0], dtype=torch.bool)
            scale = torch.empty(a.shape[0])
            col = 0
            for name, start, stop in plan.segments:
                if name not in module.lora_A:
                    continue
                r = module.r[name]
                keep[start:stop, col : col + r] = True
                scale[col : col + r] = module.scaling[name]
                col += r
            plan.cache[key] = (keep.to(x.device)[:, None, :], scale.to(x.device))
        keep, scale = plan.cache[key]
        dtype = _compute_dtype(x)
        z = x.to(dtype) @ a.T.to(dtype)
        z = torch.where(keep, z * scale.to(dtype), 0.0)
        return z @ b.T.to(dtype)

    def _grouped(self, module, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
        names = [n for n, _, _ in plan.segments]
        ranks = [module.r.get(n, 0) for n in names]
        width = -(-max(ranks) // GROUPED_RANK_MULTIPLE) * GROUPED_RANK_MULTIPLE
        dtype = _compute_dtype(x)
        a_rows, b_cols = [], []
        for n, r in zip(names, ranks):
            if r:  # zero rows / columns pad every adapter to the same rank; they add exact zeros
                a_rows.append(F.pad(module.lora_A[n].weight, (0, 0, 0, width - r)))
                b_cols.append(F.pad(module.lora_B[n].weight, (0, width - r)))
            else:  # a trial without an adapter on this layer: an all-zero group
                a_rows.append(x.new_zeros((width, module.in_features), dtype=torch.float32))
                b_cols.append(x.new_zeros((module.out_features, width), dtype=torch.float32))
        a = torch.stack(a_rows).to(dtype).transpose(1, 2)  # [G, in, width], column-major per group
        b = torch.stack(b_cols).to(dtype).transpose(1, 2)  # [G, width, out]
        tokens = x.shape[1:-1].numel()
        key = ("grouped", tuple(names), tokens)
        if key not in plan.cache:
            ends, per_row = [], []
            for (name, start, stop), r in zip(plan.segments, ranks):
                ends.append(stop * tokens)
                per_row.append(torch.full(((stop - start) * tokens, 1), module.scaling[name] if r else 0.0))
            plan.cache[key] = (
                torch.tensor(ends, dtype=torch.int32, device=x.device),
                torch.cat(per_row).to(x.device),
            )
        offs, scale = plan.cache[key]
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        z = torch._grouped_mm(flat, a, offs=offs) * scale.to(dtype)
        return torch._grouped_mm(z, b, offs=offs).reshape(*x.shape[:-1], module.out_features)


def _generation_delta(x: torch.Tensor, stacks: tuple, row_owner: torch.Tensor) -> torch.Tensor:
    """Each row's update from the stacked adapters, keeping only its owner's columns."""
    a, b, col_owner, col_scale = stacks
    keep = (row_owner[: x.shape[0], None] == col_owner[None, :])[:, None, :]  # [rows, 1, Σr]
    z = torch.where(keep, (x.to(a.dtype) @ a.T) * col_scale, 0.0)
    return z @ b.T


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products run in here: autocast's, else the activations' own."""
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


def _stack(module, names: Sequence[str], dtype, device) -> tuple | None:
    """(A [Σr, in], B [out, Σr], each column's owner index into ``names``, each column's scale)
    over the adapters of ``names`` that this layer has; None when it has none of them."""
    parts = [(i, n) for i, n in enumerate(names) if n in module.lora_A]
    if not parts:
        return None
    a = torch.cat([module.lora_A[n].weight for _, n in parts]).to(dtype)
    b = torch.cat([module.lora_B[n].weight for _, n in parts], dim=1).to(dtype)
    owner = torch.cat([torch.full((module.r[n],), i, dtype=torch.long) for i, n in parts]).to(device)
    scale = torch.cat([torch.full((module.r[n],), float(module.scaling[n])) for _, n in parts]).to(
        device, dtype
    )
    return a, b, owner, scale


def _dropout_p(module, name: str) -> float:
    layer = module.lora_dropout[name] if name in module.lora_dropout else None
    return float(layer.p) if isinstance(layer, torch.nn.Dropout) else 0.0


def _fit_key(peft_key: str, name: str) -> str:
    """``base_model.…lora_A.t0007.weight`` → ``lm.base_model.…lora_A.default.weight``: the name the
    parameter has in a ``SpellingLoRAModule`` (attribute ``lm``, PEFT's ``default`` adapter)."""
    return "lm." + peft_key.replace(f".lora_A.{name}.", ".lora_A.default.").replace(
        f".lora_B.{name}.", ".lora_B.default."
    )
