"""spellxfer: does fine-tuning an LLM to *spell* transfer to character *position* and *count* questions?

Training uses spelling data only; evaluation is position and count only, scored by generation and
answer parsing. See README.md and docs/.
"""

__version__ = "0.1.0"
