"""Properties the performance work relies on, checked without timing anything.

- The archive is written with the encodings, statistics, page index and sort metadata
  chosen in bench/README.md, and readers use them: filters skip row groups.
- The fast paths are only optimisations: the vectorised JSON reader agrees bit for bit
  with the general one (and never accepts a file the general one rejects), is exact where
  SPEC §3 says so, and is taken for the files writers actually produce; the vectorised
  host table equals a plain sort of the rows.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.helpers import bin_file, bin_level, level, metric, write_json
from workers import checkpoint
from workers.checkpoint import BadCheckpoint, Series, parse_json
from workers.generate import binary_bytes, generate_tree, host_level, json_bytes
from workers.rows import host_table
from workers.runner import RunOptions, run
from workers.sink import ParquetOptions

CUTOFF = 10_000_000
STRINGS = ("cluster", "hostname", "metric", "scope", "scope_id")


# --- the archive file ---------------------------------------------------------------------


def _archive(cp: Path, out: Path, **parquet: Any) -> Path:
    reports = run(
        RunOptions(
            checkpoints=str(cp),
            cutoff=CUTOFF,
            archive=str(out),
            workers=1,
            parquet=ParquetOptions(**parquet),
        )
    )
    assert all(r.ok for r in reports), reports
    (path,) = out.rglob("*.parquet")
    return path


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 3-host cluster (one GPU host), archived with the default options."""
    root = tmp_path_factory.mktemp("gen")
    generate_tree(root / "cp", ["fritz"], hosts=2, samples=90, seed=3, start=600_000)
    gpu_host = root / "cp" / "fritz" / "f0003"
    rng = np.random.default_rng(1)
    lv = host_level(rng, 600_000, 90, gpus=2)
    (gpu_host / "600000.json").parent.mkdir(parents=True)
    (gpu_host / "600000.json").write_bytes(json_bytes(lv, 600_000, 600_000 + 90 * 60))
    return _archive(root / "cp", root / "archive")


def test_encodings_and_compression_are_the_chosen_ones(generated: Path) -> None:
    md = pq.ParquetFile(generated).metadata
    assert md.num_row_groups == 3
    names = [md.schema.column(i).name for i in range(md.num_columns)]
    for r in range(md.num_row_groups):
        rg = md.row_group(r)
        enc = {names[i]: set(rg.column(i).encodings) for i in range(md.num_columns)}
        for c in range(md.num_columns):
            assert rg.column(c).compression == "ZSTD"
        for col in (*STRINGS, "frequency"):
            assert "RLE_DICTIONARY" in enc[col], col
        assert "DELTA_BINARY_PACKED" in enc["timestamp"]
        # value: plain + zstd, neither dictionary nor byte-stream-split (bench/README.md).
        assert "PLAIN" in enc["value"]
        assert not enc["value"] & {"RLE_DICTIONARY", "PLAIN_DICTIONARY", "BYTE_STREAM_SPLIT"}


def test_statistics_and_page_index_where_they_can_skip_data(generated: Path) -> None:
    md = pq.ParquetFile(generated).metadata
    names = [md.schema.column(i).name for i in range(md.num_columns)]
    with_stats = {"hostname", "metric", "timestamp", "frequency", "value"}
    for r in range(md.num_row_groups):
        rg = md.row_group(r)
        for c, name in enumerate(names):
            col = rg.column(c)
            assert col.has_offset_index, (r, name)
            has = col.is_stats_set and col.statistics.has_min_max
            # cluster (constant per file) and scopes (all in every host's row group) can
            # skip nothing: no statistics for them (bench/README.md).
            assert has == (name in with_stats), (r, name)
            assert col.has_column_index == (name in with_stats), (r, name)
        host = rg.column(1).statistics
        assert host.min == host.max  # one host per row group


