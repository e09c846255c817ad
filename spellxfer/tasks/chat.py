"""Qwen3 specifics: the offline tokenizer, the non-thinking chat template, prompt formatting.

Qwen3 shares Qwen2's byte-level BPE: 151,643 ranks (shipped as ``qwen.tiktoken`` inside the
``dashscope`` wheel, see :mod:`spellxfer.core.assets`), Qwen2's pre-tokenizer regex, NFC normalisation
and 26 added tokens at ids 151643–151668. Rebuilding it from those parts reproduces the hub
tokenizer without touching a model hub; the result is cached as a transformers fast tokenizer.

Non-thinking policy: every prompt spellxfer renders for a Qwen3 model ends in an *empty* think
block, exactly as Qwen3's official template renders ``enable_thinking=False``. Our template below
has no way to leave it out — there is no switch to flip.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from spellxfer.core.assets import cache_dir, ensure_asset

# Qwen2/Qwen3 pre-tokenizer: like GPT-4's but digits are split one by one (\p{N}, not \p{N}{1,3}).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
N_RANKS = 151_643
VOCAB_SIZE = 151_936  # Qwen3-4B's embedding rows: the 151,669 tokens padded to a multiple of 128

# (token, special) in id order from 151643. special=False tokens survive skip_special_tokens,
# which is why a decoded Qwen3 reply can still carry <think>…</think> (see docs/qwen3_guide.md).
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", True),
    ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True),
    ("<|repo_name|>", True),
    ("<|file_sep|>", True),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
IM_END_ID = 151645
ENDOFTEXT_ID = 151643
THINK_ID, END_THINK_ID = 151667, 151668

# Our own template. For one user turn it renders byte-for-byte what Qwen3's official template
# renders with enable_thinking=False; assistant turns in the history are rendered without their
# reasoning, as the official template does. The empty think block is unconditional.
NON_THINKING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
)

GENERATION_PROMPT_SUFFIX = "<|im_start|>assistant\n<think>\n\n</think>\n\n"

# Qwen3's slash-think soft switch: typed into a turn, it turns thinking on for that turn, so the
# server refuses any message holding it (and tools/policy_check.py flags it in the repository).
# `[/]` keeps this source from matching itself. Not after a word, `/`, `<` (the `</think>` tag),
# `\` (JSON-escaped `<\/think>`), `.` or `-` (paths, URLs); not before a word char, `>` or `-`.
SOFT_SWITCH = re.compile(r"(?<![\w/<\\.-])[/]think(?![\w>-])")


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    if len(ranks) != N_RANKS:
        raise ValueError(f"{path}: expected {N_RANKS} BPE ranks, read {len(ranks)}")
    return ranks


def _build_backend(ranks: dict[bytes, int]):
    """A `tokenizers.Tokenizer` equivalent to Qwen3's tokenizer.json, from the raw BPE ranks."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # heavy: tasks/ stays light

    byte_encoder = bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_encoder[c] for c in b)

    vocab = {as_str(tok): rank for tok, rank in ranks.items()}
    # Ranks are merge order. The merge that creates a token is the last step of BPE run on the
    # token's own bytes with every lower rank: that split is the entry Qwen's merges list holds
    # (151,387 of them = 151,643 ranks − 256 single bytes).
    merges = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        parts = [tok[i : i + 1] for i in range(len(tok))]
        while len(parts) > 2:
            best_i, best_r = -1, rank
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best_r:
                    best_i, best_r = i, r
            if best_i < 0:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) == 2:
            merges.append((rank, as_str(parts[0]), as_str(parts[1])))
    merges.sort()
    tk = Tokenizer(BPE(vocab, [(a, b) for _, a, b in merges], fuse_unk=False, byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    tk.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in ADDED_TOKENS])
    return tk


def qwen3_tokenizer_dir() -> Path:
    """Directory holding the cached offline Qwen3 tokenizer (built on first use)."""
    out = cache_dir() / "tokenizers" / "qwen3"
    if (out / "tokenizer.json").is_file():
        return out
    from transformers import PreTrainedTokenizerFast  # heavy: tasks/ stays light

    backend = _build_backend(_load_ranks(ensure_asset("qwen-tiktoken")))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=40_960,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=NON_THINKING_TEMPLATE,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".qwen3-"))
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: a concurrent builder that lost the race keeps its own copy
    except OSError:
        if not (out / "tokenizer.json").is_file():
            raise
    return out


def load_qwen3_tokenizer():
    """The offline Qwen3 tokenizer as a transformers fast tokenizer (no hub access)."""
    from transformers import AutoTokenizer  # heavy: tasks/ stays light

    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    tok.chat_template = NON_THINKING_TEMPLATE
    return tok


def is_qwen3(tokenizer) -> bool:
    """True for any tokenizer with Qwen3's think tokens (hub Qwen3 or our offline build)."""
    # convert_tokens_to_ids is a dict lookup; get_vocab() would rebuild 151k entries per call.
    return tokenizer.convert_tokens_to_ids("<think>") == THINK_ID and (
        tokenizer.convert_tokens_to_ids("</think>") == END_THINK_ID
    )


