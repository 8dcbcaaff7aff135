"""Ultralytics offline: no test here may reach the network (CI has none; a download would hang or
fetch weights). Set (in tests/conftest.py) before Ultralytics is imported, which reads both at import: YOLO_OFFLINE makes
its online check false (no pip-update query, no analytics), YOLO_CONFIG_DIR keeps its settings file
out of the user's home. The ``offline`` fixture proves it: it refuses every connection and name
lookup and fails the test if anything tried one."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Iterator, List

import pytest

# tests/conftest.py sets YOLO_OFFLINE and YOLO_CONFIG_DIR for the whole suite, before any import
assert os.environ.get("YOLO_OFFLINE") == "1" and os.environ.get("YOLO_CONFIG_DIR")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread (2 shared cores)."""


def _font_in_config_dir() -> None:
    """check_det_dataset asks for Arial.ttf and downloads it when missing from Ultralytics' config
    dir: put a real TTF there (matplotlib's DejaVuSans; only its presence matters with plots=False)."""
    from matplotlib import get_data_path
    from ultralytics.utils import USER_CONFIG_DIR
    target = Path(USER_CONFIG_DIR) / "Arial.ttf"
    if not target.exists():
        shutil.copyfile(Path(get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", target)


@pytest.fixture
def offline(monkeypatch) -> Iterator[List[str]]:
    """Every connection or lookup attempt is refused and recorded; the test fails if any was made."""
    _font_in_config_dir()
    attempts: List[str] = []

    def refuse(what: str):
        def call(*args, **kwargs):
            attempts.append("{}{}".format(what, args[:2]))
            raise OSError("network access in an offline test: {}{}".format(what, args[:2]))
        return call

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    yield attempts
    assert not attempts, "the test reached for the network: {}".format(attempts)
