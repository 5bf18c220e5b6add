"""benchmarks/table4.py, whose printed figures docs/table4.md quotes: its spectrum measures
are right on matrices whose answer is known, and its quick run still works."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table4():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("table4")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_energy_rank_and_spectrum_on_a_known_matrix(table4):
    # singular values 4, 2, 1, 1 (energies 16, 4, 1, 1 of 22), rotated so that none is obvious
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.normal(size=(6, 4)))
    V, _ = np.linalg.qr(rng.normal(size=(5, 4)))
    M = U @ np.diag([4.0, 2.0, 1.0, 1.0]) @ V.T
    s = np.array([4.0, 2.0, 1.0, 1.0])
    assert table4.energy_rank(s, 0.70) == 1  # 16/22 = 0.727
    assert table4.energy_rank(s, 0.90) == 2  # 20/22 = 0.909
    assert table4.energy_rank(s, 0.95) == 3  # 21/22 = 0.955
    found = table4.spectrum(M, r=2)
    assert found["directions_90"] == 2 and found["directions_99"] == 4
    assert found["stable_rank"] == pytest.approx(22 / 16)
    assert found["best_rank_2_share"] == pytest.approx(20 / 22)


def test_the_quick_run_writes_what_the_page_reads(table4, tmp_path):
    result = table4.main(["--quick", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "table4.json").read_text())
    assert written["benchmark"] == "table4" and written["quick"] is True
    assert [r["run"] for r in result["runs"]] == ["full", "r=4", "r=64"]
    assert result["rank_needed"] in (None, 4, 64)
    for label in ("full", "r=64"):
        assert len(result["spectra"][label]) == 4  # q_proj and v_proj of both blocks
        for measures in result["spectra"][label].values():
            assert 1 <= measures["directions_90"] <= measures["directions_99"] <= 64
    page = (ROOT / "docs" / "table4.md").read_text()
    assert "python benchmarks/table4.py" in page