def chat_messages(
    question: str, answer: str | None = None, system: str | None = None
) -> list[dict[str, str]]:
    """The conversation spellxfer asks a question in: an optional system turn, the question as the
    user turn and, when ``answer`` is given, the answer as the assistant turn.

    :func:`format_prompt` renders it without the answer (what training and evaluation prompt
    with); ``data build --chat_export true`` writes it with the answer (the training target).
    """
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def format_prompt(tokenizer, question: str, system: str | None = None) -> str:
    """Render one user question as the text a model continues from (see :func:`format_chat`)."""
    return format_chat(tokenizer, chat_messages(question, system=system))


def format_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """Render a conversation (``role`` / ``content`` dicts, ending with a user turn) as the text a
    model continues from.

    Qwen3 (hub or offline) always gets our non-thinking template, even when the tokenizer came
    with the official one: it renders the same string with ``enable_thinking=False`` and cannot
    render anything else. Other models use their own chat template.
    """
    if is_qwen3(tokenizer):
        return tokenizer.apply_chat_template(
            messages, chat_template=NON_THINKING_TEMPLATE, tokenize=False, add_generation_prompt=True
        )
    if not tokenizer.chat_template:
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template; spellxfer needs an instruct model"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_token_ids(tokenizer, conversations: Sequence[list[dict[str, str]]]) -> list[list[int]]:
    """Token ids of each conversation's prompt (the text :func:`format_chat` renders), in which only
    the chat template makes control tokens.

    Message content is tokenized as plain text: ``<|im_end|>``, ``<|im_start|>`` or ``<think>``
    typed into a message become the characters they are made of, so content can never end its
    turn, fake another one or open a think block. That is ``split_special_tokens`` semantics,
    extended to every added token — ``split_special_tokens`` alone would still match Qwen3's
    ``<think>``, which is an added token but not a "special" one.

    A conversation whose content holds no added-token string (every evaluation prompt) is the
    rendered prompt tokenized whole: the same ids as before this function existed. Any other is
    tokenized piece by piece — the template's text with the tokenizer, each content with a copy
    of the tokenizer that has no added tokens — so its ids may differ from whole-string
    tokenization at a piece boundary (whitespace that opens a message), never in the text.
    """
    added, plain, added_ids = _added_tokens(tokenizer)
    out: list[list[int] | None] = [None] * len(conversations)
    whole = [
        i for i, conv in enumerate(conversations)
        if added is None or not any(added.search(m["content"]) for m in conv)
    ]
    if whole:
        prompts = [format_chat(tokenizer, conversations[i]) for i in whole]
        for i, ids in zip(whole, tokenizer(prompts, add_special_tokens=False)["input_ids"]):
            out[i] = ids
    for i, conv in enumerate(conversations):
        if out[i] is None:
            out[i] = _piecewise_ids(tokenizer, conv, plain, added_ids)
    return out


def plain_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as plain text, the way :func:`chat_token_ids` tokenizes message
    content: an added-token string in it (``<|im_end|>``) is just its characters. For text that
    continues a rendered prompt (the likelihood probe's answer frame)."""
    _, plain, added_ids = _added_tokens(tokenizer)
    ids = plain.encode(text, add_special_tokens=False).ids
    if added_ids.intersection(ids):  # a vocabulary whose merges spell a control token
        raise ValueError("text tokenizes to a control token even as plain text")
    return ids


_ADDED_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _added_tokens(tokenizer):
    """(a regex for any added-token string or None, a copy of the tokenizer without added tokens,
    the added tokens' ids), built once per tokenizer."""
    if tokenizer not in _ADDED_TOKENS:
        vocab = tokenizer.get_added_vocab()  # special and not: <think> is an added, non-special token
        longest_first = sorted(vocab, key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, longest_first))) if vocab else None
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec["added_tokens"] = []
        _ADDED_TOKENS[tokenizer] = (pattern, Tokenizer.from_str(json.dumps(spec)), frozenset(vocab.values()))
    return _ADDED_TOKENS[tokenizer]


def _piecewise_ids(tokenizer, conv: list[dict[str, str]], plain, added_ids: frozenset[int]) -> list[int]:
    if is_qwen3(tokenizer):
        # The non-thinking template drops an assistant turn's reasoning; do it here, so that the
        # content put back between the template's pieces is the text the template would render.
        conv = [
            {**m, "content": m["content"].split("</think>")[-1].lstrip("\n")}
            if m["role"] == "assistant" else m
            for m in conv
        ]
    marks = {f"\x00{secrets.token_hex(8)}\x00": m["content"] for m in conv}
    skeleton = format_chat(tokenizer, [{**m, "content": mark} for m, mark in zip(conv, marks)])
    pieces = re.split("(" + "|".join(map(re.escape, marks)) + ")", skeleton)
    if sorted(p for p in pieces if p in marks) != sorted(marks):
        raise ValueError(
            f"{type(tokenizer).__name__}'s chat template does not render each message's content once"
        )
    ids: list[int] = []
    for piece in pieces:
        if piece in marks:
            content = plain.encode(marks[piece], add_special_tokens=False).ids
            if added_ids.intersection(content):  # a vocabulary whose merges spell a control token
                raise ValueError("message content tokenizes to a control token even as plain text")
            ids += content
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    if "".join(marks.get(p, p) for p in pieces) != format_chat(tokenizer, conv):
        raise ValueError(
            f"{type(tokenizer).__name__}'s chat template rewrites message content; "
            "cannot keep it plain text"
        )
    return ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn (generation stops at any of them)."""
    ids = []
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        i = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i >= 0:
            ids.append(i)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
