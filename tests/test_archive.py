"""End to end on the embedded runner: a tree full of SPEC edge cases, archived row by row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import (
    archive_argv,
    archive_rows,
    bin_file,
    bin_level,
    clean_env,
    expected_rows,
    full_key,
    level,
    metric,
    snapshot,
    sort_key,
    write_json,
)
from workers.cli import main

CUTOFF = 2_000_000
CLUSTER = "fritz"


def build_tree(root: Path) -> tuple[list[tuple[str, str, Path]], list[Path]]:
    """Write the edge-case tree; return (archivable files as (cluster, host, path), bad files)."""
    good: list[tuple[str, str, Path]] = []
    bad: list[Path] = []

    def add(cluster: str, host: str, name: str, doc: dict | str | bytes) -> Path:
        path = root / cluster / host / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(doc, bytes):
            path.write_bytes(doc)
        else:
            write_json(path, doc)
        return path

    # h-1.example: nulls, all-null and empty series, nesting, odd child names, frequencies.
    host = "h-1.example"
    good.append(
        (
            CLUSTER,
            host,
            add(
                CLUSTER,
                host,
                "1000000.json",
                level(
                    {
                        "mem_used": metric([1.5, None, 2.5, None], 60, 1_000_000),
                        "all_null": metric([None, None, None], 60, 1_000_000),
                        "empty": metric([], 60, 1_000_000),
                        "tempé°C": metric([20.1, 20.2], 3600, 1_000_000),
                    },
                    {
                        "socket0": {
                            "metrics": {"power": metric([100.5, None, 101.5], 10, 1_000_000)},
                            "children": {
                                "core1": level(
                                    {"ipc": metric([0.5, 1.25], 10, 1_000_005)},
                                    {"hwthread2": level({"x": metric([9.0])})},
                                )
                            },
                        },
                        "socketX": level({"odd": metric([3.0])}),
                        "nvme": level({"iops": metric([4.0, 5.0])}),
                        "cpu7": level({"cpu_load": metric([0.25])}),
                        "hwthread7": level({"cpu_load": metric([0.75])}),
                        "accelerator00000000:3B:00.0": level({"util": metric([50.0, None, 51.0])}),
                        "memoryDomain1": level({"bw": metric([-0.0, 1e-7])}),
                    },
                ),
            ),
        )
    )
    # Several files, one binary, one newer than the cutoff, overlapping series in time.
    good.append(
        (
            CLUSTER,
            host,
            add(
                CLUSTER,
                host,
                "1500000.bin",
                bin_file(bin_level({"mem_used": (60, 999_940, [7.0, float("nan"), 8.0])})),
            ),
        )
    )
    newer = add(
        CLUSTER, host, f"{CUTOFF + 1}.json", level({"mem_used": metric([1.0], 60, CUTOFF + 1)})
    )

    # Bad files: reported, kept, and they do not stop the host's good files.
    bad.append(
        add(
            CLUSTER,
            host,
            "1600000.json",
            '{"metrics": {"m": {"frequency": 60, "start": 0, "data": [1,',
        )
    )
    bad.append(
        add(
            CLUSTER,
            host,
            "1600001.bin",
            bin_file(bin_level({"m": (60, 0, [1.0])}), magic=0xDEADBEEF),
        )
    )
    bad.append(
        add(CLUSTER, host, "1600002.bin", bin_file(bin_level({"m": (60, 0, [1.0, 2.0])}))[:-6])
    )
    bad.append(add(CLUSTER, host, "abc.json", level({"m": metric([1.0])})))
    bad.append(add(CLUSTER, host, "1_000.json", level({"m": metric([1.0])})))

    # Never touched: ts 0, stray names, WAL, temp files, directories that look like files.
    stray = [
        add(CLUSTER, host, "0.json", level({"m": metric([1.0])})),
        add(CLUSTER, host, "current.wal", b"wal bytes"),
        add(CLUSTER, host, "1000000.bin.tmp", b"partial"),
        add(CLUSTER, host, "1000000.JSON", b"{}"),
        add(CLUSTER, host, "1000000.json~", b"{}"),
        add(CLUSTER, host, "notes.bak", b"x"),
    ]
    (root / CLUSTER / host / "1200000.json").mkdir()

    # A second host (sorted before h-1.example by bytes) and an empty host directory.
    good.append(
        (
            CLUSTER,
            "a.b-2",
            add(
                CLUSTER,
                "a.b-2",
                "1000000.json",
                level({"m": metric([1.0, 2.0, 3.0], 60, 1_000_000)}),
            ),
        )
    )
    (root / CLUSTER / "empty-host").mkdir()
    (root / CLUSTER / "stray-at-cluster-level.txt").write_text("x")
    (root / "stray-at-root.json").write_text("{}")

    # A second cluster with only null values: no archive, files deleted anyway.
    nulls = add("alex", "n1", "1000000.json", level({"m": metric([None, None])}))
    return [*good, ("alex", "n1", nulls)], [*bad, newer, *stray]


def test_archive_edge_case_tree(tmp_path: Path) -> None:
    cp, archive = tmp_path / "checkpoints", tmp_path / "archive"
    good, kept = build_tree(cp)
    before = snapshot(cp)

    assert main(archive_argv(cp, archive, CUTOFF, 1)) == 1

    # Archived files are gone; every other file is byte-identical.
    after = snapshot(cp)
    gone = {str(p.relative_to(cp)) for _c, _h, p in good}
    assert set(before) - set(after) == gone
    assert {k: v for k, v in before.items() if k not in gone} == after
    for path in kept:
        assert path.exists()

    # Only the cluster with values has an archive; rows equal the oracle's, in SPEC order.
    assert sorted(p.name for p in archive.rglob("*") if p.is_file()) == [f"{CUTOFF}.parquet"]
    assert len(archive_rows(archive / CLUSTER / f"{CUTOFF}.parquet")) > 0


@pytest.mark.slow
def test_rows_equal_oracle_and_are_sorted(tmp_path: Path) -> None:
    cp, archive = tmp_path / "checkpoints", tmp_path / "archive"
    good, _kept = build_tree(cp)
    expected = expected_rows((p for *_, p in good), key=lambda r: (r[0], *full_key(r)))
    assert main(archive_argv(cp, archive, CUTOFF, 2)) == 1

    rows = archive_rows(archive / CLUSTER / f"{CUTOFF}.parquet")
    assert rows == sorted(rows, key=sort_key)  # sorted by the SPEC key
    assert sorted(rows, key=lambda r: (r[0], *sort_key(r), r[6], r[7])) == [
        r for r in expected if r[0] == CLUSTER
    ]
    # cpu7 and hwthread7 both map to (hwthread, 7): both rows are kept.
    assert sum(1 for r in rows if r[2] == "cpu_load" and r[3] == "hwthread" and r[4] == "7") == 2
    # The binary file's series overlaps the JSON one in time: all five values are there.
    assert sum(1 for r in rows if r[1] == "h-1.example" and r[2] == "mem_used") == 4
    assert not (archive / "alex").exists()


def test_parquet_types_codec_row_groups_and_footer(tmp_path: Path) -> None:
    cp, archive = tmp_path / "checkpoints", tmp_path / "archive"
    build_tree(cp)
    main(archive_argv(cp, archive, CUTOFF, 1))
    f = pq.ParquetFile(archive / CLUSTER / f"{CUTOFF}.parquet")
    schema = f.schema
    physical = {
        schema.column(i).name: (
            schema.column(i).physical_type,
            str(schema.column(i).logical_type),
            schema.column(i).max_definition_level,
        )
        for i in range(len(schema))
    }
    for col in ("cluster", "hostname", "metric", "scope", "scope_id"):
        assert physical[col] == ("BYTE_ARRAY", "String", 0)
    assert physical["timestamp"] == ("INT64", "None", 0)
    assert physical["frequency"] == ("INT64", "None", 0)
    assert physical["value"] == ("FLOAT", "None", 0)
    assert [str(t) for t in f.schema_arrow.types] == ["string"] * 5 + ["int64", "int64", "float"]
    md = f.metadata
    hosts_per_group = []
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        for c in range(rg.num_columns):
            assert rg.column(c).compression == "ZSTD"
        stats = rg.column(1).statistics
        assert stats.min == stats.max
        hosts_per_group.append(stats.min)
    assert hosts_per_group == ["a.b-2", "h-1.example"]
    footer = {k.decode(): v.decode() for k, v in md.metadata.items()}
    assert footer["ccarchive.cutoff"] == str(CUTOFF)
    assert footer["ccarchive.run_id"]
    assert footer["ccarchive.version"]
    sources = json.loads(footer["ccarchive.sources"])
    assert sorted(sources) == ["a.b-2", "h-1.example"]
    files = {f["name"]: f for f in sources["h-1.example"]["files"]}
    assert sorted(files) == ["1000000.json", "1500000.bin"]
    assert files["1500000.bin"]["rows"] == 2
    assert sum(f["rows"] for f in files.values()) == sources["h-1.example"]["rows"]


def test_row_groups_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    write_json(
        cp / "c" / "h1" / "100.json", level({"m": metric([float(i) for i in range(25)], 1, 100)})
    )
    write_json(
        cp / "c" / "h2" / "100.json", level({"m": metric([float(i) for i in range(7)], 1, 100)})
    )
    monkeypatch.setenv("CCARCHIVE_ROW_GROUP_ROWS", "10")
    assert main(archive_argv(cp, archive, 100, 1)) == 0
    md = pq.ParquetFile(archive / "c" / "100.parquet").metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [10, 10, 5, 7]


def test_page_rows_setting_reaches_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CCARCHIVE_PAGE_ROWS: the same rows in pages of 50 rows take more bytes (a header per
    page, less for zstd to find per page) and read back the same."""
    sizes, rows = {}, {}
    for page_rows in ("50", "65536"):
        cp, archive = tmp_path / page_rows / "cp", tmp_path / page_rows / "archive"
        values = [float(i % 97) for i in range(20_000)]
        write_json(cp / "c" / "h1" / "100.json", level({"m": metric(values, 1, 100)}))
        monkeypatch.setenv("CCARCHIVE_PAGE_ROWS", page_rows)
        assert main(archive_argv(cp, archive, 100_000, workers=1)) == 0
        out = archive / "c" / "100000.parquet"
        sizes[page_rows], rows[page_rows] = out.stat().st_size, archive_rows(out)
    assert sizes["50"] > sizes["65536"] + 400 * 8  # 400 pages of 50 rows, >= 8 bytes each
    assert rows["50"] == rows["65536"] and len(rows["50"]) == 20_000


