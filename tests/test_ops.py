"""`ccarchive status | inspect | query` against real archives written by `ccarchive archive`.

The tree: cluster `fritz` (hosts h1..h3, files at 1000 and 2000, plus a bad name in h3)
and `alex` (one host, one file at 1500), archived in two runs (cutoffs 1500 and 2500).
The second run cannot delete one host's files (as if it crashed before deleting), one
archived file comes back changed, and a temporary archive file is left behind. Every answer is checked against the
independent oracle of tests/helpers.py. The same commands then run against S3 (moto).
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests import helpers
from tests.fixtures_redis import drop_dac_prefix
from tests.fixtures_s3 import S3Bucket
from tests.helpers import (
    Row,
    archive_argv,
    clean_env,
    drop_settings_env,
    full_key,
    level,
    metric,
    oracle_rows,
    sort_key,
    table_rows,
    write_json,
)
from workers import query
from workers.cli import main

HOSTS = ("h1", "h2", "h3")
CUTOFFS = (1500, 2500)


@dataclass
class Archived:
    """The archived tree and what the oracle says about it."""

    root: Path
    cp: Path
    archive: Path
    run_log: Path
    config: Path
    rows: dict[tuple[str, int], list[Row]]  # (cluster, cutoff) -> rows
    sources: dict[tuple[str, int], dict[str, list[tuple[str, int]]]]  # host -> [(name, size)]
    restored: bytes


def write_tree(cp: Path) -> dict[tuple[str, str, int], Path]:
    """The checkpoint files, keyed by (cluster, host, ts)."""
    files: dict[tuple[str, str, int], Path] = {}
    for i, host in enumerate(HOSTS):
        for ts in (1000, 2000):
            doc = level(
                {
                    "cpu_load": metric([0.5 + i, None, 1.5, 2.5], 60, ts),
                    "mem_used": metric([100.0 + i, 101.0], 60, ts),
                },
                {"socket0": level({"power": metric([200.0, 201.5, None], 60, ts)})},
            )
            files["fritz", host, ts] = write_json(cp / "fritz" / host / f"{ts}.json", doc)
    files["alex", "a1", 1500] = write_json(
        cp / "alex" / "a1" / "1500.json", level({"cpu_load": metric([9.0, 9.5], 60, 1500)})
    )
    (cp / "fritz" / "h3" / "abc.json").write_text("{}")  # a bad name: reported, kept
    return files


@pytest.fixture(scope="module")
def archived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archived]:
    """Two real runs through the CLI, then the leftovers of a crash."""
    root = tmp_path_factory.mktemp("ops")
    cp, archive = root / "checkpoints", root / "archive"
    config = root / "ccarchive.toml"
    config.write_text(f'run_log = "{archive / "_runs"}"\nworkers = 1\n')
    files = write_tree(cp)
    rows: dict[tuple[str, int], list[Row]] = {}
    sources: dict[tuple[str, int], dict[str, list[tuple[str, int]]]] = {}
    for (cluster, host, ts), path in files.items():
        cutoff = next(c for c in CUTOFFS if ts <= c)
        rows.setdefault((cluster, cutoff), []).extend(oracle_rows(cluster, host, path))
        sources.setdefault((cluster, cutoff), {}).setdefault(host, []).append(
            (path.name, path.stat().st_size)
        )
    h1_2000 = files["fritz", "h1", 2000].read_bytes()
    argv = [*archive_argv(cp, archive), "--config", str(config)]
    with pytest.MonkeyPatch.context() as mp:
        drop_settings_env(mp)
        code = main([*argv, "--cutoff", str(CUTOFFS[0])])
        assert code == 1  # abc.json is reported every time
    # The second run cannot delete h1's files (its directory is read-only to a process
    # without DAC override): like a crash between publishing and deleting, h1/2000.json is
    # still the very file archived...
    prefix = drop_dac_prefix()
    assert prefix is not None, "setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE"
    (cp / "fritz" / "h1").chmod(0o555)
    try:
        env = clean_env()
        second = subprocess.run(
            [*prefix, sys.executable, "-m", "workers.cli", *argv, "--cutoff", str(CUTOFFS[1])],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        (cp / "fritz" / "h1").chmod(0o755)
    assert second.returncode == 1 and "cannot delete" in second.stderr, second.stderr
    # ...and one whose content changed since it was archived.
    write_json(files["fritz", "h2", 1000], level({"x": metric([1.0, 2.0, 3.0, 4.0, 5.0])}))
    (archive / "fritz" / ".2500.parquet.0123456789ab.partial").write_bytes(b"PAR1")
    yield Archived(root, cp, archive, archive / "_runs", config, rows, sources, h1_2000)


pytestmark = pytest.mark.usefixtures("clean_settings")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; (exit code, stdout, stderr). Usage errors come back as 2."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# --- status -------------------------------------------------------------------------------


@pytest.mark.slow
def test_status_json(archived: Archived, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys,
        "status",
        "--archive",
        str(archived.archive),
        "--checkpoints",
        str(archived.cp),
        "--config",
        str(archived.config),
        "--json",
    )
    assert code == 1  # pending recoveries and a temporary file need attention
    assert err == ""  # not a terminal: no progress bar, nothing else
    doc = json.loads(out)
    clusters = {c["cluster"]: c for c in doc["clusters"]}
    assert sorted(clusters) == ["alex", "fritz"]  # `_runs` is not a cluster

    for (cluster, cutoff), rows in archived.rows.items():
        (summary,) = [a for a in clusters[cluster]["archives"] if a["cutoff"] == cutoff]
        path = archived.archive / cluster / f"{cutoff}.parquet"
        assert summary["rows"] == len(rows)
        assert summary["bytes"] == path.stat().st_size
        assert summary["hosts"] == len(archived.sources[cluster, cutoff])
        assert summary["source_files"] == sum(map(len, archived.sources[cluster, cutoff].values()))
        assert summary["row_groups"] == pq.ParquetFile(path).metadata.num_row_groups
    assert [a["cutoff"] for a in clusters["alex"]["archives"]] == [1500]

    fritz = clusters["fritz"]
    last = fritz["last_run"]
    assert fritz["runs"] == 2 and last["cutoff"] == 2500 and last["mode"] == "archive"
    assert last["outcome"] == "reported" and last["bad_count"] == 2
    assert last["bad"][0]["path"].endswith("abc.json")
    assert last["bad"][1]["path"].endswith("h1/2000.json")
    assert last["files_archived"] == 3 and last["files_deleted"] == 2
    assert last["rows"] == len(archived.rows["fritz", 2500])
    assert last["archive"].endswith("fritz/2500.parquet")
    assert clusters["alex"]["last_run"]["cutoff"] == 2500  # a run with nothing to do
    assert clusters["alex"]["last_run"]["outcome"] == "ok"

    pending = {(p["host"], p["name"]): p for p in fritz["pending"]}
    assert sorted(pending) == [("h1", "2000.json"), ("h2", "1000.json")]
    assert pending["h1", "2000.json"]["action"] == "delete"
    assert pending["h1", "2000.json"]["size"] == len(archived.restored)
    assert pending["h1", "2000.json"]["archive"].endswith("fritz/2500.parquet")
    assert pending["h2", "1000.json"]["action"] == "keep"
    assert pending["h2", "1000.json"]["archive"].endswith("fritz/1500.parquet")
    assert clusters["alex"]["pending"] == []
    assert [Path(p).name for p in fritz["partial_files"]] == [".2500.parquet.0123456789ab.partial"]


def test_status_text_and_unconfigured_checkpoints(
    archived: Archived, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "status", "--archive", str(archived.archive))
    assert code == 1  # the temporary file is still there
    assert "pending recoveries: unknown (checkpoints not configured" in out
    assert "last run: none recorded" in out  # records went to the configured run log
    assert "fritz: 2 archive(s)" in out and "alex: 1 archive(s)" in out

    code, out, _ = run(
        capsys,
        "status",
        "--archive",
        str(archived.archive),
        "--checkpoints",
        str(archived.cp),
        "--run-log",
        str(archived.run_log),
        "--cluster",
        "fritz",
    )
    assert "alex" not in out
    assert "last run: " in out and " reported (archive, cutoff 2500" in out
    assert "pending recoveries: 1 archived file(s) to delete, 1 changed since archived" in out
    assert "delete: fritz/h1/2000.json" in out and "keep: fritz/h2/1000.json" in out

    # Only the run log: it says what it read, not "0 archive(s)".
    code, out, _ = run(capsys, "status", "--run-log", str(archived.run_log))
    assert f"run records in {archived.run_log} only; archives not read" in out
    assert "archive(s)" not in out
    assert re.search(r"^fritz: [1-9]\d* run record\(s\)$", out, re.M), out
    assert "last run: " in out and " reported (archive, cutoff 2500" in out


@pytest.mark.slow
def test_status_is_clean_after_a_clean_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    write_json(cp / "c" / "h" / "100.json", level({"m": metric([1.0, 2.0])}))
    assert main(archive_argv(cp, archive, 200)) == 0
    capsys.readouterr()  # the archive summary
    code, out, _ = run(
        capsys, "status", "--archive", str(archive), "--checkpoints", str(cp), "--json"
    )
    assert code == 0
    (cluster,) = json.loads(out)["clusters"]
    # Run records default to a per-archive directory under $XDG_STATE_HOME.
    assert cluster["pending"] == [] and cluster["runs"] == 1
    assert cluster["last_run"]["outcome"] == "ok" and cluster["last_run"]["cutoff"] == 200


def test_status_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "status")
    assert code == 2 and "give --archive" in err
    code, _, err = run(capsys, "status", "--archive", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


# --- inspect ------------------------------------------------------------------------------


def test_inspect_json(archived: Archived, capsys: pytest.CaptureFixture[str]) -> None:
    path = archived.archive / "fritz" / "1500.parquet"
    code, out, err = run(capsys, "inspect", str(path), "--json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    expected = archived.rows["fritz", 1500]
    assert doc["rows"] == len(expected) and doc["bytes"] == path.stat().st_size
    assert [c["name"] for c in doc["columns"]] == [
        "cluster",
        "hostname",
        "metric",
        "scope",
        "scope_id",
        "timestamp",
        "frequency",
        "value",
    ]
    assert all(c["required"] for c in doc["columns"])
    types = {c["name"]: (c["physical_type"], c["arrow_type"]) for c in doc["columns"]}
    assert types["hostname"] == ("BYTE_ARRAY", "string")
    assert types["value"] == ("FLOAT", "float")
    assert types["timestamp"] == ("INT64", "int64")
    assert doc["sorting_columns"] == ["hostname", "metric", "scope", "scope_id", "timestamp"]

    per_host: dict[str, int] = {}
    for r in expected:
        per_host[r[1]] = per_host.get(r[1], 0) + 1
    assert doc["hosts"] == per_host
    assert [g["hosts"] for g in doc["row_groups"]] == [[h] for h in sorted(per_host)]
    assert sum(g["rows"] for g in doc["row_groups"]) == len(expected)
    assert doc["time_min"] == min(r[5] for r in expected)
    assert doc["time_max"] == max(r[5] for r in expected)
    assert doc["metrics"] == sorted({r[2] for r in expected})
    assert doc["metadata"]["ccarchive.cutoff"] == "1500"
    assert doc["metadata"]["ccarchive.cluster"] == "fritz"
    assert "ccarchive.sources" not in doc["metadata"]  # listed under "sources" instead
    sources = {
        host: [(f["name"], f["size"]) for f in entry["files"]]
        for host, entry in doc["sources"].items()
    }
    assert sources == archived.sources["fritz", 1500]


def test_inspect_text(archived: Archived, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "inspect", str(archived.archive / "alex" / "1500.parquet"))
    assert code == 0
    assert "time range: 1500 (1970-01-01T00:25:00Z) .. 1560" in out
    assert "hosts (1): a1" in out and "metrics (1): cpu_load" in out
    assert "1500.json" in out  # the footer's source list


def test_inspect_rejects_what_is_not_parquet(
    archived: Archived, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "inspect", str(archived.config))
    assert code == 2 and "not a readable Parquet file" in err
    code, _, err = run(capsys, "inspect", str(archived.root / "nope.parquet"))
    assert code == 2 and "does not exist" in err


# --- query --------------------------------------------------------------------------------


def expected_rows(
    archived: Archived,
    clusters: tuple[str, ...] = (),
    hosts: tuple[str, ...] = (),
    metrics: tuple[str, ...] = (),
    start: int | None = None,
    end: int | None = None,
) -> list[Row]:
    """What a query must return, from the oracle."""
    return sorted(
        (
            r
            for (cluster, _), rows in archived.rows.items()
            for r in rows
            if (not clusters or cluster in clusters)
            and (not hosts or r[1] in hosts)
            and (not metrics or r[2] in metrics)
            and (start is None or r[5] >= start)
            and (end is None or r[5] < end)
        ),
        key=full_key,
    )


@pytest.mark.parametrize(
    ("filters", "argv"),
    [
        ({}, []),
        ({"clusters": ("fritz",)}, ["--cluster", "fritz"]),
        ({"hosts": ("h2", "a1")}, ["--host", "h2", "--host", "a1"]),
        ({"metrics": ("power",)}, ["--metric", "power"]),
        ({"start": 1060, "end": 2060}, ["--from", "1060", "--to", "1970-01-01T00:34:20Z"]),
        (
            {"clusters": ("fritz",), "hosts": ("h3",), "metrics": ("cpu_load",), "start": 2000},
            ["--cluster", "fritz", "--host", "h3", "--metric", "cpu_load", "--from", "2000"],
        ),
    ],
)
def test_query_parquet_matches_the_oracle(
    archived: Archived,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    filters: dict[str, Any],
    argv: list[str],
) -> None:
    out_file = tmp_path / "result.parquet"
    code, _, _ = run(
        capsys,
        "query",
        "--archive",
        str(archived.archive),
        *argv,
        "--format",
        "parquet",
        "--output",
        str(out_file),
    )
    assert code == 0
    table = pq.read_table(out_file)
    assert table.schema.metadata is None  # no footer of some archive read on the way
    got = table_rows(table)
    assert sorted(got, key=full_key) == expected_rows(archived, **filters)
    # In file order: one archive after the other, each in SPEC order.
    origin = {full_key(r): key for key, rows in archived.rows.items() for r in rows}
    order = [origin[full_key(r)] for r in got]
    blocks = [k for i, k in enumerate(order) if i == 0 or order[i - 1] != k]
    assert len(blocks) == len(set(blocks))
    for key in blocks:
        part = [r for r in got if origin[full_key(r)] == key]
        assert part == sorted(part, key=sort_key)


def test_query_pushes_filters_down_to_row_groups(archived: Archived) -> None:
    everything = query.plan_query(str(archived.archive))
    assert everything.row_groups_total == everything.row_groups_selected == 7  # 3 + 3 + 1

    one_host = query.plan_query(str(archived.archive), hosts=["h2"])
    assert one_host.row_groups_selected == 2  # h2's row group in each fritz archive
    late = query.plan_query(str(archived.archive), start=2000)
    assert late.row_groups_selected == 3  # only the 2500 archive holds timestamps >= 2000
    # Statistics are ranges: a name between a row group's min and max cannot be ruled out
    # (it is filtered while reading), one outside every range is never read at all.
    inside = query.plan_query(str(archived.archive), metrics=["load"])
    assert inside.row_groups_selected == 6 and list(query.query_batches(inside)) == []
    none = query.plan_query(str(archived.archive), metrics=["zzz"])
    assert none.row_groups_selected == 0 and list(query.query_batches(none)) == []
    only_alex = query.plan_query(str(archived.archive), clusters=["alex"])
    assert [Path(f).name for f in only_alex.files] == ["1500.parquet"]  # fritz never opened


def test_query_csv_and_table(archived: Archived, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys,
        "query",
        "--archive",
        str(archived.archive),
        "--host",
        "a1",
        "--format",
        "csv",
    )
    assert code == 0 and err == ""
    records = list(csv.DictReader(io.StringIO(out)))
    assert [(r["hostname"], r["timestamp"], float(r["value"])) for r in records] == [
        ("a1", "1500", 9.0),
        ("a1", "1560", 9.5),
    ]

    code, out, err = run(
        capsys, "query", "--archive", str(archived.archive), "--metric", "mem_used", "--limit", "2"
    )
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["cluster", "hostname", "metric"]
    assert len(lines) == 3 and "1970-01-01T00:16:40Z" in lines[1]
    # a pipe still learns that rows were left out, without advice to ask for what it asked
    assert "2 rows;" in err and "more rows match (--limit 2)" in err
    assert "use --limit" not in err


def test_query_usage_errors(archived: Archived, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["query", "--archive", str(archived.archive)]
    code, _, err = run(capsys, *base, "--from", "yesterday")
    assert code == 2 and "invalid time 'yesterday'" in err
    code, _, err = run(capsys, *base, "--cluster", "../etc")
    assert code == 2 and "invalid cluster" in err
    code, _, err = run(capsys, "query")
    assert code == 2 and "give --archive" in err


# --- S3 -----------------------------------------------------------------------------------


@pytest.mark.s3
def test_status_inspect_query_on_s3(
    s3_bucket: S3Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cp = tmp_path / "checkpoints"
    files = write_tree(cp)
    archive = f"{s3_bucket.url}/archive"
    config = tmp_path / "c.toml"
    config.write_text(f'run_log = "{archive}/_runs"\nworkers = 1\n')
    rows = helpers.expected_rows((p for (_, _, ts), p in files.items() if ts <= 1500), full_key)
    assert main([*archive_argv(cp, archive, 1500), "--config", str(config)]) == 1
    capsys.readouterr()

    code, out, _ = run(capsys, "status", "--archive", archive, "--config", str(config), "--json")
    assert code == 1  # the last fritz run reported abc.json
    clusters = {c["cluster"]: c for c in json.loads(out)["clusters"]}
    assert sorted(clusters) == ["alex", "fritz"]
    assert sum(a["rows"] for c in clusters.values() for a in c["archives"]) == len(rows)
    assert clusters["fritz"]["last_run"]["outcome"] == "reported"
    assert clusters["alex"]["last_run"]["outcome"] == "ok"
    assert clusters["alex"]["pending"] is None  # checkpoints not configured

    code, out, _ = run(capsys, "inspect", f"{archive}/fritz/1500.parquet", "--json")
    assert code == 0
    doc = json.loads(out)
    assert sorted(doc["hosts"]) == list(HOSTS) and doc["time_min"] == 1000

    out_file = tmp_path / "q.parquet"
    code, _, _ = run(
        capsys,
        "query",
        "--archive",
        archive,
        "--host",
        "h1",
        "--format",
        "parquet",
        "-o",
        str(out_file),
    )
    assert code == 0
    got = sorted(table_rows(pq.read_table(out_file)), key=full_key)
    assert got == [r for r in rows if r[1] == "h1"]
    assert query.plan_query(archive, hosts=["h1"]).row_groups_selected == 1


def test_status_of_delete_mode_from_run_records_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cp, runs = tmp_path / "cp", tmp_path / "runs"
    write_json(cp / "c" / "h" / "100.json", level({"m": metric([1.0])}))
    config = tmp_path / "c.toml"
    config.write_text(f'run_log = "{runs}"\nmode = "delete"\n')
    assert main([*archive_argv(cp, cutoff=200), "--config", str(config)]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "status", "--config", str(config), "--json")
    assert code == 0
    (cluster,) = json.loads(out)["clusters"]
    assert cluster["archives"] == [] and cluster["pending"] is None
    assert cluster["last_run"]["mode"] == "delete" and cluster["last_run"]["files_deleted"] == 1


def test_duckdb_reads_what_the_docs_say(archived: Archived) -> None:
    import duckdb

    total = sum(len(rows) for rows in archived.rows.values())
    glob = str(archived.archive / "*" / "*.parquet")  # never matches _runs/*.json
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall() == [(total,)]
    h2 = duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{glob}') WHERE hostname = 'h2' AND timestamp >= 2000"
    ).fetchall()
    assert h2 == [(len(expected_rows(archived, hosts=("h2",), start=2000)),)]
