"""Sequence-length curriculum: short rows early in training, the full `data.seq_len` later, at the same tokens/step.

`train.seq_len_schedule = "0:64,1000:128,4000:256"` (with data.seq_len 256): rows of 64 tokens from step 0, of 128
from step 1000, of 256 from step 4000. The pipeline always packs windows of data.seq_len; each [B, T] batch leaves
here cut into [B·T/t, t] rows of the stage's length t, every row keeping its own targets and loss weights. So the
data stream, its checkpointed position and the tokens per step are those of a run without a curriculum, and the
length at a step is a function of the step alone: a resume across a stage boundary is exact. Each stage's shape
compiles the train step once; evaluation stays at data.seq_len. (MFU uses the FLOPs per token of data.seq_len, so
it reads slightly high while rows are shorter.)
"""

from __future__ import annotations

import bisect

import ml_collections
import numpy as np

from mantis_jax.config import seq_len_schedule


class Curriculum:
    def __init__(self, config: ml_collections.ConfigDict):
        self.stages = seq_len_schedule(config)
        self.full = config.data.seq_len

    def seq_len_at(self, step: int) -> int:
        """The row length of step `step` (0-based: the step about to run)."""
        i = bisect.bisect_right([s for s, _ in self.stages], step) - 1
        return self.stages[i][1]

    def cut(self, batch: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        """[B, T] arrays -> [B·T/t, t] rows of the step's length t (whole windows when t = T)."""
        t = self.seq_len_at(step)
        if t == self.full:
            return batch
        return {k: v.reshape((-1, t) + v.shape[2:]) for k, v in batch.items()}
