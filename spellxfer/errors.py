"""The one exception type for mistakes a user can make (config, data file, request, CLI flag).

The CLI turns it into a single ``error: …`` line on stderr and exit code 2; everything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class SpellxferError(Exception):
    """A user-caused problem. The message names what is wrong and where (file, line, key)."""

    exit_code = 2