def test_sorting_columns_and_no_arrow_schema_in_footer(generated: Path) -> None:
    f = pq.ParquetFile(generated)
    sort = f.metadata.row_group(0).sorting_columns
    assert [(s.column_index, s.descending) for s in sort] == [
        (1, False),
        (2, False),
        (3, False),
        (4, False),
        (5, False),
    ]
    assert b"ARROW:schema" not in (f.metadata.metadata or {})
    # Readers see plain strings, as in upstream archives, not dictionaries.
    assert [str(t) for t in f.schema_arrow.types] == ["string"] * 5 + ["int64", "int64", "float"]


def test_pages_hold_at_most_page_rows(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    write_json(
        cp / "c" / "h" / "100.json",
        level({f"m{k}": metric([float(i % 7) for i in range(500)], 1, 100) for k in range(4)}),
    )
    path = _archive(cp, tmp_path / "out", page_rows=300)
    assert pq.ParquetFile(path).metadata.row_group(0).column(7).has_offset_index
    # 2000 values at <= 300 rows per data page (page headers read directly).
    pages = _data_page_rows(path, 7)
    assert sum(pages) == 2000 and max(pages) <= 300 and len(pages) >= 7


def _data_page_rows(path: Path, column: int) -> list[int]:
    """Rows per data page of one column chunk, from the page headers (no pyarrow API)."""
    md = pq.ParquetFile(path).metadata.row_group(0).column(column)
    with open(path, "rb") as f:
        start = md.dictionary_page_offset or md.data_page_offset
        f.seek(start)
        blob = f.read(md.total_compressed_size)
    rows, pos = [], 0
    while pos < len(blob):
        header, pos = _thrift_struct(blob, pos)
        size = header[3]  # compressed_page_size
        if header[1] == 0:  # DATA_PAGE: DataPageHeader(num_values = field 1)
            rows.append(header[5][1])
        elif header[1] == 3:  # DATA_PAGE_V2: num_rows = field 3
            rows.append(header[8][3])
        pos += size
    return rows


def _varint(b: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        byte = b[pos]
        pos += 1
        out |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return out, pos


def _thrift_struct(b: bytes, pos: int) -> tuple[dict[int, Any], int]:
    """Just enough of Thrift's compact protocol for Parquet page headers."""
    fields: dict[int, Any] = {}
    fid = 0
    while True:
        head = b[pos]
        pos += 1
        if head == 0:
            return fields, pos
        delta, kind = head >> 4, head & 0x0F
        if delta:
            fid += delta
        else:
            raw, pos = _varint(b, pos)
            fid = (raw >> 1) ^ -(raw & 1)
        if kind in (1, 2):  # bool true/false
            fields[fid] = kind == 1
        elif kind == 3:  # byte
            fields[fid] = b[pos]
            pos += 1
        elif kind in (4, 5, 6):  # i16, i32, i64: zigzag varints
            raw, pos = _varint(b, pos)
            fields[fid] = (raw >> 1) ^ -(raw & 1)
        elif kind == 8:  # binary
            n, pos = _varint(b, pos)
            fields[fid] = b[pos : pos + n]
            pos += n
        elif kind == 12:  # struct
            fields[fid], pos = _thrift_struct(b, pos)
        else:
            raise AssertionError(f"unexpected thrift type {kind}")


def _row_groups_kept(path: Path, expr: ds.Expression) -> int:
    (fragment,) = ds.dataset(path, format="parquet").get_fragments()
    return len(fragment.split_by_row_group(filter=expr))


def test_filters_on_host_metric_and_time_skip_row_groups(generated: Path, tmp_path: Path) -> None:
    assert _row_groups_kept(generated, ds.field("hostname") == "f0002") == 1
    assert _row_groups_kept(generated, ds.field("hostname") == "nope") == 0
    # Accelerator metrics exist on the GPU host only.
    assert _row_groups_kept(generated, ds.field("metric") == "acc_utilization") == 1
    # Time: hosts whose data lie in different windows.
    cp = tmp_path / "cp"
    write_json(cp / "c" / "early" / "100.json", level({"m": metric([1.0] * 50, 60, 100)}))
    write_json(cp / "c" / "late" / "900000.json", level({"m": metric([2.0] * 50, 60, 900_000)}))
    path = _archive(cp, tmp_path / "out")
    assert _row_groups_kept(path, ds.field("timestamp") >= 900_000) == 1
    assert _row_groups_kept(path, ds.field("timestamp") < 0) == 0
    table = ds.dataset(path).to_table(filter=ds.field("timestamp") >= 900_000)
    assert set(table.column("hostname").to_pylist()) == {"late"}


def test_duckdb_and_pyarrow_read_it(generated: Path) -> None:
    table = pq.read_table(generated)
    con = duckdb.connect()
    described = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{generated}')").fetchall()
    types = {row[0]: row[1] for row in described}
    assert types["hostname"] == "VARCHAR" and types["value"] == "FLOAT"
    assert types["timestamp"] == "BIGINT"
    counts = con.execute(
        f"SELECT count(*), count(DISTINCT hostname) FROM read_parquet('{generated}')"
    ).fetchall()
    assert counts == [(table.num_rows, 3)]
    ((got,),) = con.execute(
        f"SELECT count(*) FROM read_parquet('{generated}') "
        "WHERE hostname = 'f0001' AND metric = 'cpu_load' AND timestamp >= 603000"
    ).fetchall()
    mask = (
        (np.array(table.column("hostname").to_pylist()) == "f0001")
        & (np.array(table.column("metric").to_pylist()) == "cpu_load")
        & (table.column("timestamp").to_numpy() >= 603000)
    )
    assert got == int(mask.sum()) > 0


# --- the vectorised JSON reader --------------------------------------------------------------


def _same(a: list[Series], b: list[Series]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.metric, x.scope, x.scope_id, x.frequency, x.start) == (
            y.metric,
            y.scope,
            y.scope_id,
            y.frequency,
            y.start,
        )
        assert x.values.dtype == y.values.dtype == np.float32
        assert x.values.tobytes() == y.values.tobytes()


def _fast(data: bytes) -> list[Series] | None:
    """The vectorised reader's result, or None where it defers to the general reader."""
    try:
        return checkpoint._parse_json_fast(data)
    except Exception:
        return None


def _general(data: bytes) -> list[Series] | BadCheckpoint:
    try:
        return checkpoint._parse_json_general(data)
    except BadCheckpoint as exc:
        return exc


def test_fast_reader_takes_the_files_writers_produce() -> None:
    rng = np.random.default_rng(7)
    lv = host_level(rng, 1_000_000, 60, gpus=1)
    upstream = json_bytes(lv, 1_000_000, 1_003_600)
    doc = json.loads(upstream)
    styles = {
        "upstream": upstream,
        "upstream + newline": upstream + b"\n",
        "json.dumps": json.dumps(doc).encode(),
        "indented": json.dumps(doc, indent=2).encode(),
        "repr floats": json_bytes(lv, 1_000_000, 1_003_600, decimals=None),
    }
    for style, data in styles.items():
        fast = _fast(data)
        assert fast is not None, style
        _same(fast, checkpoint._parse_json_general(data))
        _same(parse_json(data), fast)


NUMBERS = [
    "0", "-0", "0.0", "-0.0", "1", "-1", "17", "12.5", "-12.5", "0.1", "0.30000000000000004",
    "1e-7", "1E-7", "1e+7", "-1e7", "2.5e-3", "1.5E10", "0e0", "-0e-0", "123456789012345678",
    "1234567890123456789012345678901234567890", "9007199254740993", "4.9e-324", "5e-324",
    "2.4703282292062328e-324", "1e-400", "-1e-400", "1.7976931348623157e308", "3.4028235e38",
    "3.4028236e38", "3.5e38", "-3.5e38", "1.401298464324817e-45", "7e-46", "7.1e-46",
    "0.000000000000000000000000000000000000000000001", "16777217", "16777216.5",
    "0.1000000000000000055511151231257827021181583404541015625", "123.456e-2", "999999.9",
    "1" + "0" * 308, "0." + "0" * 330 + "1", "1e05", "1E-007", "-0.5e+01",
]  # fmt: skip
INVALID = [
    "01", "-01", "00", "1.", ".5", "-.5", "+1", "1e", "1e+", "1.e5", "--1", "-", "1-2",
    "1.2.3", "1e5e5", "1e5.5", "0x10", "NaN", "Infinity", "-Infinity", "nul", "nulll",
    "Null", "true", "false", '"1"', "1 2", "", "1e400", "-1e400", "1" + "0" * 309, "[1]",
    "{}", "1_0", "１",
]  # fmt: skip


def _doc(values: list[str]) -> bytes:
    return (
        '{"from":0,"to":1,"metrics":{"m":{"frequency":60,"start":0,"data":['
        + ",".join(values)
        + ']}},"children":{}}'
    ).encode()


def _f32_bits(text: str) -> int:
    with np.errstate(over="ignore"):
        return int(np.array([float(text)], np.float64).astype(np.float32).view(np.uint32)[0])


def test_fast_reader_is_exact() -> None:
    series = _fast(_doc(NUMBERS))
    assert series is not None
    got = series[0].values.view(np.uint32).tolist()
    assert got == [_f32_bits(t) for t in NUMBERS]
    assert math.copysign(1.0, float(series[0].values[1])) == -1.0  # "-0" keeps its sign


def test_fast_reader_is_exact_on_random_decimals() -> None:
    rnd = random.Random(11)
    texts = []
    for _ in range(20_000):
        digits = "".join(rnd.choice("0123456789") for _ in range(rnd.randint(1, 25)))
        digits = digits.lstrip("0") or "0"
        text = digits
        if rnd.random() < 0.7:
            text += "." + "".join(rnd.choice("0123456789") for _ in range(rnd.randint(1, 20)))
        if rnd.random() < 0.3:
            text += rnd.choice("eE") + rnd.choice(["", "+", "-"]) + str(rnd.randint(0, 60))
        if rnd.random() < 0.5:
            text = "-" + text
        texts.append(text)
    series = _fast(_doc(texts))
    assert series is not None
    assert series[0].values.view(np.uint32).tolist() == [_f32_bits(t) for t in texts]


@pytest.mark.parametrize("token", INVALID)
def test_fast_reader_never_accepts_an_invalid_token(token: str) -> None:
    data = _doc(["1.5", token, "2.5"])
    assert _fast(data) is None
    assert isinstance(_general(data), BadCheckpoint)
    with pytest.raises(BadCheckpoint):
        parse_json(data)


def _random_document(rnd: random.Random) -> bytes:
    """Valid-looking checkpoints with every kind of small deviation."""

    def value() -> str:
        r = rnd.random()
        if r < 0.1:
            return "null"
        if r < 0.93:
            return (
                rnd.choice(NUMBERS[:30]) if rnd.random() < 0.3 else f"{rnd.uniform(-1e4, 1e4):.1f}"
            )
        return rnd.choice([*INVALID, '"x"', "[1,2]", '{"a":1}', "true"])

    def ws() -> str:
        return rnd.choice(["", "", "", " ", "\n  ", "\t"])

    def metric_obj() -> str:
        data = ("," + ws()).join(ws() + value() + ws() for _ in range(rnd.randint(0, 6)))
        fields = [f'"frequency":{rnd.choice(["60", "1", "-5", "0", "60.0", "-0"])}',
                  f'"start":{rnd.choice(["0", "1000", "-7", "9223372036854775807"])}',
                  f'"data":[{data}]']  # fmt: skip
        if rnd.random() < 0.2:
            fields.append(
                rnd.choice(['"unit":"GB/s [x]"', '"x":[[1],[]]', '"y":[]', '"z":{"a":[1]}'])
            )
        rnd.shuffle(fields)
        return "{" + ",".join(fields) + "}"

    def level_obj(depth: int) -> str:
        names = ["cpu_load", "mem_bw", "a[0]", 'q"', "ü", "data"]
        metrics = ",".join(
            f'"{rnd.choice(names)}{k}":{metric_obj()}' for k in range(rnd.randint(0, 3))
        )
        parts = [f'"metrics":{{{metrics}}}']
        if depth < 2 and rnd.random() < 0.7:
            kids = ",".join(
                f'"{rnd.choice(["socket", "cpu", "core", "nvme"])}{k}":{level_obj(depth + 1)}'
                for k in range(rnd.randint(0, 2))
            )
            parts.append(f'"children":{{{kids}}}')
        elif depth == 0:
            parts.append('"children":{}')
        if depth == 0:
            parts += ['"from":0', '"to":1']
        rnd.shuffle(parts)
        return "{" + ws() + ",".join(parts) + ws() + "}"

    text = level_obj(0)
    r = rnd.random()
    if r < 0.05:
        text += "x"
    elif r < 0.1:
        text = text[: rnd.randint(0, len(text))]
    elif r < 0.15:
        text = text.replace("1", "\\u0031", 1)
    return text.encode()


@pytest.mark.slow
def test_fast_reader_agrees_with_the_general_reader() -> None:
    rnd = random.Random(5)
    taken = declined = 0
    for _ in range(3000):
        data = _random_document(rnd)
        fast, general = _fast(data), _general(data)
        if fast is None:
            # It defers only where it must: backslash escapes (or a file that is bad).
            declined += not isinstance(general, BadCheckpoint) and b"\\" not in data
            continue
        taken += 1
        # Never accepts what the general reader rejects, and gives the same series.
        assert not isinstance(general, BadCheckpoint), (data, general)
        _same(fast, general)
    assert declined == 0
    assert taken > 600  # the comparison exercised the fast path


# --- the vectorised host table ----------------------------------------------------------------


def _plain_rows(series: list[Series]) -> list[tuple[str, str, str, int, int, int]]:
    """host_table's rows the obvious way: series in (key, start) order, every present
    value, then a stable sort by (key, timestamp)."""
    rows = []
    ordered = sorted(series, key=lambda s: (s.metric, s.scope, s.scope_id, s.start))
    for s in ordered:
        for i, v in enumerate(s.values.tolist()):
            if v == v:
                bits = struct.unpack("<I", struct.pack("<f", v))[0]
                rows.append(
                    (s.metric, s.scope, s.scope_id, s.start + i * s.frequency, s.frequency, bits)
                )
    rows.sort(key=lambda r: (r[0].encode(), r[1].encode(), r[2].encode(), r[3]))
    return rows


def test_host_table_equals_a_plain_sort() -> None:
    rnd = random.Random(3)
    for trial in range(60):
        series = []
        for _ in range(rnd.randint(0, 12)):
            n = rnd.randint(0, 30)
            values = np.array(
                [rnd.choice([np.nan, rnd.uniform(-5, 5), -0.0]) for _ in range(n)], np.float32
            )
            series.append(
                Series(
                    rnd.choice(["cpu_load", "mem_bw", "ü"]),
                    rnd.choice(["node", "hwthread"]),
                    rnd.choice(["", "7", "10"]),
                    rnd.choice([60, 60, 60, 10, 0, -60]) if trial % 3 else 60,
                    rnd.choice([0, 600, 1200, 1230, -60]),
                    values,
                )
            )
        table = host_table(series)
        got = list(
            zip(
                *(table.column(c).to_pylist() for c in ("metric", "scope", "scope_id")),
                table.column("timestamp").to_pylist(),
                table.column("frequency").to_pylist(),
                table.column("value").to_numpy().view(np.uint32).tolist(),
                strict=True,
            )
        )
        assert got == _plain_rows(series), trial


def _random_series(rnd: random.Random, trial: int, long: bool = False) -> list[Series]:
    series = []
    for _ in range(rnd.randint(0, 12)):
        n = rnd.randint(200, 400) if long else rnd.randint(0, 30)
        values = np.array(
            [rnd.choice([np.nan, rnd.uniform(-5, 5), -0.0]) for _ in range(n)], np.float32
        )
        series.append(
            Series(
                rnd.choice(["cpu_load", "mem_bw", "ü"]),
                rnd.choice(["node", "hwthread"]),
                rnd.choice(["", "7", "10"]),
                rnd.choice([60, 60, 60, 10, 0, -60]) if trial % 3 else 60,
                rnd.choice([0, 600, 1200, 1230, -60]),
                values,
            )
        )
    return series


def _table_rows(table: Any) -> list[tuple[Any, ...]]:
    return list(
        zip(
            *(table.column(c).to_pylist() for c in ("metric", "scope", "scope_id")),
            table.column("timestamp").to_pylist(),
            table.column("frequency").to_pylist(),
            table.column("value").to_numpy().view(np.uint32).tolist(),
            strict=True,
        )
    )


def test_host_table_of_several_files_equals_a_plain_sort() -> None:
    # The load path hands host_table one FileBatch per file: codes are per file, and ties
    # (same key and start in two files) must keep file order, as one list of series would.
    rnd = random.Random(11)
    for trial in range(60):
        # Every fourth trial long series: host_table copies those slice by slice.
        files = [_random_series(rnd, trial, trial % 4 == 0) for _ in range(rnd.randint(1, 4))]
        table = host_table([checkpoint.FileBatch.from_series(f) for f in files])
        everything = [s for f in files for s in f]
        assert _table_rows(table) == _plain_rows(everything), trial
        assert table.num_rows == sum(checkpoint.FileBatch.from_series(f).rows for f in files)


# --- the binary reader's fast path ----------------------------------------------------------


def _random_binary(rnd: random.Random) -> bytes:
    def lvl(depth: int) -> bytes:
        metrics = {}
        for k in range(rnd.randint(0, 3)):
            n = rnd.randint(0, 5)
            start = rnd.choice([0, 1000, -7, 2**63 - 1, -(2**63), 2**62])
            frequency = rnd.choice([60, 0, -5, 2**40, 2**62])
            raw = [rnd.choice([1.5, -0.0, float("nan"), float("inf")]) for _ in range(n)]
            metrics[rnd.choice(["cpu_load", "mem_bw", "ü", "", "n" * 300]) + str(k)] = (
                frequency,
                start,
                raw,
            )
        kids = {}
        if depth < 3:
            for k in range(rnd.randint(0, 3)):
                kids[rnd.choice(["socket", "cpu", "core", "nvme", "hwthread", ""]) + str(k)] = lvl(
                    depth + 1
                )
        return bin_level(metrics, kids)

    data = bin_file(lvl(0))
    r = rnd.random()
    if r < 0.15:
        data = data[: rnd.randint(0, len(data))]
    elif r < 0.3:
        i = rnd.randrange(len(data))
        data = data[:i] + bytes([rnd.randrange(256)]) + data[i + 1 :]
    elif r < 0.35:
        data += b"trailing"
    return data


@pytest.mark.slow
def test_fast_binary_reader_agrees_with_the_checked_one() -> None:
    rnd = random.Random(9)
    rng = np.random.default_rng(9)
    generated = [binary_bytes(host_level(rng, 1_000_000, 60, gpus=1), 1_000_000, 1_003_600)]
    taken = 0
    for data in generated + [_random_binary(rnd) for _ in range(3000)]:
        try:
            checked: list[Series] | BadCheckpoint = checkpoint._parse_binary_checked(data)
        except BadCheckpoint as exc:
            checked = exc
        try:
            fast = checkpoint._binary_batch_fast(data).series()
        except Exception:
            # Only bad files leave the fast path: the checked reader says why.
            assert isinstance(checked, BadCheckpoint), data
            continue
        assert not isinstance(checked, BadCheckpoint), (data, checked)
        _same(fast, checked)
        taken += 1
    assert taken > 500  # many random files are bad: truncated, overflowing timestamps


# --- process-wide allocator settings ----------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize(
    ("env", "pool"), [({}, "system"), ({"CCARCHIVE_MALLOC_TUNING": "0"}, None)]
)
def test_allocator_is_tuned_once_a_step_runs(env: dict[str, str], pool: str | None) -> None:
    code = (
        "import pyarrow as pa; before = pa.default_memory_pool().backend_name\n"
        "from workers.checkpoint import parse_json\n"
        'parse_json(b\'{"metrics":{},"children":{}}\')\n'
        "print(before, pa.default_memory_pool().backend_name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout.split()
    assert out[1] == (pool or out[0])
