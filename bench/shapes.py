"""The tree shapes of the scaling measurements (bench/finalize_rate.py, bench/stitch.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from workers.generate import generate_tree

#: name -> (description, generate_tree keyword arguments). Row groups are hosts (SPEC §4).
TREES: dict[str, tuple[str, dict[str, Any]]] = {
    "big-bin": (
        "8 hosts x 1 node file (720 samples), binary: ~700 k rows per host",
        {"hosts": 8, "shape": "node", "samples": 720, "fmt": "bin", "files_per_host": 1},
    ),
    "big-json": (
        "the same 8 hosts, JSON",
        {"hosts": 8, "shape": "node", "samples": 720, "fmt": "json", "files_per_host": 1},
    ),
    "big-hourly": (
        "8 hosts x 12 hourly files (60 samples), mixed JSON/binary: ~700 k rows per host",
        {"hosts": 8, "shape": "hourly", "samples": 60, "fmt": "mixed", "files_per_host": 12},
    ),
    "small-hourly": (
        "96 hosts x 1 hourly file (60 samples), mixed: ~58 k rows per host",
        {"hosts": 96, "shape": "hourly", "samples": 60, "fmt": "mixed", "files_per_host": 1},
    ),
}
#: Trees whose finalize is measured: one with big row groups, one with small ones.
FINALIZE_ON = ("big-bin", "big-hourly", "small-hourly")


def generate(root: Path, **kwargs: Any) -> dict[str, Any]:
    """Write the tree under `root` (replacing it); its rows, bytes, files and hosts."""
    shutil.rmtree(root, ignore_errors=True)
    s = generate_tree(root, ["fritz"], seed=1, workers=os.cpu_count() or 1, **kwargs)
    return {"rows": s.values, "bytes": s.bytes, "files": s.files, "hosts": s.hosts}
