"""The worker's start-up banner masks the broker password only where there is one."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator

import pytest

from workers.config import load_settings
from workers.distributed.app import make_app


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """Building a worker sets up Celery's logging on the root logger: undo it afterwards."""
    names = ("", "celery", "celery.task")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level) for n in names}
    streams = (sys.stdout, sys.stderr)
    yield
    for n, (handlers, level) in saved.items():
        logging.getLogger(n).handlers[:] = handlers
        logging.getLogger(n).setLevel(level)
    sys.stdout, sys.stderr = streams


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6399/0", "redis://127.0.0.1:6399/0"),
        ("redis://:s3cret@127.0.0.1:6399/0", "redis://:**@127.0.0.1:6399/0"),
        ("redis://alice:s3cret@127.0.0.1:6399/2", "redis://alice:**@127.0.0.1:6399/2"),
    ],
)
def test_banner_masks_only_a_real_password(url: str, shown: str) -> None:
    app = make_app(load_settings({"broker_url": url}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Celery's warning about running as root
        worker = app.Worker(hostname="banner@test", loglevel=20)
    banner = worker.startup_info(artlines=False)
    lines = {}
    for line in banner.splitlines():
        for field in ("transport", "results"):
            if line.startswith(f".> {field}:"):
                lines[field] = line.split(":", 1)[1].strip()
    assert lines["transport"] == shown and lines["results"] == shown, banner
    assert "s3cret" not in banner
