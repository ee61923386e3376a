"""zili: run, compress and serve open-weight LLMs on the hardware you have."""

from zili.errors import ZiliError
from zili.llm import LLM
from zili.outputs import CompletionOutput, RequestOutput
from zili.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "ZiliError"]
__version__ = "0.1.0"