def test_second_run_same_cutoff_changes_nothing(tmp_path: Path) -> None:
    cp, archive = tmp_path / "checkpoints", tmp_path / "archive"
    build_tree(cp)
    args = archive_argv(cp, archive, CUTOFF, 1)
    main(args)
    out = archive / CLUSTER / f"{CUTOFF}.parquet"
    first = (out.read_bytes(), out.stat().st_mtime_ns)
    cp_before = snapshot(cp)
    assert main(args) == 1  # the bad files are still there and still reported
    assert (out.read_bytes(), out.stat().st_mtime_ns) == first
    assert snapshot(cp) == cp_before
    assert sorted(p.name for p in (archive / CLUSTER).iterdir()) == [f"{CUTOFF}.parquet"]


def test_existing_archive_with_other_content_is_not_overwritten(tmp_path: Path) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    write_json(cp / "c" / "h" / "100.json", level({"m": metric([1.0])}))
    args = archive_argv(cp, archive, 200, 1)
    assert main(args) == 0
    out = archive / "c" / "200.parquet"
    first = out.read_bytes()
    late = write_json(cp / "c" / "h" / "150.json", level({"m": metric([2.0])}))
    assert main(args) == 1
    assert out.read_bytes() == first
    assert late.exists()
    assert [p.name for p in (archive / "c").iterdir()] == ["200.parquet"]  # no temp files left


