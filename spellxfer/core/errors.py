"""The one exception type for mistakes a user can make (config, data file, request, CLI flag).

The CLI turns it into a single ``error: …`` line on stderr and exit code 2; everything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class SpellxferError(Exception):
    """A user-caused problem. The message names what is wrong and where (file, line, key).

    ``key``: the config key at fault (``model.lora_r``), when there is one; the fit CLI adds the
    config file or flag that set it.
    """

    exit_code = 2

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key
