"""Tests for workers.generate: the checkpoint writers and the synthetic tree generator.

Outputs are decoded independently here (orjson/json, struct), never with project readers.
"""

import json
import math
import re
import struct
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from workers.generate import (
    GenerateSummary,
    Level,
    Metric,
    binary_bytes,
    generate_tree,
    host_level,
    json_bytes,
    write_checkpoint,
)

MAGIC = 0xCC5B0001


# --- independent decoders ----------------------------------------------------------------------


def decode_binary(data: bytes) -> tuple[int, int, dict]:
    """Parse SPEC §2 binary into (from, to, {"metrics": {name: (freq, start, f32 array)},
    "children": {...}}); asserts that the whole buffer is consumed."""
    magic, from_, to = struct.unpack_from("<Iqq", data, 0)
    assert magic == MAGIC
    pos = 20

    def name() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<H", data, pos)
        raw = data[pos + 2 : pos + 2 + n]
        assert len(raw) == n
        pos += 2 + n
        return raw.decode("utf-8")

    def level() -> dict:
        nonlocal pos
        (nm,) = struct.unpack_from("<I", data, pos)
        pos += 4
        metrics = {}
        for _ in range(nm):
            key = name()
            freq, start, nv = struct.unpack_from("<qqI", data, pos)
            pos += 20
            vals = np.frombuffer(data, "<f4", nv, pos)
            pos += 4 * nv
            metrics[key] = (freq, start, vals)
        (nc,) = struct.unpack_from("<I", data, pos)
        pos += 4
        children = {}
        for _ in range(nc):
            key = name()
            children[key] = level()
        return {"metrics": metrics, "children": children}

    tree = level()
    assert pos == len(data)
    return from_, to, tree


def walk_json(doc: dict, path: tuple[str, ...] = ()):
    for name, m in doc["metrics"].items():
        yield (*path, name), m
    for cname, child in doc.get("children", {}).items():
        yield from walk_json(child, (*path, cname))


def walk_bin(tree: dict, path: tuple[str, ...] = ()):
    for name, m in tree["metrics"].items():
        yield (*path, name), m
    for cname, child in tree["children"].items():
        yield from walk_bin(child, (*path, cname))


def same_f32(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality except that any NaN equals any NaN."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    return a.shape == b.shape and bool(
        np.all((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b)))
    )


# --- hand-made levels --------------------------------------------------------------------------


def sample_level() -> Level:
    return Level(
        metrics={
            "mem_used": Metric(60, 1000, np.array([1.0, np.nan, 2.25, -3.5, 0.0])),
            '温度 "q" \\ 🌡': Metric(10, 1005, np.array([12.34, np.nan, np.nan])),
            "empty": Metric(60, 1000, np.array([], dtype=np.float64)),
        },
        children={
            "socket0": Level(
                metrics={"power": Metric(60, 1000, np.array([100.05, 99.95]))},
                children={
                    "core0": Level(metrics={"clock": Metric(60, 1060, np.array([2400.0]))}),
                    "cœur1": Level(),
                },
            ),
            "accelerator00000000:3B:00.0": Level(
                metrics={"acc_power": Metric(60, 1000, np.array([np.nan, 250.0], np.float32))}
            ),
        },
    )


def test_json_bytes_structure_and_values() -> None:
    lv = sample_level()
    data = json_bytes(lv, 1000, 1300)
    doc = orjson.loads(data)
    assert doc == json.loads(data)
    assert doc["from"] == 1000 and doc["to"] == 1300
    assert doc["metrics"]["mem_used"] == {
        "frequency": 60,
        "start": 1000,
        "data": [1.0, None, 2.2, -3.5, 0.0],  # 2.25 is a tie: half-even, like Go and Python
    }
    assert doc["metrics"]['温度 "q" \\ 🌡']["data"] == [12.3, None, None]
    assert doc["metrics"]["empty"]["data"] == []
    sock = doc["children"]["socket0"]
    assert sock["metrics"]["power"]["data"] == [round(100.05, 1), round(99.95, 1)]
    assert sock["children"]["core0"]["metrics"]["clock"] == {
        "frequency": 60,
        "start": 1060,
        "data": [2400.0],
    }
    # Inner levels always carry both keys, even when empty.
    assert sock["children"]["cœur1"] == {"metrics": {}, "children": {}}
    assert doc["children"]["accelerator00000000:3B:00.0"]["metrics"]["acc_power"]["data"] == [
        None,
        250.0,
    ]
    # One decimal, exactly as the upstream writer prints it.
    assert b'"data":[1.0,null,2.2,-3.5,0.0]' in data
    assert b'"data":[2400.0]' in data
    assert b"NaN" not in data