def test_all_good_exits_zero_and_clean_staging(tmp_path: Path) -> None:
    cp, archive, staging = tmp_path / "cp", tmp_path / "archive", tmp_path / "staging"
    write_json(cp / "c" / "h" / "100.json", level({"m": metric([1.0, None, 3.0])}))
    args = [*archive_argv(cp, archive, 100, 1), "--staging", str(staging)]
    assert main(args) == 0
    assert not (cp / "c" / "h" / "100.json").exists()
    assert (cp / "c" / "h").is_dir()  # host directories stay
    assert list(staging.rglob("*.arrow")) == []
    assert len(archive_rows(archive / "c" / "100.parquet")) == 2


def test_delete_mode_removes_selected_files_only(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    old = write_json(cp / "c" / "h" / "100.json", "{not json")  # deleted unread
    old_bin = cp / "c" / "h" / "150.bin"
    old_bin.write_bytes(b"whatever")
    new = write_json(cp / "c" / "h" / "300.json", level())
    zero = write_json(cp / "c" / "h" / "0.json", level())
    badname = write_json(cp / "c" / "h" / "x1.json", level())
    wal = cp / "c" / "h" / "current.wal"
    wal.write_text("w")
    code = main([*archive_argv(cp, cutoff=200, workers=1), "--mode", "delete"])
    assert code == 1  # x1.json is reported
    assert not old.exists() and not old_bin.exists()
    assert new.exists() and zero.exists() and badname.exists() and wal.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--checkpoints", "{tmp}/missing", "--archive", "{tmp}/a", "--cutoff", "1"],
            "does not exist",
        ),
        (
            ["--checkpoints", "{tmp}/cp", "--archive", "{tmp}/file/sub", "--cutoff", "1"],
            "not writable",
        ),
        (
            ["--checkpoints", "{tmp}/cp", "--archive", "{tmp}/a", "--retention", "48 hours"],
            "invalid duration",
        ),
        (["--checkpoints", "{tmp}/cp", "--archive", "{tmp}/a", "--retention=-5h"], "positive"),
        (["--checkpoints", "{tmp}/cp", "--archive", "{tmp}/a"], "--cutoff"),
        (["--checkpoints", "{tmp}/cp", "--cutoff", "1"], "--archive"),
        (
            [
                "--checkpoints",
                "{tmp}/cp",
                "--archive",
                "{tmp}/a",
                "--cutoff",
                "1",
                "--retention",
                "1h",
            ],
            "not allowed",
        ),
        (["--checkpoints", "{tmp}/cp", "--archive", "{tmp}/a", "--cutoff", "soon"], "invalid int"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "cp").mkdir()  # beside the archive root, not around it (SPEC §6.9)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = clean_env()
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", "archive", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # argparse puts its usage lines first
    assert "error" in last and message in last
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_console_script_runs_and_summarises(tmp_path: Path) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    write_json(cp / "c1" / "h1" / "100.json", level({"m": metric([1.0, 2.0])}))
    exe = Path(sys.executable).with_name("ccarchive")
    proc = subprocess.run(
        [str(exe), *archive_argv(cp, archive, 100, 2)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "c1" in proc.stdout and str(archive / "c1" / "100.parquet") in proc.stdout


@pytest.mark.slow
def test_summary_readable_at_80_columns(tmp_path: Path) -> None:
    """On an 80-column terminal (a real pty): the table fits, the row counts are whole, the
    archive path is printed in full on a line of its own, the cutoff also in UTC."""
    import pty
    import re

    from workers.generate import generate_tree

    cp = tmp_path / "cp"
    generate_tree(
        cp,
        ["fritz", "a-rather-long-cluster-name"],
        hosts=2,
        files_per_host=1,
        fmt="json",
        samples=60,
        gpus=0,
        seed=0,
        workers=1,
    )
    archive = tmp_path / "a-long-directory-name" / "that-keeps-going" / "and-going-on"
    primary, replica = pty.openpty()
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "COLUMNS": "80", "LINES": "40", "PYTHONPATH": str(root)}
    argv = [sys.executable, "-m", "workers.cli", *archive_argv(cp, archive, 2000000000, 1)]
    proc = subprocess.Popen(argv, stdout=replica, stderr=subprocess.PIPE, env=env)
    os.close(replica)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    assert proc.wait(timeout=60) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode()).replace("\r", "")
    lines = text.splitlines()
    assert "cutoff 2000000000 (2033-05-18T03:33:20Z)" in text
    for cluster in ("fritz", "a-rather-long-cluster-name"):
        path = str(archive / cluster / "2000000000.parquet")
        [line] = [ln for ln in lines if ln.startswith(f"{cluster}: ")]
        assert line.endswith(f" in {path}"), line  # whole, on one (soft-wrapped) line
        rows = pq.ParquetFile(path).metadata.num_rows
        assert f" {rows:,} " in text  # the row count whole, never cut to "…"
    table = [ln for ln in lines if "│" in ln]
    assert table and all(len(ln) <= 80 for ln in table), table
    assert "…" not in text
