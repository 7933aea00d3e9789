"""Offline, fast: tiny random models saved to temporary folders, no network (sockets off per test)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config: pytest.Config) -> None:
    # NOTE: the async contract tests are plain `async def` functions: they need
    # pytest-asyncio's auto mode, which this keeps when pytest runs from another rootdir.
    if getattr(config.option, "asyncio_mode", None) is None:
        config.option.asyncio_mode = "auto"


@pytest.fixture(autouse=True)
def _no_network():
    from pytest_socket import disable_socket, enable_socket

    disable_socket(allow_unix_socket=True)  # the event loop's self-pipe is a unix socket pair
    yield
    enable_socket()
