"""One real stack (every service a subprocess) shared by the end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.harness import Stack, Trader


def _open_dirs(path: Path) -> None:
    for parent in [path, *path.parents]:
        if str(parent) in ("/", "/tmp"):
            break
        os.chmod(parent, 0o755)


@pytest.fixture(scope="session")
def e2e_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("e2e-stack")
    _open_dirs(run_dir)
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
