"""zili: run, compress and serve open-weight LLMs on the hardware you have."""

import os as _os
import sys as _sys

# OpenMP (libgomp, PyTorch's CPU thread pool) keeps its threads spinning for ~300k iterations after
# every parallel region. After the small PyTorch ops between zili's kernel calls (sampling, decode steps
# that run the Python model) that spin takes a core from zili's own kernel threads
# (zili/kernels/cpu/pool.h): LLM.generate on a batch of 16 ran ~10% slower with it, measured while its
# logits still went through PyTorch ops (the fused decode step now computes them and the greedy argmax).
# A short spin still bridges back-to-back prefill ops, where sleeping threads (OMP_WAIT_POLICY=PASSIVE)
# cost ~10%. OpenMP reads this once, when torch loads it, so it
# applies only when zili is imported before torch; the user's own OpenMP settings win.
if "torch" not in _sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & _os.environ.keys():
    _os.environ["GOMP_SPINCOUNT"] = "30000"

from zili.errors import ZiliError
from zili.llm import LLM
from zili.outputs import CompletionOutput, RequestOutput
from zili.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "ZiliError"]
__version__ = "0.1.0"
