"""Hostile checkpoint shapes, out-of-range cutoffs and broken archive files (issue 11).

Nesting bombs are parsed in a subprocess under an address-space limit (`ulimit -v`): the
old readers built one path string per level, so memory grew with the depth squared and a
2.8 MB file took 23 GB. Here every bomb must end as a BadCheckpoint naming the depth, the
process must survive, and a whole CLI run must keep the bomb and archive everything else.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import (
    archive_argv,
    archive_rows,
    bin_file,
    bin_level,
    clean_env,
    expected_rows,
    level,
    metric,
    write_json,
)
from workers import steps
from workers.checkpoint import MAX_DEPTH, BadCheckpoint, parse_binary, parse_json

#: Address-space limit of the parsing subprocesses: ample for the interpreter, numpy and
#: pyarrow, far below what a quadratic parse of a bomb needs.
AS_LIMIT = 1536 * 1024 * 1024
BOMB_LEVELS = 200_000


def _env(tmp_path: Path) -> dict[str, str]:
    return clean_env(XDG_STATE_HOME=str(tmp_path / "state"))  # run records stay in the test's tree


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def _run(
    args: list[str],
    tmp_path: Path,
    limit: bool = False,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env={**_env(tmp_path), **(env or {})},
        timeout=timeout,
        preexec_fn=_limit_memory if limit else None,
    )


def binary_bomb(levels: int, name: bytes = b"abcd") -> bytes:
    """A binary checkpoint whose levels each hold one child, `levels` deep."""
    one = struct.pack("<II", 0, 1) + struct.pack("<H", len(name)) + name  # no metric, a child
    return struct.pack("<Iqq", 0xCC5B0001, 0, 1) + one * levels + struct.pack("<II", 0, 0)


def json_bomb(levels: int, leaf: str = '{"metrics":{},"children":{}}') -> bytes:
    """A JSON checkpoint whose levels each hold one child named "a", `levels` deep."""
    return ('{"metrics":{},"children":{"a":' * levels + leaf + "}}" * levels).encode()


# --- nesting bombs, under a memory limit ------------------------------------------------------

_PARSE_SCRIPT = """
import sys
from pathlib import Path
from workers.checkpoint import BadCheckpoint, parse_binary, parse_json
path = Path(sys.argv[1])
parse = parse_binary if path.suffix == ".bin" else parse_json
try:
    series = parse(path.read_bytes())
except BadCheckpoint as exc:
    print("BAD", exc.reason)
