"""`zili serve` refuses unsafe or malformed weights cleanly (RELIABILITY item 19).

The loader's own tests cover every lying header; here the server path: each bad folder makes
`zili serve` exit with status 1 and one clear error line, no traceback, no process left behind.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from conftest import REPO


def bad_folder(serve_model, root, kind: str):
    folder = root / kind
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(serve_model / name, folder / name)
    if kind == "pickle-only":
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
        return folder, "pickle"
    if kind == "header-longer-than-file":
        raw = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", 10_000) + raw + b"\0" * 8)
        return folder, "header claims"
    if kind == "overlapping-offsets":
        raw = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
        return folder, "overlap"
    raise ValueError(kind)


def serve_and_wait(folder) -> tuple[int, str, list]:
    proc = subprocess.Popen([sys.executable, "-m", "zili.cli", "serve", str(folder), "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children = []
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    output, _ = proc.communicate(timeout=120)
    return proc.returncode, output, children


@pytest.mark.parametrize("kinds", [("pickle-only", "header-longer-than-file", "overlapping-offsets")])
def test_bad_weights_fail_cleanly(serve_model, tmp_path, kinds):
    cases = [bad_folder(serve_model, tmp_path, kind) for kind in kinds]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda case: serve_and_wait(case[0]), cases))
    for (folder, expected), (code, output, children) in zip(cases, results):
        assert code == 1, output
        assert "error:" in output and expected in output, output
        assert "Traceback" not in output
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