def test_json_one_decimal_matches_python_rounding() -> None:
    rng = np.random.default_rng(3)
    k = rng.integers(-(10**6), 10**6, 5000)
    v = np.concatenate(
        [
            k / 20,  # exact binary ties and decimal near-ties
            np.nextafter(k / 20, np.inf),
            np.nextafter(k / 20, -np.inf),
            rng.standard_normal(5000) * 10.0 ** rng.integers(-8, 17, 5000),
            [0.0, -0.0, -0.04, 1e-320, 0.05, 0.15, 0.25, 0.35, 9.95, 999.95, 1e20, -1e300],
            [np.nan, 5e-324, 4.5e14, 4.6e15],
        ]
    )
    chunks = np.array_split(v, 7)
    lv = Level(metrics={f"m{i}": Metric(60, 0, c) for i, c in enumerate(chunks)})
    data = json_bytes(lv, 0, 60)
    doc = orjson.loads(data)
    assert doc == json.loads(data)
    got = [x for i in range(len(chunks)) for x in doc["metrics"][f"m{i}"]["data"]]
    for x, y in zip(got, v.tolist(), strict=True):
        if math.isnan(y):
            assert x is None
        else:
            assert x == round(y, 1), (x, y)
            assert math.copysign(1.0, x) == math.copysign(1.0, y)  # "-0.0" for -0.04
    # Byte-for-byte what Python's correctly rounded formatting prints (Go's 'f', 1 agrees).
    first = ",".join("null" if x != x else f"{x:.1f}" for x in chunks[0].tolist())
    assert f'"m0":{{"frequency":60,"start":0,"data":[{first}]}}'.encode() in data


def test_json_decimals_none_is_exact_repr() -> None:
    vals = [0.1 + 0.2, 1e-7, 1e300, 5e-324, -0.0, 123456789.123456789, float("nan"), 1 / 3, 1e16]
    lv = Level(
        metrics={"x": Metric(60, 0, np.array(vals))},
        children={"hwthread0": Level(metrics={"y": Metric(60, 0, np.array([2.5, -7.0]))})},
    )
    data = json_bytes(lv, 0, 540, decimals=None)
    doc = orjson.loads(data)
    assert doc == json.loads(data)
    text = ",".join("null" if v != v else repr(v) for v in vals)
    assert f'"data":[{text}]'.encode() in data
    got = doc["metrics"]["x"]["data"]
    for x, y in zip(got, vals, strict=True):
        if math.isnan(y):
            assert x is None
        else:
            assert struct.pack("<d", float(x)) == struct.pack("<d", y)
    assert doc["children"]["hwthread0"]["metrics"]["y"]["data"] == [2.5, -7.0]


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_json_rejects_infinity(decimals: int | None, bad: float) -> None:
    lv = Level(children={"c": Level(metrics={"m": Metric(60, 0, np.array([1.0, bad]))})})
    with pytest.raises(ValueError):
        json_bytes(lv, 0, 120, decimals=decimals)


def test_binary_bytes_round_trip() -> None:
    lv = sample_level()
    lv.metrics["inf"] = Metric(60, 0, np.array([math.inf, -math.inf, 1e300]))
    data = binary_bytes(lv, -5, 2**40)
    from_, to, tree = decode_binary(data)
    assert (from_, to) == (-5, 2**40)
    got = dict(walk_bin(tree))

    def expected(level: Level, path: tuple[str, ...] = ()):
        for name, m in level.metrics.items():
            yield (*path, name), m
        for cname, child in level.children.items():
            yield from expected(child, (*path, cname))

    want = dict(expected(lv))
    assert list(got) == list(want)  # same names, same order, including nesting
    for key, m in want.items():
        freq, start, vals = got[key]
        assert (freq, start) == (m.frequency, m.start)
        with np.errstate(over="ignore"):
            assert same_f32(vals, np.asarray(m.values).astype(np.float32)), key
    assert np.isnan(got[("mem_used",)][2][1])
    assert list(got[("inf",)][2]) == [np.inf, -np.inf, np.inf]  # float32 overflow is inf
    assert tree["children"]["socket0"]["children"]["cœur1"] == {"metrics": {}, "children": {}}