else:
    print("OK", len(series))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bomb.bin", binary_bomb(BOMB_LEVELS)),
        ("bomb.json", json_bomb(BOMB_LEVELS)),
        # within orjson's own limit: the walker's depth limit decides
        ("bomb500.json", json_bomb(500)),
        # an escape sends it to the general reader, "-0" on to the stdlib re-parse
        (
            "minus0.json",
            json_bomb(500, '{"metrics":{"\\u006d":{"frequency":1,"start":0,"data":[-0]}}}'),
        ),
        # arrays nested in a metric's data
        (
            "data.json",
            b'{"metrics":{"m":{"frequency":1,"start":0,"data":'
            + b"[" * BOMB_LEVELS
            + b"]" * BOMB_LEVELS
            + b"}}}",
        ),
    ],
)
def test_nesting_bombs_are_bad_files_under_a_memory_limit(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    proc = _run(["-c", _PARSE_SCRIPT, str(path)], tmp_path, limit=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith("BAD nesting deeper than "), proc.stdout
    if name != "data.json":
        assert "levels" in proc.stdout


def test_the_binary_bomb_is_the_reported_size() -> None:
    # The issue's file: 2.8 MB, 200,000 levels.
    assert 2_700_000 < len(binary_bomb(BOMB_LEVELS)) < 2_900_000


def test_unknown_keys_too_deep_for_the_stdlib_reparse_are_a_bad_file() -> None:
    # orjson accepts ~1000 nested arrays under an unknown key; the standard library's parser,
    # needed for the sign of an integer -0 on the general path, recurses and would fail.
    deep = "[" * 1000 + "]" * 1000
    doc = (
        '{"metrics":{"\\u006d":{"frequency":1,"start":0,"data":[-0,1]}},"children":{},'
        f'"x":{deep}}}'
    ).encode()
    with pytest.raises(BadCheckpoint, match="nested too deep"):
        parse_json(doc)
    shallow = doc.replace(deep.encode(), b"[[1]]")
    (s,) = parse_json(shallow)
    assert s.metric == "m" and np.signbit(s.values[0]) and s.values[1] == 1


def _json_chain(depth: int) -> dict[str, object]:
    doc = level({"m": metric([float(depth)])})
    for d in range(depth, 0, -1):
        doc = level({"m": metric([float(d - 1)])}, {f"core{d}": doc})
    return doc


def _bin_chain(depth: int) -> bytes:
    body = bin_level({"m": (60, 0, [float(depth)])})
    for d in range(depth, 0, -1):
        body = bin_level({"m": (60, 0, [float(d - 1)])}, {f"core{d}": body})
    return bin_file(body)


def test_depth_at_the_limit_is_read_one_deeper_is_bad(tmp_path: Path) -> None:
    at_limit_json = json.dumps({"from": 0, "to": 1, **_json_chain(MAX_DEPTH)}).encode()
    for series in (parse_json(at_limit_json), parse_binary(_bin_chain(MAX_DEPTH))):
        assert len(series) == MAX_DEPTH + 1
        deepest = max(series, key=lambda s: float(s.values[0]))
        assert float(deepest.values[0]) == MAX_DEPTH
        assert (deepest.scope, deepest.scope_id) == ("core", str(MAX_DEPTH))
    too_deep_json = json.dumps(_json_chain(MAX_DEPTH + 1)).encode()
    for parse, data in ((parse_json, too_deep_json), (parse_binary, _bin_chain(MAX_DEPTH + 1))):
        with pytest.raises(BadCheckpoint) as info:
            parse(data)
        reason = info.value.reason
        assert reason.startswith(f"nesting deeper than {MAX_DEPTH} levels at /core1/core2/")
        assert reason.endswith(f"/core{MAX_DEPTH + 1}")
        assert len(reason) < 200  # a deep path is shortened, whatever the names


def test_deep_path_in_a_message_is_short_even_with_long_names() -> None:
    with pytest.raises(BadCheckpoint) as info:
        parse_binary(binary_bomb(MAX_DEPTH + 10, b"n" * 60_000))  # 4.4 MB
    assert len(info.value.reason) < 1000


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape",
    ["json-metrics", "json-children", "bin-metrics", "bin-children"],
)
def test_wide_files_are_read_in_linear_time_and_memory(tmp_path: Path, shape: str) -> None:
    # 1,000,000 metrics with empty data, or 1,000,000 empty children, in one file; in a
    # subprocess under the same limit, which a per-item cost of a few hundred bytes meets.
    script = f"""
import resource, struct, time
from workers.checkpoint import parse_binary, parse_json
N = 1_000_000
shape = {shape!r}
if shape == "json-metrics":
    data = ('{{"metrics":{{' + ",".join(f'"m{{i}}":{{{{"frequency":60,"start":0,"data":[]}}}}' for i in range(N)) + '}},"children":{{}}}}').encode()
elif shape == "json-children":
    data = ('{{"metrics":{{}},"children":{{' + ",".join(f'"c{{i}}":{{{{"metrics":{{{{}}}}}}}}' for i in range(N)) + '}}}}').encode()
elif shape == "bin-metrics":
    body = b"".join(struct.pack("<H", len(n)) + n + struct.pack("<qqI", 60, 0, 0) for n in (b"m%d" % i for i in range(N)))
    data = struct.pack("<IqqI", 0xCC5B0001, 0, 1, N) + body + struct.pack("<I", 0)
else:
    body = b"".join(struct.pack("<H", len(n)) + n + struct.pack("<II", 0, 0) for n in (b"c%d" % i for i in range(N)))
    data = struct.pack("<IqqII", 0xCC5B0001, 0, 1, 0, N) + body
parse = parse_json if shape.startswith("json") else parse_binary
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
series = parse(data)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(len(data), len(series), grown)
"""
    proc = _run(["-c", script], tmp_path, limit=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    size, n_series, grown = map(int, proc.stdout.split())
    assert n_series == (1_000_000 if shape.endswith("metrics") else 0)
    assert size > 10_000_000
    # Python objects per item (orjson's dicts, one Series each): measured 5-20x the
    # file's size; a cost per item that grew with the item count would go far beyond.
    assert grown < 32 * size


# --- a whole CLI run with bombs beside good files ----------------------------------------------


@pytest.mark.slow
def test_cli_run_keeps_bombs_and_archives_the_rest_under_a_memory_limit(tmp_path: Path) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    good = [
        write_json(cp / "c" / "h1" / "100.json", level({"m": metric([1.0, None, 3.0])})),
        write_json(
            cp / "c" / "h2" / "100.json",
            level({}, {"socket0": level({"m": metric([4.0], frequency=10)})}),
        ),
    ]
    binary = cp / "c" / "h2" / "200.bin"
    binary.write_bytes(bin_file(bin_level({"b": (60, 500, [5.0, 6.0])})))
    good.append(binary)
    bomb_bin = cp / "c" / "h1" / "150.bin"
    bomb_bin.write_bytes(binary_bomb(BOMB_LEVELS))
    bomb_json = cp / "c" / "h2" / "150.json"
    bomb_json.write_bytes(json_bomb(BOMB_LEVELS))
    expected = expected_rows(good)

    # Under `ulimit -v` every thread's malloc arena (64 MiB of address space each, for
    # pyarrow's thread pool) counts against the limit although almost none of it is used:
    # two arenas, as one sets MALLOC_ARENA_MAX where address space is limited.
    proc = _run(
        ["-m", "workers.cli", *archive_argv(cp, archive, 1000, 2)],
        tmp_path,
        limit=True,
        env={"MALLOC_ARENA_MAX": "2"},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    kept = [line for line in proc.stderr.splitlines() if line.startswith("kept: ")]
    assert sorted(kept) == sorted(
        [
            f"kept: {bomb_bin}: nesting deeper than {MAX_DEPTH} levels at "
            "/abcd/abcd/abcd/abcd/...58 more.../abcd/abcd/abcd",
            f"kept: {bomb_json}: nesting deeper than 1024 JSON objects and arrays at byte "
            f"15361 (levels may nest {MAX_DEPTH} deep)",
        ]
    )
    assert bomb_bin.read_bytes() == binary_bomb(BOMB_LEVELS)
    assert bomb_json.read_bytes() == json_bomb(BOMB_LEVELS)
    assert not any(p.exists() for p in good)
    assert archive_rows(archive / "c" / "1000.parquet") == expected


# --- cutoffs ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("when", "message"),
    [
        (["--cutoff", str(2**63)], "fits in int64"),
        (["--cutoff", str(10**30)], "fits in int64"),
        (["--cutoff", "0"], "> 0"),
        (["--cutoff", "-5"], "> 0"),
        (["--retention", "2000000h"], "before 1970"),
        (["--retention", "3000000h"], "maximum"),
        (["--retention", "9" * 400 + "h"], "maximum"),
    ],
)
def test_cutoffs_out_of_range_are_usage_errors(
    tmp_path: Path, when: list[str], message: str
) -> None:
    cp = tmp_path / "cp"
    f = write_json(cp / "c" / "h" / "100.json", level({"m": metric([1.0])}))
    argv = [*archive_argv(cp, tmp_path / "a"), *when]
    proc = _run(["-m", "workers.cli", *argv], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ccarchive: error: ") and message in lines[0]
    assert f.exists() and not (tmp_path / "a" / "c").exists()


@pytest.mark.slow
def test_retention_from_the_environment_is_checked_too(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    write_json(cp / "c" / "h" / "100.json", level({"m": metric([1.0])}))
    env = {**_env(tmp_path), "CCARCHIVE_RETENTION": "3000000h"}
    argv = archive_argv(cp, tmp_path / "a")
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "CCARCHIVE_RETENTION" in proc.stderr


@pytest.mark.slow
def test_the_largest_cutoff_is_accepted_and_status_reads_its_archive(tmp_path: Path) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    write_json(cp / "c" / "h" / "100.json", level({"m": metric([1.0])}))
    proc = _run(["-m", "workers.cli", *archive_argv(cp, archive, 2**63 - 1, 1)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (archive / "c" / f"{2**63 - 1}.parquet").is_file()
    status = _run(["-m", "workers.cli", "status", "--archive", str(archive)], tmp_path)
    assert "Traceback" not in status.stderr
    assert status.returncode == 0, status.stderr
    assert str(2**63 - 1) in status.stdout


@pytest.mark.parametrize("cutoff", [0, -1, 2**63, 10**40])
def test_check_cutoff_refuses_values_outside_int64_and_not_positive(cutoff: int) -> None:
    with pytest.raises(steps.UnsafeName):
        steps.check_cutoff(cutoff)


def test_check_cutoff_accepts_the_whole_positive_int64_range() -> None:
    assert steps.check_cutoff(1) == 1
    assert steps.check_cutoff(2**63 - 1) == 2**63 - 1


# --- query and inspect on broken archive files --------------------------------------------------


@pytest.fixture
def broken_archive(tmp_path: Path) -> tuple[Path, Path, dict[str, Path], list[tuple[object, ...]]]:
    """An archive root with one good `<T>.parquet` and one broken file of each kind."""
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    write_json(cp / "c" / "h1" / "100.json", level({"m": metric([1.0, 2.0, None, 4.0])}))
    write_json(cp / "c" / "h2" / "100.json", level({"n": metric([5.0])}))
    proc = _run(["-m", "workers.cli", *archive_argv(cp, archive, 1000, 1)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    good = archive / "c" / "1000.parquet"
    rows = archive_rows(good)
    data = good.read_bytes()
    bad = {
        "truncated": archive / "c" / "100.parquet",
        "foreign": archive / "c" / "200.parquet",
        "not parquet": archive / "c" / "300.parquet",
        "directory": archive / "c" / "400.parquet",
    }
    bad["truncated"].write_bytes(data[: len(data) // 2])
    pq.write_table(pa.table({"x": [1, 2], "y": ["a", "b"]}), bad["foreign"])
    bad["not parquet"].write_text("this is no Parquet file\n")
    bad["directory"].mkdir()
    (bad["directory"] / "inner").write_text("x")
    return tmp_path, archive, bad, rows


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csv", "table", "parquet"])
def test_query_reports_each_broken_file_once_and_reads_the_others(
    broken_archive: tuple[Path, Path, dict[str, Path], list[tuple[object, ...]]], fmt: str
) -> None:
    tmp_path, archive, bad, rows = broken_archive
    out = tmp_path / "out.parquet"
    extra = ["--output", str(out)] if fmt == "parquet" else []
    argv = ["query", "--archive", str(archive), "--format", fmt, "--limit", "1000", *extra]
    proc = _run(["-m", "workers.cli", *argv], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    problems = [line for line in proc.stderr.splitlines() if line.startswith("problem: ")]
    assert len(problems) == len(bad)
    for kind, path in bad.items():
        (line,) = [p for p in problems if p.startswith(f"problem: {path}: ")]
        if kind == "foreign":
            assert "not a metric archive: no column cluster" in line
        elif kind == "directory":
            assert "a directory" in line
        else:
            assert "cannot read" in line
    if fmt == "csv":
        assert len(proc.stdout.strip().splitlines()) == 1 + len(rows)
    elif fmt == "parquet":
        assert pq.read_table(out).num_rows == len(rows)
    else:
        assert proc.stdout.count(" h1 ") + proc.stdout.count(" h2 ") == len(rows)


@pytest.mark.slow
def test_query_reports_a_file_that_breaks_while_it_is_read(tmp_path: Path) -> None:
    cp, archive = tmp_path / "cp", tmp_path / "archive"
    rng = np.random.default_rng(0)
    for cluster in ("a", "b"):
        data = rng.normal(size=5000).round(3).tolist()
        write_json(cp / cluster / "h" / "100.json", level({"m": metric(data)}))
    proc = _run(["-m", "workers.cli", *archive_argv(cp, archive, 1000, 1)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    broken = archive / "a" / "1000.parquet"
    data = bytearray(broken.read_bytes())
    meta = pq.ParquetFile(broken).metadata
    col = meta.row_group(0).column(meta.schema.names.index("value"))
    start = col.data_page_offset
    data[start : start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    broken.write_bytes(bytes(data))  # the footer is intact: the damage shows only on reading
    argv = ["query", "--archive", str(archive), "--format", "csv"]
    proc = _run(["-m", "workers.cli", *argv], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    problems = [line for line in proc.stderr.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1 and problems[0].startswith(f"problem: {broken}: cannot read")
    assert len(archive_rows(archive / "b" / "1000.parquet")) == 5000
    assert proc.stdout.count('\n"b",') == 5000


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "code", "message"),
    [
        ("truncated", 2, "is not a readable Parquet file"),
        ("not parquet", 2, "is not a readable Parquet file"),
        ("directory", 2, "is a directory, not a Parquet file"),
        ("foreign", 1, "not a metric archive: no column cluster"),
    ],
)
def test_inspect_reports_a_broken_file_in_one_line(
    broken_archive: tuple[Path, Path, dict[str, Path], list[tuple[object, ...]]],
    kind: str,
    code: int,
    message: str,
) -> None:
    tmp_path, _archive, bad, _rows = broken_archive
    proc = _run(["-m", "workers.cli", "inspect", str(bad[kind])], tmp_path)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad[kind]) in lines[0] and message in lines[0]
    if kind == "foreign":
        assert lines[0].startswith("problem: ")
        assert "x" in proc.stdout and "y" in proc.stdout  # described all the same


@pytest.mark.slow
def test_inspect_and_query_refuse_a_fifo_without_blocking(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    (archive / "c").mkdir(parents=True)
    fifo = archive / "c" / "100.parquet"
    os.mkfifo(fifo)
    proc = _run(["-m", "workers.cli", "inspect", str(fifo)], tmp_path, timeout=60)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr
    argv = ["query", "--archive", str(archive), "--format", "csv"]
    proc = _run(["-m", "workers.cli", *argv], tmp_path, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"problem: {fifo}: not a regular file" in proc.stderr


@pytest.mark.parametrize(
    "kwargs",
    [{"cutoff": 2**63}, {"cutoff": 0}, {"cutoff": "5"}, {"retention": "2000000h"}],
)
def test_the_plan_task_refuses_a_cutoff_out_of_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, object]
) -> None:
    # The distributed entry point (beat, or a forged message): refused before anything runs.
    from workers.distributed import tasks

    for key in ("checkpoints", "archive", "staging"):
        (tmp_path / key).mkdir()
        monkeypatch.setenv(f"CCARCHIVE_{key.upper()}", str(tmp_path / key))
    result = tasks.plan.run(mode="archive", **kwargs)
    assert result.keys() == {"error"} and "cutoff" in result["error"]
