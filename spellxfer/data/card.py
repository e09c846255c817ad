"""The dataset card (``README.md``) of a ``data build`` directory.

A Hugging Face dataset card: a YAML header that ``datasets`` and the Hub read — ``configs``
(which file is which split) and ``dataset_info`` (the fixed Features of
:mod:`spellxfer.data.schema` and every split's row count) — then prose for people: what each split
is for, its size, the seed and profile, the policy (trained on spelling, evaluated on position and
count only), the leak-freedom rules and where the words come from, with their license.

With the header, ``datasets.load_dataset(build_dir)`` loads every split with the fixed Features,
and checks each split's row count against the card (a truncated file fails to load). The card
holds nothing that changes between two builds with the same seed, so builds stay byte-identical.
"""

from __future__ import annotations

import datasets
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCard, DatasetCardData

from spellxfer.data.schema import CHAT_FEATURES, COLUMNS, FEATURES

PURPOSE = {
    "spelling_train": "training (`fit`): spelling questions only",
    "control_train": "the control arm's training (`fit --data.train_set control`): row for row the same "
                     "words with no letter-level structure (repeated, case changed); a control, not spelling",
    "position_val": "validation during `fit` (checkpoint selection, early stopping)",
    "count_val": "validation during `fit` (checkpoint selection, early stopping)",
    "position_test": "the test set (`evaluate`)",
    "count_test": "the test set (`evaluate`)",
    "fewshot_pool": "solved examples for `evaluate --shots K`, about words of their own; never asked",
}
"""What each split (file stem) is for, as the card's splits table says it."""

# The Hub's size buckets, by the rows of the default config.
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))


def dataset_card(manifest: dict, files: list[str], chat_file: str | None = None) -> str:
    """The ``README.md`` text of a build.

    Args:
        manifest: the build's manifest (profile, seed, version, sources, rows and distinct words
            per file).
        files: the JSONL files of the default config, in split order (split name = file stem).
        chat_file: the chat-format export of the training split (config ``chat``), if written.
    """
    rows = manifest["rows"]
    configs = {"default": ({f.removesuffix(".jsonl"): f for f in files}, FEATURES)}
    if chat_file:
        configs["chat"] = ({"spelling_train": chat_file}, CHAT_FEATURES)
    infos = DatasetInfosDict()
    for name, (splits, features) in configs.items():
        sizes = datasets.SplitDict()
        for split, f in splits.items():
            sizes.add(datasets.SplitInfo(name=split, num_examples=rows[f]["total"]))
        infos[name] = datasets.DatasetInfo(features=features, splits=sizes)
    total = sum(rows[f]["total"] for f in files)
    header = DatasetCardData(
        pretty_name=("spellxfer: spelling to train on, position and count to evaluate "
                     f"({manifest['profile']}, seed {manifest['seed']})"),
        language=["en"],
        license="cc-by-sa-4.0",
        task_categories=["text-generation"],
        tags=["spelling", "character-level", "tokenization", "transfer"],
        size_categories=[next(name for limit, name in _SIZES if total < limit)],
        configs=[{"config_name": name, "data_files": [{"split": s, "path": f} for s, f in splits.items()]}
                 for name, (splits, _) in configs.items()],
    )
    infos.to_dataset_card_data(header)  # `dataset_info`: the Features and row counts, as datasets writes them
    prose = _prose(manifest, configs["default"][0], chat_file)
    card = DatasetCard(f"---\n{header.to_yaml()}\n---\n\n{prose}")
    return str(card)


