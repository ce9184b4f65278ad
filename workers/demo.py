"""`make demo`: generate a sample checkpoint tree, archive it in-process, show the result."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from .cli import main as ccarchive


def main() -> int:
    """Run the demo under ./out/demo and print where the Parquet files went."""
    root = Path("out/demo").resolve()
    shutil.rmtree(root, ignore_errors=True)
    checkpoints, archive = root / "checkpoints", root / "archive"
    ccarchive(
        [
            "generate",
            "--root",
            str(checkpoints),
            "--clusters",
            "fritz,alex",
            "--hosts",
            "8",
            "--files-per-host",
            "2",
            "--format",
            "mixed",
        ]
    )
    code = ccarchive(
        [
            "archive",
            "--checkpoints",
            str(checkpoints),
            "--archive",
            str(archive),
            "--retention",
            "48h",
        ]
    )
    files = sorted(archive.rglob("*.parquet"))
    print("\nArchives written:")
    for f in files:
        md = pq.ParquetFile(f).metadata
        print(
            f"  {f}  ({md.num_rows:,} rows, {md.num_row_groups} row groups, {f.stat().st_size:,} bytes)"
        )
    if files:
        rows = pq.ParquetFile(files[0]).read_row_group(0).slice(0, 8).to_pylist()
        table = Table(title=f"first rows of {files[0].parent.name}/{files[0].name}")
        for column in rows[0]:
            table.add_column(column)
        for row in rows:
            # float32 printed as float32 (2387.1), not as the float64 it widens to.
            table.add_row(*(str(np.float32(v)) if k == "value" else str(v) for k, v in row.items()))
        Console(width=max(Console().width, 120)).print(table)
    left = sorted(p.name for p in checkpoints.rglob("*") if p.is_file())
    print(f"\nCheckpoint files left in {checkpoints}: {len(left)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
