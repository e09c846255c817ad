"""Known third-party warnings and tips, silenced while one spellxfer command runs.

Libraries under us warn about their own upcoming API changes, or advertise products, in lines a
user of spellxfer can do nothing about and that say nothing about the run — yet they sit in
stderr beside the lines that do. :func:`quiet_third_party` filters exactly those (message, category
and the module the warning is raised from) and only while a command runs: ``python -m spellxfer``
enters it (:func:`spellxfer.cli.main`) and restores every filter and logger on the way out.
Importing spellxfer as a library changes nothing: a user's own code keeps the warnings it asked
for. Each entry below says where its line comes from; remove it when that library stops.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (message regex, category, module regex the warning is attributed to; "" for any).
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # transformers 5.2x renamed the decoder's `past_key_values` argument to `cache`, warning on
    # every old-style call (PEFT's and older callers'), attributed to whichever module called.
    (r"`past_key_values` is deprecated .*Use `cache` instead", FutureWarning, ""),
    # transformers 5.x renamed the property; PEFT still reads it whenever it wraps a model.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\."),
    # torch 2.1x deprecated LeafSpec; Lightning 2.6's own pytree helper still uses it.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\."),
    # The run directory is the checkpoint directory and holds the manifest, logs and W&B files
    # from the start, so it is never empty; a resume re-uses it on purpose.
    (r"Checkpoint directory .* exists and is not empty", UserWarning, r"lightning\."),
    # A resumed fit's CSV logger restarts metrics.csv, and puts the rows before the resume point
    # back in itself (WhitelistedCSVLogger.discard_from): nothing is lost.
    (r"Experiment logs directory .* exists and is not empty", UserWarning, r"lightning\."),
    # The DataModule saves and restores its in-epoch position itself (state_dict /
    # load_state_dict), which Lightning's check for a resumable *dataloader* does not see.
    (r".*your dataloader is not resumable", UserWarning, r"lightning\."),
    # Lightning's summary counts parameters in float32 for any bf16 model: a size estimate, not
    # a precision problem (enable_model_summary: false hides the table itself).
    (r"Precision .* is not supported by the model summary", UserWarning, r"lightning\."),
)

# Lightning's info lines go through these loggers (rank-zero only); the `💡 Tip:` ones advertise
# litlogger / litmodels.
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
# "Seed set to N": the seed is in the saved config, and the line would come before the one
# `error: …` line of a config mistake caught after seeding.
SEED_LOGGER = "lightning.fabric.utilities.seed"
# Hugging Face's tqdm bars ("Loading weights", downloads) redraw one line with carriage returns: in
# a log file they pile up into one long line. Our own progress lines cover that work, so when
# stderr is not a terminal they are off for the command (unless the user set the variable).
HF_BARS = "HF_HUB_DISABLE_PROGRESS_BARS"


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """Within the block, :data:`KNOWN_WARNINGS` are ignored, Lightning's tips are dropped, its
    seed line is not printed and, off a terminal, Hugging Face's progress bars are off;
    everything is as before once it ends."""
    tips = _DropTips()
    info = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    seed = logging.getLogger(SEED_LOGGER)
    seed_level = seed.level
    bars_off = not sys.stderr.isatty() and HF_BARS not in os.environ
    if bars_off:  # read when transformers is imported, which a command does inside this block
        os.environ[HF_BARS] = "1"
    with warnings.catch_warnings():
        for message, category, module in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        for logger in info:
            logger.addFilter(tips)
        seed.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger in info:
                logger.removeFilter(tips)
            seed.setLevel(seed_level)
            if bars_off:
                os.environ.pop(HF_BARS, None)
