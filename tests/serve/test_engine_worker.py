"""The engine process's Worker, in this process: what it leaves behind once the model is loaded."""

from __future__ import annotations

import asyncio
import gc
import json

from zili.serve.engine_worker import Worker


class _Pipe:
    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def test_the_loaded_heap_is_frozen_out_of_the_collectors_reach(serve_model):
    """After load, a full collection walks only what was allocated since (a few objects), not the
    model and its libraries: gc.freeze moved them to the permanent generation."""
    pipe = _Pipe()
    assert gc.get_freeze_count() == 0

    async def load() -> bool:
        worker = Worker({"model": str(serve_model), "dtype": "float32"}, pipe)
        loaded = worker.load()
        worker.flush()
        await worker.engine.shutdown()
        return loaded

    try:
        assert asyncio.run(load())
        frozen = gc.get_freeze_count()
        tracked = len(gc.get_objects())
    finally:
        gc.unfreeze()
    assert json.loads(pipe.data.splitlines()[0])["op"] == "ready"
    assert frozen > 10_000  # torch alone holds tens of thousands of container objects
    assert tracked < frozen // 10
