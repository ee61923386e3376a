"""Install the benchmark-only tools and build the peers (llama.cpp, transformers) on a fresh machine.

Nothing here is a dependency of the zili package: the pip packages go into the current
interpreter's environment only for benchmarking, and llama.cpp is built under benchmarks/work/.

    python benchmarks/setup_peers.py            # idempotent; skips what is already there
    python benchmarks/setup_peers.py --jobs 2 --nice 19

llama.cpp comes from the `llama-cpp-python` source package on PyPI, which vendors a full
llama.cpp tree (convert_hf_to_gguf.py, gguf-py, llama-quantize, llama-bench, llama-server).
It is built with AVX-512 flags and without AMX (its AMX path crashed on the reference machine
kind, see docs PERFORMANCE.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
WORK_DIR = BENCH_DIR / "work"
PEERS_DIR = WORK_DIR / "peers"
LLAMA_TARGETS = ("llama-quantize", "llama-bench", "llama-server")
# The source package whose vendored llama.cpp the harness was checked with; --llama-cpp-python overrides.
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"

# import name -> pip requirement; benchmark-only, never zili dependencies.
BENCH_PACKAGES = {
    "sentencepiece": "sentencepiece",  # the benchmark tokenizer.model (llama.cpp converts it without a hash)
    "matplotlib": "matplotlib",        # the chart in docs/benchmarks.png
    "transformers": "transformers>=4.51,<5",  # checkpoint creation and the transformers peer
    "google.protobuf": "protobuf",     # transformers' tokenizer.model -> tokenizer.json conversion
    # convert_hf_to_gguf.py puts its own gguf-py on sys.path; these are gguf-py's requirements.
    "yaml": "pyyaml",
    "requests": "requests",
}
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
    "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
    "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # no network at build time
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
)


def log(message: str) -> None:
    print(f"[setup_peers] {message}", flush=True)


def pip_install(*requirements: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *requirements], check=True)


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package of a dotted name
        return False


def ensure_python_packages() -> None:
    missing = [req for name, req in BENCH_PACKAGES.items() if not has_module(name)]
    if tool_path("py-spy") is None:
        missing.append("py-spy")  # sampling profiler for benchmarks/profile_decode.py --py-spy
    if missing:
        log(f"pip install {' '.join(missing)}")
        pip_install(*missing)


def ensure_build_tools() -> None:
    """cmake (and ninja if possible) from pip when the system has none; a C++ compiler is required."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        raise SystemExit("no C++ compiler found: install one (e.g. `apt-get install -y build-essential`)")
    wanted = [tool for tool in ("cmake", "ninja") if shutil.which(tool) is None and not _venv_tool(tool)]
    if wanted:
        log(f"pip install {' '.join(wanted)}")
        pip_install(*wanted)


def _venv_tool(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def tool_path(name: str) -> str | None:
    return shutil.which(name) or _venv_tool(name)


def llama_cpp_source(requirement: str = LLAMA_CPP_PYTHON) -> Path:
    """Download (once) the llama-cpp-python sdist and return its vendored llama.cpp folder."""
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    trees = sorted(PEERS_DIR.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if trees:
        return trees[-1].parent
    archives = sorted(PEERS_DIR.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        log("downloading the llama-cpp-python source package from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        requirement, "-d", str(PEERS_DIR)], check=True)
        archives = sorted(PEERS_DIR.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archives[-1]) as archive:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse unsafe members
            archive.extractall(PEERS_DIR, filter="data")
        else:
            archive.extractall(PEERS_DIR)
    return sorted(PEERS_DIR.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))[-1].parent


def llama_bin_dir(source: Path) -> Path:
    return source / "build" / "bin"


def build_llama_cpp(source: Path, jobs: int, nice: int) -> None:
    bin_dir = llama_bin_dir(source)
    if all((bin_dir / target).exists() for target in LLAMA_TARGETS):
        return
    build_dir = source / "build"
    cmake = tool_path("cmake")
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={tool_path('ninja')}"] if tool_path("ninja") else []
    niced = ["nice", "-n", str(nice)] if shutil.which("nice") else []
    log(f"configuring llama.cpp in {build_dir}")
    subprocess.run([cmake, "-S", str(source), "-B", str(build_dir), *generator, *CMAKE_FLAGS], check=True)
    log(f"building {' '.join(LLAMA_TARGETS)} with {jobs} jobs (this takes a while on few cores)")
    subprocess.run(
        [*niced, cmake, "--build", str(build_dir), "--config", "Release", "-j", str(jobs),
         "--target", *LLAMA_TARGETS],
        check=True,
    )


def peer_paths() -> dict:
    """Where the peers live once set up (used by the harness)."""
    trees = sorted(PEERS_DIR.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not trees:
        return {}
    source = trees[-1].parent
    bins = {t: str(llama_bin_dir(source) / t) for t in LLAMA_TARGETS}
    return {"llama_cpp_source": str(source), "llama_cpp_version": source.parents[1].name.split("-")[-1],
            "convert": str(source / "convert_hf_to_gguf.py"), **bins}


def peers_ready() -> bool:
    paths = peer_paths()
    return bool(paths) and all(Path(paths[t]).exists() for t in LLAMA_TARGETS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the compile")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="only install the pip tools")
    parser.add_argument("--llama-cpp-python", default=LLAMA_CPP_PYTHON, help="pip requirement of the source package")
    args = parser.parse_args(argv)
    # tools pip puts next to the interpreter (cmake, ninja, py-spy) must be found by subprocesses
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    ensure_python_packages()
    if not args.skip_llama_cpp:
        ensure_build_tools()
        source = llama_cpp_source(args.llama_cpp_python)
        build_llama_cpp(source, args.jobs, args.nice)
    log(json.dumps(peer_paths(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
