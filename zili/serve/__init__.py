"""The OpenAI-compatible HTTP server and web chat page (`zili serve`).

The HTTP process (FastAPI + uvicorn) validates, tokenizes and streams; the engine runs in a
child process (engine_process.py / engine_worker.py) so the event loop never competes with the
compute threads. See docs in each module; requirements: docs/RELIABILITY.md.
"""
