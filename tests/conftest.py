"""Shared pytest fixtures. Fixture modules per component are registered here."""

from __future__ import annotations

pytest_plugins: list[str] = []
