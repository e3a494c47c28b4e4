"""The engine's parts a checkpoint has, attached to an evaluation: factworld systems per policy, and the critic.

Without them every task evaluates the LM alone, and the report says so in its notes.
"""

from __future__ import annotations

from typing import TextIO

LM_ALONE = ("the checkpoint has no engine parts (no retrieval encoder, controller or critic): evaluating the LM "
            "alone (factworld: attention only)")


def attach(ctx, checkpoint: str, out: TextIO) -> None:
    ctx.notes.append(LM_ALONE)