def test_write_checkpoint(tmp_path: Path) -> None:
    lv = sample_level()
    p = tmp_path / "fritz" / "f0001" / "1000.json"
    size = write_checkpoint(p, lv, 1000, 1300)
    assert size == p.stat().st_size
    assert p.read_bytes() == json_bytes(lv, 1000, 1300)
    q = p.with_name("1000.bin")
    assert write_checkpoint(q, lv, 1000, 1300, fmt="bin") == q.stat().st_size
    assert q.read_bytes() == binary_bytes(lv, 1000, 1300)
    r = p.with_name("1001.json")
    write_checkpoint(r, lv, 1000, 1300, decimals=None)
    assert r.read_bytes() == json_bytes(lv, 1000, 1300, decimals=None)
    assert sorted(x.name for x in p.parent.iterdir()) == ["1000.bin", "1000.json", "1001.json"]
    with pytest.raises(ValueError):
        write_checkpoint(p, lv, 0, 1, fmt="xml")


# --- synthetic data ----------------------------------------------------------------------------


def test_host_level_shape_and_realism() -> None:
    lv = host_level(np.random.default_rng(7), 1_700_000_000, 720, gpus=4)
    data = json_bytes(lv, 1_700_000_000, 1_700_043_200)
    doc = orjson.loads(data)
    series = list(walk_json(doc))
    names = [p for p, _ in series]
    assert 900 <= len(series) <= 1100
    children = list(doc["children"])
    assert children[:4] == ["socket0", "socket1", "memoryDomain0", "memoryDomain1"]
    assert [f"hwthread{i}" for i in range(72)] == [c for c in children if c.startswith("hwthread")]
    gpus = [c for c in children if c.startswith("accelerator")]
    assert len(gpus) == 4 and gpus[0] == "accelerator00000000:3B:00.0"
    assert all(re.fullmatch(r"accelerator00000000:[0-9A-F]{2}:00\.0", g) for g in gpus)
    # Cores are grandchildren: core0..17 under socket0, core18..35 under socket1.
    assert list(doc["children"]["socket0"]["children"]) == [f"core{i}" for i in range(18)]
    assert list(doc["children"]["socket1"]["children"]) == [f"core{i}" for i in range(18, 36)]
    assert len({n[-1] for n in names if n[0].startswith("hwthread")}) >= 10
    assert {"mem_used", "mem_bw", "load_one", "net_bytes_in", "ib_recv", "cpu_power"} <= set(
        doc["metrics"]
    )
    slots = sum(len(m["data"]) for _, m in series)
    missing = sum(x is None for _, m in series for x in m["data"])
    assert 680_000 <= slots <= 720 * 1100
    assert 0.002 < missing / slots < 0.03
    for _, m in series:
        assert m["frequency"] == 60
        assert (m["start"] - 1_700_000_000) % 60 == 0
        assert m["start"] + 60 * len(m["data"]) == 1_700_043_200
    # Values are already on one decimal, so JSON and binary carry the same numbers.
    for m in list(lv.metrics.values()) + list(lv.children["hwthread5"].metrics.values()):
        v = m.values[~np.isnan(m.values)]
        assert np.array_equal(v, np.round(v, 1))
        assert (v >= 0).all()
    # Some series are constant (plateaus and fixed values compress, like real data).
    constant = sum(1 for _, m in series if len({x for x in m["data"] if x is not None}) == 1)
    assert constant >= 3


def test_host_level_without_missing_values() -> None:
    lv = host_level(np.random.default_rng(1), 0, 50, frequency=30, nan_fraction=0.0)
    series = list(walk_json(orjson.loads(json_bytes(lv, 0, 1500))))
    assert all(m["start"] == 0 and len(m["data"]) == 50 for _, m in series)
    assert all(x is not None for _, m in series for x in m["data"])
    assert not any(p[0].startswith("accelerator") for p, _ in series)


def test_host_level_tiny_sample_counts() -> None:
    for samples in (1, 2, 3, 5):
        lv = host_level(np.random.default_rng(samples), 60, samples, frequency=3600, gpus=1)
        _, _, tree = decode_binary(binary_bytes(lv, 60, 60 + samples * 3600))
        assert all(len(v) <= samples for _, (_, _, v) in walk_bin(tree))


# --- trees -------------------------------------------------------------------------------------


