"""Shared fixtures: real speech clips and one process-wide Analyzer (loading ASR costs ~1 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess-a01-18"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def analyzer():
    from app.analysis.analyzer import AnalyzerSpec

    return AnalyzerSpec(device="cpu", cpu_threads=2).build()
