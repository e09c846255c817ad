"""``python tests/gated_serve.py SERVE-FLAGS…``: ``spellxfer serve`` with a gate in the decode loop,
so that a test can hold generation and see what a client has received meanwhile.

While the file named by ``$SPELLXFER_TEST_GATE`` exists, the inference worker lets as many decode
steps through as the file says and then holds every further step until the file is removed. A
step held for 120 s goes on anyway and leaves ``<gate>.timed-out`` behind, which opens the gate for
good: a broken stream fails its test instead of hanging it. Without the file the server is
``spellxfer serve``, step for step.

The gate is installed in the worker's ``setup``: LitServe spawns its inference workers, which
import this file (as ``__mp_main__``) to unpickle :class:`GatedAPI`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from spellxfer.serving import api

HOLD_SECONDS = 120


def gated(pick, gate: Path):
    """``pick`` (the engine's per-step token choice) behind ``gate``."""
    passed, timed_out = 0, gate.with_suffix(".timed-out")

    def pick_behind_gate(logits, sampling):
        nonlocal passed
        if not gate.exists():
            passed = 0
        elif timed_out.exists():  # the test has failed already: let it finish
            pass
        elif passed >= int(gate.read_text() or 0):
            deadline = time.monotonic() + HOLD_SECONDS
            while gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            if gate.exists():
                timed_out.touch()
        else:
            passed += 1
        return pick(logits, sampling)

    return pick_behind_gate


class GatedAPI(api.SpellxferAPI):
    def setup(self, device):
        from spellxfer.models import generation

        super().setup(device)
        generation.pick_next_tokens = gated(
            generation.pick_next_tokens, Path(os.environ["SPELLXFER_TEST_GATE"])
        )


if __name__ == "__main__":
    from spellxfer.cli import main

    api.SpellxferAPI = GatedAPI  # what build_server instantiates
    sys.exit(main(["serve", *sys.argv[1:]]))