def tree_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_tree_layout_and_summary(tmp_path: Path) -> None:
    start = 1_700_000_000 // 3600 * 3600
    s = generate_tree(
        tmp_path, ["fritz", "alex"], 3, files_per_host=2, samples=30, start=start, gpus=1
    )
    assert isinstance(s, GenerateSummary)
    assert s.root == tmp_path and s.clusters == ["fritz", "alex"]
    assert s.hosts == 6 and s.files == 12
    assert s.first_ts == start and s.last_ts == start + 2 * 30 * 60 - 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alex", "fritz"]
    hosts = sorted(p.name for p in (tmp_path / "fritz").iterdir())
    assert hosts == ["f0001", "f0002", "f0003"]
    assert sorted(p.name for p in (tmp_path / "alex").iterdir()) == ["a0001", "a0002", "a0003"]
    total_bytes = total_values = 0
    for cluster in ("fritz", "alex"):
        for host in (tmp_path / cluster).iterdir():
            assert re.fullmatch(r"[A-Za-z0-9-]+", host.name)
            files = sorted(host.iterdir())
            assert [f.name for f in files] == [f"{start}.json", f"{start + 1800}.json"]
            for k, f in enumerate(files):
                doc = orjson.loads(f.read_bytes())
                assert doc["from"] == start + k * 1800 == int(f.stem)
                assert doc["to"] == start + (k + 1) * 1800
                series = list(walk_json(doc))
                for _, m in series:
                    assert doc["from"] <= m["start"] < doc["to"]
                    assert m["start"] + 60 * len(m["data"]) == doc["to"]
                total_values += sum(x is not None for _, m in series for x in m["data"])
                total_bytes += f.stat().st_size
    assert s.bytes == total_bytes
    assert s.values == total_values
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_tree_is_deterministic(tmp_path: Path) -> None:
    args = {"clusters": ["c1"], "hosts": 2, "samples": 20, "start": 3600, "fmt": "mixed"}
    a = generate_tree(tmp_path / "a", seed=5, **args)
    b = generate_tree(tmp_path / "b", seed=5, workers=2, **args)
    c = generate_tree(tmp_path / "c", seed=6, **args)
    assert tree_files(tmp_path / "a") == tree_files(tmp_path / "b")
    assert a.bytes == b.bytes and a.values == b.values
    assert tree_files(tmp_path / "a").keys() == tree_files(tmp_path / "c").keys()
    assert tree_files(tmp_path / "a") != tree_files(tmp_path / "c")
    assert c.files == 2


def test_mixed_format(tmp_path: Path) -> None:
    s = generate_tree(tmp_path, ["x"], 2, files_per_host=3, fmt="mixed", samples=10, start=0)
    assert s.files == 6
    got = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    # Hosts and files alternate: host 1 starts with json, host 2 with bin.
    assert got == {
        "x/x0001/0.json",
        "x/x0001/600.bin",
        "x/x0001/1200.json",
        "x/x0002/0.bin",
        "x/x0002/600.json",
        "x/x0002/1200.bin",
    }
    rows = 0
    for p in tmp_path.rglob("*.bin"):
        from_, to, tree = decode_binary(p.read_bytes())
        assert from_ == int(p.stem) and to == from_ + 600
        rows += sum(int(np.count_nonzero(~np.isnan(v))) for _, (_, _, v) in walk_bin(tree))
    for p in tmp_path.rglob("*.json"):
        doc = orjson.loads(p.read_bytes())
        rows += sum(x is not None for _, m in walk_json(doc) for x in m["data"])
    assert rows == s.values


def test_json_and_bin_carry_the_same_values(tmp_path: Path) -> None:
    generate_tree(tmp_path / "j", ["c"], 1, samples=40, start=0, fmt="json", seed=9)
    generate_tree(tmp_path / "b", ["c"], 1, samples=40, start=0, fmt="bin", seed=9)
    doc = orjson.loads((tmp_path / "j/c/c0001/0.json").read_bytes())
    _, _, tree = decode_binary((tmp_path / "b/c/c0001/0.bin").read_bytes())
    js = dict(walk_json(doc))
    bs = dict(walk_bin(tree))
    assert list(js) == list(bs)
    for key, m in js.items():
        freq, start, vals = bs[key]
        assert (freq, start) == (m["frequency"], m["start"])
        want = np.array([np.nan if x is None else x for x in m["data"]], np.float64)
        assert same_f32(vals, want.astype(np.float32)), key


_NUMBER = re.compile(rb"-?[0-9]+(?:\.[0-9]+)?|null")


def written_digits(token: bytes) -> int:
    """Significant digits as printed: leading and trailing zeros dropped (1234000 has 4)."""
    return len(token.lstrip(b"-").replace(b".", b"").strip(b"0"))


