"""One real stack (every service a subprocess) shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.e2e.browser import browser  # noqa: F401 - the dashboard tests' fixture
from tests.e2e.harness import Stack, Trader
from tests.support.postgres import open_to_postgres


@pytest.fixture(scope="session")
def e2e_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("e2e-stack")
    open_to_postgres(run_dir)
    stack = Stack(run_dir).up()
    yield stack
    stack.down()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


@pytest.fixture
async def trader(e2e_stack: Stack, http: aiohttp.ClientSession) -> Trader:
    return await Trader(http, e2e_stack).sign_up()
