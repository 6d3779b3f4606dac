"""The Responses tests' engine: a fake whose chat template shows each turn's calls and the call a tool turn answers."""

from __future__ import annotations

import pytest

from tests.support.fake_engine import FakeEngine
from tests.support.responses import TOOLS_TEMPLATE


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(chat_template=TOOLS_TEMPLATE)
