"""The clients' tests run against the real loopback server of tests/server (one per test module)."""

from __future__ import annotations

from tests.server.conftest import server  # noqa: F401 - the fixture, for this folder's modules
