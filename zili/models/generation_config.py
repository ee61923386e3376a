"""Defaults from a model folder's `generation_config.json` (EOS ids and sampling defaults)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class GenerationDefaults:
    eos_token_ids: list[int] = field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> "GenerationDefaults":
        path = Path(folder) / "generation_config.json"
        try:
            cfg = json.loads(path.read_text()) if path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            cfg = {}
        if not isinstance(cfg, dict):
            cfg = {}
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else [int(e) for e in eos])
        greedy = cfg.get("do_sample") is False
        return cls(
            eos_token_ids=eos_ids,
            temperature=0.0 if greedy else cfg.get("temperature"),
            top_p=None if greedy else cfg.get("top_p"),
            top_k=None if greedy else cfg.get("top_k"),
            repetition_penalty=cfg.get("repetition_penalty"),
            max_new_tokens=cfg.get("max_new_tokens"),
        )
