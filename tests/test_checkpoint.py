"""Readers and naming rules (SPEC §2–3), checked value by value."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from tests.helpers import bin_file, bin_level, f32_bits, level, metric
from workers.checkpoint import BadCheckpoint, parse_binary, parse_json, parse_scope
from workers.paths import checkpoint_timestamp


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("socket0", ("socket", "0")),
        ("socket12", ("socket", "12")),
        ("memoryDomain3", ("memoryDomain", "3")),
        ("core35", ("core", "35")),
        ("hwthread71", ("hwthread", "71")),
        ("cpu7", ("hwthread", "7")),
        ("accelerator00000000:3B:00.0", ("accelerator", "00000000:3B:00.0")),
        ("accelerator0", ("accelerator", "0")),
        ("socketX", ("socketX", "")),
        ("socket", ("socket", "")),
        ("nvme", ("nvme", "")),
        ("cpu", ("cpu", "")),
        ("cpuX1", ("cpuX1", "")),
        ("core٣", ("core٣", "")),  # a non-ASCII digit is no digit here
        ("coreA0", ("coreA0", "")),
        ("Socket0", ("Socket0", "")),
        ("socket0a", ("socket", "0a")),
    ],
)
def test_scope_rule(name: str, expected: tuple[str, str]) -> None:
    assert parse_scope(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("1700000000.json", 1_700_000_000),
        ("1700000000.bin", 1_700_000_000),
        ("0.json", 0),
        ("000123.bin", 123),
        (f"{2**63 - 1}.json", 2**63 - 1),
        ("current.wal", None),
        ("1700000000.bin.tmp", None),
        ("1700000000.JSON", None),
        ("1700000000.json~", None),
        ("1700000000.bak", None),
        ("notes.txt", None),
        ("json", None),
    ],
)
def test_file_names(name: str, expected: int | None) -> None:
    assert checkpoint_timestamp(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "abc.json",
        "1_000.json",
        "-5.json",
        "+5.json",
        "١٢٣.json",
        f"{2**63}.bin",
        ".json",
        " 12.json",
        "1e3.json",
    ],
)
def test_bad_file_names(name: str) -> None:
    assert isinstance(checkpoint_timestamp(name), BadCheckpoint)


def _rows(series: list) -> list[tuple]:
    out = []
    for s in series:
        for i, v in enumerate(s.values):
            if not math.isnan(v):
                out.append(
                    (
                        s.metric,
                        s.scope,
                        s.scope_id,
                        s.start + i * s.frequency,
                        s.frequency,
                        int(np.float32(v).view(np.uint32)),
                    )
                )
    return out


def test_json_values_round_through_float64() -> None:
    texts = [
        "12.3",
        "1e-7",
        "-0",
        "-0.0",
        "17",
        "0.30000000000000004441",
        "3.4028235677973366e38",
        "1e39",
        "-1e39",
        "1e-50",
        "-1e-50",
        "1.00000005960464477539",
        "123456789012345678901234567890",
        "null",
    ]
    doc = (
        '{"metrics":{"m":{"frequency":10,"start":5,"data":['
        + ",".join(texts)
        + ']}},"children":{}}'
    )
    series = parse_json(doc.encode())
    assert len(series) == 1
    got = series[0].values
    assert got.dtype == np.float32
    expected_bits = [f32_bits(float(t)) for t in texts[:-1]]
    assert [int(b) for b in got[:-1].view(np.uint32)] == expected_bits
    assert math.isnan(got[-1])
    # The sign of zero survives both spellings, and overflow saturates to ±inf.
    assert math.copysign(1.0, got[2]) == -1.0 and math.copysign(1.0, got[3]) == -1.0
    assert got[7] == np.inf and got[8] == -np.inf
    assert got[9] == 0.0 and math.copysign(1.0, got[10]) == -1.0


def test_double_rounding_is_not_single_rounding() -> None:
    # 1.00000005960464477539 is just above the midpoint between two float32 values; parsing
    # straight to float32 and via float64 can disagree. The SPEC wants the float64 route.
    text = "1.000000059604644775390625000001"
    (s,) = parse_json(
        ('{"metrics":{"m":{"frequency":1,"start":0,"data":[' + text + ']}},"children":{}}').encode()
    )
    assert int(s.values.view(np.uint32)[0]) == f32_bits(float(text))


def test_json_tree_scopes_and_timestamps() -> None:
    doc = level(
        {"load": metric([1.0, None, 2.0], frequency=60, start=100)},
        {
            "socket0": {
                "metrics": {"power": metric([5.5], frequency=3600, start=0)},
                "children": {
                    "core3": {"metrics": {"ipc": metric([0.5, 0.25], frequency=10, start=7)}}
                },
            },
            "nvme": level({"iops": metric([3.0])}),
            "accelerator00000000:3B:00.0": level({"util": metric([None, None])}),
            "cpu7": level({"x": metric([], frequency=60)}),
        },
    )
    rows = sorted(_rows(parse_json(json.dumps(doc).encode())))
    assert rows == sorted(
        [
            ("load", "node", "", 100, 60, f32_bits(1.0)),
            ("load", "node", "", 220, 60, f32_bits(2.0)),
            ("power", "socket", "0", 0, 3600, f32_bits(5.5)),
            ("ipc", "core", "3", 7, 10, f32_bits(0.5)),
            ("ipc", "core", "3", 17, 10, f32_bits(0.25)),
            ("iops", "nvme", "", 1_000_000, 60, f32_bits(3.0)),
        ]
    )


def test_inner_levels_may_omit_children_and_extra_keys_are_ignored() -> None:
    doc = '{"to": 5, "metrics": {}, "unknown": [1, {"x": true}], "children": {"socket1": {"metrics": {"m": {"data": [1], "start": 0, "frequency": 1, "unit": "W"}}}}}'
    (s,) = parse_json(doc.encode())
    assert (s.metric, s.scope, s.scope_id) == ("m", "socket", "1")


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (b"", "invalid JSON"),
        (b"{", "invalid JSON"),
        (b'{"metrics":{},"children":{}} {}', "invalid JSON"),
        (b'{"metrics":{},"children":{}} x', "invalid JSON"),
        (b'{"metrics":{"m":{"frequency":1,"start":0,"data":[NaN]}},"children":{}}', "invalid JSON"),
        (
            b'{"metrics":{"m":{"frequency":1,"start":0,"data":[Infinity]}},"children":{}}',
            "invalid JSON",
        ),
        (b'{"metrics":{"m":{"frequency":1,"start":0,"data":[1e400]}},"children":{}}', ""),
        (
            b'{"metrics":{"m":{"frequency":1,"start":0,"data":[true]}},"children":{}}',
            "not a number",
        ),
        (
            b'{"metrics":{"m":{"frequency":1,"start":0,"data":["1.5"]}},"children":{}}',
            "not a number",
        ),
        (b'{"metrics":{"m":{"frequency":1,"start":0,"data":[[1]]}},"children":{}}', "not a number"),
        (b'{"metrics":{"m":{"frequency":1,"start":0,"data":[{}]}},"children":{}}', "not a number"),
        (b'{"metrics":{"m":{"frequency":1.5,"start":0,"data":[]}},"children":{}}', "frequency"),
        (b'{"metrics":{"m":{"frequency":60.0,"start":0,"data":[]}},"children":{}}', "frequency"),
        (b'{"metrics":{"m":{"frequency":true,"start":0,"data":[]}},"children":{}}', "frequency"),
        (b'{"metrics":{"m":{"frequency":1,"start":"0","data":[]}},"children":{}}', "start"),
        (b'{"metrics":{"m":{"frequency":1,"data":[]}},"children":{}}', "start"),
        (
            b'{"metrics":{"m":{"frequency":1,"start":9223372036854775808,"data":[]}},"children":{}}',
            "start",
        ),
        (b'{"metrics":{"m":{"frequency":1,"start":0,"data":{}}},"children":{}}', "not an array"),
        (b'{"metrics":[],"children":{}}', "metrics"),
        (b'{"metrics":{},"children":[]}', "children"),
        (b'{"children":{}}', "metrics"),
        (b'{"metrics":{},"children":{"socket0":{"metrics":{},"children":5}}}', "children"),
        (b'{"metrics":{},"children":{"socket0":[]}}', "not an object"),
        (b"[]", "not a JSON object"),
        (
            b'{"metrics":{"m":{"frequency":1,"start":0,"data":["\\ud800"]}},"children":{}}',
            "invalid JSON",
        ),
    ],
)
def test_bad_json_is_rejected_whole(doc: bytes, reason: str) -> None:
    with pytest.raises(BadCheckpoint) as err:
        parse_json(doc)
    assert reason in err.value.reason


def test_json_float64_overflow_is_bad_but_float32_overflow_is_inf() -> None:
    with pytest.raises(BadCheckpoint):
        parse_json(b'{"metrics":{"m":{"frequency":1,"start":0,"data":[1.8e308]}},"children":{}}')
    (s,) = parse_json(b'{"metrics":{"m":{"frequency":1,"start":0,"data":[1.7e308]}},"children":{}}')
    assert s.values[0] == np.inf


def test_binary_bits_are_kept_and_every_nan_is_missing() -> None:
    patterns = [
        0x3F800000,
        0x80000000,
        0x7F800000,
        0xFF800000,
        0x7FC00000,
        0x7F800001,
        0xFFFFFFFF,
        0x00000001,
    ]
    raw = np.array(patterns, dtype="<u4").view("<f4").tolist()
    body = bin_level(
        {"m": (60, 1000, raw)},
        {"socket1": bin_level({"p": (10, 5, [1.5])}, {"core2": bin_level({"q": (1, 0, [2.5])})})},
    )
    series = parse_binary(bin_file(body))
    by_name = {s.metric: s for s in series}
    kept = [
        int(b)
        for b, v in zip(by_name["m"].values.view(np.uint32), by_name["m"].values, strict=True)
        if not math.isnan(v)
    ]
    assert kept == [0x3F800000, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001]
    assert (
        by_name["p"].scope,
        by_name["p"].scope_id,
        by_name["q"].scope,
        by_name["q"].scope_id,
    ) == ("socket", "1", "core", "2")


def test_binary_wrong_magic_and_truncation() -> None:
    body = bin_level({"m": (60, 0, [1.0, 2.0])}, {"socket0": bin_level({"p": (60, 0, [3.0])})})
    good = bin_file(body)
    assert len(parse_binary(good)) == 2
    with pytest.raises(BadCheckpoint, match="magic"):
        parse_binary(bin_file(body, magic=0xCC5B0002))
    for cut in range(len(good)):
        with pytest.raises(BadCheckpoint):
            parse_binary(good[:cut])


def test_binary_length_past_end_and_bad_utf8() -> None:
    body = (
        struct.pack("<I", 1)
        + struct.pack("<H", 1)
        + b"m"
        + struct.pack("<qqI", 60, 0, 1_000_000)
        + b"\0" * 8
    )
    with pytest.raises(BadCheckpoint, match="truncated"):
        parse_binary(bin_file(body))
    body = (
        struct.pack("<I", 1)
        + struct.pack("<H", 2)
        + b"\xff\xfe"
        + struct.pack("<qqI", 60, 0, 0)
        + struct.pack("<I", 0)
    )
    with pytest.raises(BadCheckpoint, match="UTF-8"):
        parse_binary(bin_file(body))


def test_timestamp_overflow_is_bad() -> None:
    doc = json.dumps(level({"m": metric([1.0, 2.0], frequency=2**62, start=2**62)}))
    with pytest.raises(BadCheckpoint, match="overflow"):
        parse_json(doc.encode())
