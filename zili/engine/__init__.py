"""The serving engine: paged KV cache, continuous batching, prefix caching, batched sampling.

Importing this package has no side effects (no threads, no devices touched).
"""

from zili.engine.async_engine import AsyncLLMEngine
from zili.engine.llm_engine import EngineStepError, LLMEngine
from zili.engine.metrics import EngineMetrics

__all__ = ["AsyncLLMEngine", "EngineMetrics", "EngineStepError", "LLMEngine"]
