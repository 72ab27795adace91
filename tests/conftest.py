"""Shared pytest fixtures. Keep this file small and generic, and torch-free at import time
(the CLI tests check that some commands never import torch)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    """The repository root (the folder holding pyproject.toml)."""
    return REPO_ROOT


@pytest.fixture
def cli_runner():
    """A Typer CliRunner; `result.stdout` and `result.stderr` are kept apart."""
    from typer.testing import CliRunner

    return CliRunner()