@pytest.mark.slow
def test_hourly_shape(tmp_path: Path) -> None:
    s = generate_tree(
        tmp_path, ["c"], 3, files_per_host=4, fmt="mixed", samples=60, start=0, shape="hourly"
    )
    assert s.files == 12
    jsons = sorted(tmp_path.rglob("*.json"))
    bins = sorted(tmp_path.rglob("*.bin"))
    assert len(jsons) == len(bins) == 6
    slots = missing = rows = 0
    digits: list[int] = []
    for p in jsons:
        raw = p.read_bytes()
        doc = orjson.loads(raw)
        series = list(walk_json(doc))
        assert 950 <= len(series) <= 1050, p
        for _, m in series:
            assert m["frequency"] == 60 and 1 <= len(m["data"]) <= 60
        assert sum(len(m["data"]) == 60 for _, m in series) >= 0.95 * len(series)
        data = [x for _, m in series for x in m["data"]]
        slots += len(data)
        missing += sum(x is None for x in data)
        rows += sum(x is not None for x in data)
        # The text of every value inside the "data" arrays.
        for chunk in re.findall(rb'"data":\[([^\]]*)\]', raw):
            digits += [written_digits(t) for t in _NUMBER.findall(chunk) if t != b"null"]
    for p in bins:
        _, _, tree = decode_binary(p.read_bytes())
        series = list(walk_bin(tree))
        assert 950 <= len(series) <= 1050, p
        vals = np.concatenate([v for _, (_, _, v) in series])
        slots += len(vals)
        missing += int(np.isnan(vals).sum())
        rows += int((~np.isnan(vals)).sum())
    assert rows == s.values
    # ~2 % of the written values are null (JSON) or NaN (binary).
    assert 0.01 <= missing / slots <= 0.03, missing / slots
    nonzero = np.array([d for d in digits if d > 0])
    # Each series' largest value has 4-6 significant digits (7 when rounding carries, 9.99996
    # -> 10.0000); smaller values of the series print fewer. Most values carry 4-6.
    assert nonzero.max() <= 7
    assert 4 <= np.median(nonzero) <= 6
    assert np.mean((nonzero >= 4) & (nonzero <= 6)) >= 0.6
    # One-decimal node trees, by contrast, keep their single fraction digit.
    text = (tmp_path / "c" / "c0001" / "0.json").read_bytes()
    assert re.search(rb"[0-9]\.[0-9]{3,}", text)


def test_metric_decimals_override_the_file_setting() -> None:
    level = Level(
        metrics={
            "a": Metric(60, 0, np.array([1.23456, np.nan]), decimals=3),
            "b": Metric(60, 0, np.array([2.25])),
        }
    )
    doc = json_bytes(level, 0, 120, decimals=1)
    assert b'"data":[1.235,null]' in doc
    assert b'"data":[2.2]' in doc  # half-even on the binary value, like Go's strconv


def test_default_start_leaves_room_for_retention(tmp_path: Path) -> None:
    s = generate_tree(tmp_path, ["c"], 1, files_per_host=4, samples=720)
    now = time.time()
    assert s.first_ts % 3600 == 0
    assert s.first_ts <= now - 7 * 86400
    newest_end = s.first_ts + 4 * 720 * 60
    assert newest_end <= now - 3 * 86400
    assert sorted(int(p.stem) for p in (tmp_path / "c" / "c0001").iterdir()) == [
        s.first_ts + k * 43200 for k in range(4)
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clusters": ["../evil"]},
        {"clusters": ["a b"]},
        {"clusters": ["a", "a"]},
        {"fmt": "xml"},
        {"samples": 0},
        {"files_per_host": 0},
        {"shape": "daily"},
    ],
)
def test_generate_tree_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    args = {"clusters": ["ok"], "hosts": 1, "samples": 5, "start": 0} | kwargs
    with pytest.raises(ValueError):
        generate_tree(tmp_path, **args)


def test_seed_moves_the_default_timestamps(tmp_path: Path) -> None:
    """Another seed, other file names: regenerating a tree with a new seed never produces
    same-named files with other content (which recovery would report as changed)."""
    a = generate_tree(tmp_path / "a", ["c"], 1, files_per_host=2, samples=30, seed=0)
    b = generate_tree(tmp_path / "b", ["c"], 1, files_per_host=2, samples=30, seed=7)
    names_a = {p.name for p in (tmp_path / "a" / "c" / "c0001").iterdir()}
    names_b = {p.name for p in (tmp_path / "b" / "c" / "c0001").iterdir()}
    assert a.first_ts - b.first_ts == 7 * 60
    assert names_a.isdisjoint(names_b) and len(names_b) == 2
