"""Helpers for the training tests: a learnable synthetic corpus and a very small config.

The corpus is sentences from a tiny seeded grammar, so a model a few hundred thousand
parameters big learns it within a few dozen steps (the loss has somewhere to go).
"""

from __future__ import annotations

import random
from pathlib import Path

from zili.train.presets import PRESETS
from zili.train.trainer import TrainOptions

SUBJECTS = ["the king", "a lord", "my lady", "the fool", "good Romeo", "the queen", "this knight"]
VERBS = ["speaks to", "loves", "follows", "fears", "calls", "finds", "sees"]
OBJECTS = ["the moon", "his sword", "her ring", "the old man", "a letter", "the crown", "sweet Juliet"]
ENDINGS = [".", "!", "?", ", and weeps.", ", and laughs."]

# fast enough for a dozen steps in a test; fp32 so runs compare exactly
TEST_CONFIG = PRESETS["tiny"].with_overrides(vocab_size=300, hidden_size=32, intermediate_size=64,
                                             context_length=32, batch_size=4, max_steps=12, warmup_steps=2,
                                             eval_interval=6, checkpoint_interval=100, lr=1e-2)


def synthetic_text(num_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
        lines.append(sentence[0].upper() + sentence[1:])
    return "\n".join(lines) + "\n"


def options(corpus: Path, output: Path, val: Path | None = None, **overrides) -> TrainOptions:
    """TrainOptions for a quiet, deterministic test run (fp32, no progress bar, no samples)."""
    config_fields = {k: overrides.pop(k) for k in list(overrides) if hasattr(TEST_CONFIG, k)}
    values = dict(corpus=corpus, output=output, config=TEST_CONFIG.with_overrides(**config_fields),
                  val_file=val, precision="fp32", device="cpu", progress=False, sample_prompts=(),
                  save_dtype="float32")
    values.update(overrides)
    return TrainOptions(**values)
