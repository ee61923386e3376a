"""zili shortens OpenMP's spin-wait when it is imported before torch (zili/__init__.py), never
overriding the user's own OpenMP settings, and cannot once torch has loaded OpenMP."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PRINT_SPIN = "import os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def spin_after(imports: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    result = subprocess.run([sys.executable, "-c", f"{imports}; {PRINT_SPIN}"], env={**clean, **env},
                            capture_output=True, text=True, timeout=120, check=True)
    return result.stdout.strip()


def test_zili_first_sets_a_short_spin():
    assert spin_after("import zili") == "30000 None"


def test_torch_first_is_left_alone():  # libgomp has read its settings already
    assert spin_after("import torch, zili") == "None None"


@pytest.mark.parametrize("env, expected", [({"OMP_WAIT_POLICY": "PASSIVE"}, "None PASSIVE"),
                                           ({"GOMP_SPINCOUNT": "5"}, "5 None")])
def test_the_users_settings_win(env, expected):
    assert spin_after("import zili", **env) == expected