def _prose(manifest: dict, splits: dict[str, str], chat_file: str | None) -> str:
    profile, seed, rows = manifest["profile"], manifest["seed"], manifest["rows"]
    command = f"python -m spellxfer data build --out DIR --profile {profile} --seed {seed}"
    if chat_file:
        command += " --chat_export true"
    table = ["| split | file | for | rows | rows by subtask | distinct words |", "|---|---|---|---|---|---|"]
    for split, f in splits.items():
        by_subtask = ", ".join(f"`{k}` {v:,}" for k, v in rows[f].items() if k != "total")
        table.append(f"| `{split}` | `{f}` | {PURPOSE[split]} | {rows[f]['total']:,} | {by_subtask} | "
                     f"{manifest['distinct_words'][f]:,} |")
    if chat_file:
        table.append(f"| `spelling_train` (config `chat`) | `{chat_file}` | the training split as chat "
                     f"`messages`, line for line | {rows[chat_file]['total']:,} | | |")
    fields = ["| field | type | meaning |", "|---|---|---|"]
    fields += [f"| `{name}` | {dtype} | {meaning} |" for name, (dtype, meaning) in COLUMNS.items()]
    chat = (
        f"\n`{chat_file}` (config `chat`) holds the same training rows in the conversational format "
        "trainers such as TRL's `SFTTrainer` read: `{\"messages\": [{\"role\": \"user\", \"content\": "
        "question}, {\"role\": \"assistant\", \"content\": answer}]}`, line N of it being line N of "
        "`spelling_train.jsonl`. Rendered with the model's chat template (Qwen3: the non-thinking form, "
        "an empty think block before the answer), it is the text spellxfer's trainer trains on.\n"
        if chat_file
        else ""
    )
    sources = manifest["sources"]
    return f"""# spellxfer data ({profile}, seed {seed})

Built with spellxfer {manifest['spellxfer_version']}, profile `{profile}`, seed {seed}, by

```bash
{command}
```

which gives byte-identical files each time it runs; `manifest.json` holds the `sha256` of each.

**Trained on spelling, evaluated on position and count only.** The training split holds nothing
but spelling questions (spell a word, spell it backwards, number its letters, name the word
spelled out); the evaluation splits hold nothing but position questions (the n-th letter, where a
letter first appears) and count questions (how many letters, how many times a letter occurs)
about words the training split never contains. The question they answer: does learning to spell
transfer to knowing where a word's letters are and how many there are?

`control_train` is the study's **control**, not a spelling split: row for row the words of
`spelling_train`, in tasks with no letter-level structure (`repeat`: the word two or three times;
`case`: the word in capitals, or back to lowercase). Trained on instead of spelling, it measures
what fine-tuning of the same size does without any spelling. It holds no position or count
question either.

## Splits

{chr(10).join(table)}
{chat}
## Loading

```python
from datasets import load_dataset

ds = load_dataset("DIR")  # every split above, with the Features of this card's header
```

`load_dataset("json", data_files={{...}})` over files of your own choosing needs
`features=spellxfer.data.schema.FEATURES`: JSON cannot type a null, and `position` is null in
every count and training row.

## Fields

Every split has the same fields. Training rows leave out the evaluation-only ones, and
evaluation rows leave out `separator`; left out, a field loads as null.

{chr(10).join(fields)}

## Leak-freedom

Validation, test and few-shot pool words are pairwise disjoint. None of them is a training word
or the reversal of one, and no training row contains one as a word (in any case) or spells one
out, forwards or backwards. `python -m spellxfer data check --data DIR` checks this again from the
files.

## Sources and license

- English words: {sources['english_words']}. Training words are the
  {sources['training_words']}: vocabulary entries whose lowercase form is in wordfreq's top
  100,000 English words. Evaluation words come from its top 150,000, which also tells `english`
  from `nonce`. wordfreq's word-list data is redistributable under the Creative Commons
  Attribution-ShareAlike 4.0 license, so this dataset is marked `cc-by-sa-4.0`: credit wordfreq
  (Robyn Speer, rspeer/wordfreq, doi:10.5281/zenodo.7199437) and the sources its README lists.
- Nonce words: pronounceable letter strings drawn from the seed, in no word list.
- Tokenizer: {sources['tokenizer']} (Apache-2.0). It decides the training words and counts
  `n_tokens`.
"""
