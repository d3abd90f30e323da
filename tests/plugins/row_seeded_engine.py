"""A test engine whose samples depend only on (prompt, sample index, call number), not on how the
rows are split over processes: so 1 process with B rows and 2 with B/2 draw the same CoTs, which
is what the data-parallel invariance tests need. Loaded as `engine=row_seeded_engine:RowSeededSampler`.

`KillingSampler` is the built-in sampler, except that with REFTUNE_TEST_KILL_AT_CALL=N it SIGKILLs
its whole process group at its N-th sampling call on rank 0 (of this process's life): a kill in the
middle of a step, for resume tests.
"""

from __future__ import annotations

import os
import signal
import zlib

from reftune.engines.base import concat_rollouts
from reftune.engines.cached import CachedSampler


class RowSeededSampler(CachedSampler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def generate(self, prompts, *, num_samples=1, greedy=False, temperature=1.0, top_p=1.0, max_new_tokens=256):
        if greedy:
            return super().generate(prompts, num_samples=num_samples, greedy=True, max_new_tokens=max_new_tokens)
        self.calls += 1
        parts = []
        for i, prompt in enumerate(prompts):
            for j in range(num_samples):
                self.rng.manual_seed(zlib.crc32(f"{prompt}|{j}|{self.calls}".encode()))
                parts.append(self._generate_batch([prompt], [i], False, temperature, top_p, max_new_tokens))
        return concat_rollouts(parts, self.tokenizer.pad_token_id)


class KillingSampler(CachedSampler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def generate(self, prompts, **kwargs):
        if not kwargs.get("greedy"):
            self.calls += 1
            if self.calls == int(os.environ.get("REFTUNE_TEST_KILL_AT_CALL", "0")) and os.environ.get("RANK", "0") == "0":
                os.killpg(os.getpgid(0), signal.SIGKILL)
        return super().generate(prompts, **kwargs)
