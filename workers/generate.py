"""Synthetic ClusterCockpit checkpoint trees, and the writers tests use for hand-made checkpoints.

The data is meant for compression and throughput benchmarks, so it imitates real nodes: job
plateaus, idle phases, smooth drifts, correlated and derived metrics, constant series, gaps.
Everything is vectorised with numpy; generating and formatting one host file (~0.7 M values)
takes a few tens of milliseconds.
"""

import multiprocessing
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

BINARY_MAGIC = 0xCC5B0001

# Dual-socket node of SPEC §1. Linux numbers the SMT sibling of core c as hwthread c + 36.
SOCKETS = 2
CORES_PER_SOCKET = 18
CORES = SOCKETS * CORES_PER_SOCKET
HWTHREADS = 2 * CORES

NODE_METRICS = (
    "cpu_load",
    "load_one",
    "load_five",
    "load_fifteen",
    "cpu_user",
    "cpu_iowait",
    "mem_total",
    "mem_used",
    "mem_cached",
    "mem_available",
    "swap_free",
    "disk_free",
    "mem_bw",
    "flops_any",
    "flops_dp",
    "cpu_power",
    "net_bytes_in",
    "net_bytes_out",
    "net_pkts_in",
    "net_pkts_out",
    "ib_recv",
    "ib_xmit",
    "ib_recv_pkts",
    "ib_xmit_pkts",
    "lustre_read_bw",
    "lustre_write_bw",
    "lustre_read_requests",
    "lustre_write_requests",
    "lustre_open",
    "lustre_close",
    "nfs4_read",
    "nfs4_write",
)
SOCKET_METRICS = ("mem_bw", "cpu_power", "dram_power", "flops_any", "cpu_temp")
MEMORY_DOMAIN_METRICS = ("mem_bw", "mem_used", "numa_misses")
CORE_METRICS = ("core_power", "core_temp", "l2_bw", "l3_bw")
HWTHREAD_METRICS = (
    "cpu_load",
    "cpu_user",
    "cpu_system",
    "flops_any",
    "flops_dp",
    "flops_sp",
    "ipc",
    "cpi",
    "clock",
    "vectorization_ratio",
    "instructions",
)
ACCELERATOR_METRICS = (
    "acc_utilization",
    "acc_mem_used",
    "acc_mem_util",
    "acc_power",
    "acc_temp",
    "acc_sm_clock",
)
# PCI bus ids of common 4- and 8-GPU boards; more GPUs get made-up unique ids.
_GPU_BUSES = ("3B", "5E", "86", "AF", "18", "D8", "07", "0F")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_FORMATS = ("json", "bin", "mixed")
# "node": 12-hour files of one-decimal values (SPEC §1). "hourly": hourly checkpoints of
# 60 samples whose values carry 4-6 significant digits and ~2 % nulls.
SHAPES = ("node", "hourly")
HOURLY_DIGITS = (4, 6)
HOURLY_NAN_FRACTION = 0.019  # what _Missing turns into ~2 % nulls at 60 samples


@dataclass
class Metric:
    """One series: value i is at start + i*frequency; NaN means missing."""

    frequency: int
    start: int
    values: np.ndarray
    # JSON fraction digits of this series; None: the file's `decimals` (json_bytes).
    decimals: int | None = None


@dataclass
class Level:
    """A checkpoint level (SPEC §2): metrics plus named child levels, recursively."""

    metrics: dict[str, Metric] = field(default_factory=dict)
    children: dict[str, "Level"] = field(default_factory=dict)


@dataclass
class GenerateSummary:
    """What generate_tree wrote."""

    root: Path
    clusters: list[str]
    hosts: int  # host directories written, over all clusters
    files: int
    values: int  # non-missing values = rows an archiver must produce
    bytes: int
    first_ts: int  # timestamp of the first sample slot (= start = first file's name)
    last_ts: int  # timestamp of the last sample slot (last file's `to` - frequency)


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def _walk_metrics(level: Level) -> Iterator[Metric]:
    # The JSON writer formats all series of a file in one batch, then re-walks the tree in
    # the same order to assemble the document; both walks must use this one traversal.
    yield from level.metrics.values()
    for child in level.children.values():
        yield from _walk_metrics(child)


def _as_f64(values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"metric values must be one-dimensional, got shape {arr.shape}")
    return arr


def _format_fixed(
    t: np.ndarray, neg: np.ndarray, nan: np.ndarray, ip_cols: int, d: int
) -> tuple[np.ndarray, np.ndarray]:
    """Print integers `t` (scaled by 10**d) as decimals with d fraction digits, each followed
    by a comma; returns (text as uint8 array, end offset of each value in it)."""
    # One fixed-width row per value (sign, integer digits right-aligned, '.', fraction, ','),
    # then a mask drops leading zeros and unused sign cells; np.compress is much faster than
    # boolean indexing for the irregular masks this produces.
    n = len(t)
    dot = 1 if d else 0
    width = 1 + ip_cols + dot + d + 1
    buf = np.empty((n, width), np.uint8)
    col = width - 2
    x = t
    # x // 10 on int64 uses libdivide; np.divmod does not and is ~10x slower.
    for _ in range(d):
        q = x // 10
        buf[:, col] = x - q * 10
        x = q
        col -= 1
    col -= dot
    int_part = x
    for _ in range(ip_cols):
        q = x // 10
        buf[:, col] = x - q * 10
        x = q
        col -= 1
    buf += ord("0")
    buf[:, 0] = ord("-")
    if d:
        buf[:, ip_cols + 1] = ord(".")
    buf[:, width - 1] = ord(",")
    ndig = np.ones(n, np.int8)
    for k in range(1, ip_cols):
        ndig += int_part >= 10**k
    cols = np.arange(width, dtype=np.int8)
    keep = cols[None, :] >= (1 + ip_cols - ndig)[:, None]
    keep[:, 0] = neg
    lens = ndig.astype(np.int64) + neg + (dot + d + 1)
    if nan.any():
        buf[nan, width - 5 :] = np.frombuffer(b"null,", np.uint8)
        keep[nan] = cols >= width - 5
        lens[nan] = 5
    return np.compress(keep.ravel(), buf.ravel()), np.cumsum(lens)


def _format_series_fixed(arrays: list[np.ndarray], d: int) -> list[bytes | memoryview]:
    out: list[bytes | memoryview] = [b""] * len(arrays)
    idx = [i for i, a in enumerate(arrays) if len(a)]
    if not idx:
        return out
    sizes = np.array([len(arrays[i]) for i in idx], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    v = np.concatenate([arrays[i] for i in idx])
    if np.isinf(v).any():
        raise ValueError("infinite values cannot be written as JSON")
    nan = np.isnan(v)
    a = np.abs(v)
    a[nan] = 0.0
    s = a * (10.0**d)
    t = np.rint(s)
    # Above 2**52 the scaled value has no fraction bits left, so rint cannot be trusted; those
    # series take the exact (slow) path below.
    big = s >= 2.0**52
    # fl(a * 10**d) is rounded once, so rint(s) is the correctly rounded result except when
    # s lands exactly on .5: then the true product may lie on either side of the tie.
    # Python's formatting is exact (round-half-even on the binary value, like Go's strconv).
    for i in np.flatnonzero((np.abs(s - t) == 0.5) & ~big):
        t[i] = int(format(float(a[i]), f".{d}f").replace(".", ""))
    t[big] = 0
    ti = t.astype(np.int64)
    neg = np.signbit(v) & ~nan
    series_max = np.maximum.reduceat(ti, starts)
    series_big = np.logical_or.reduceat(big, starts)
    ndig = 1 + np.searchsorted(10 ** np.arange(1, 19, dtype=np.int64), series_max, side="right")
    # Enough integer columns for the largest value, and rows wide enough to hold "null,".
    ip_cols = np.maximum(ndig - d, 1)
    ip_cols = np.maximum(ip_cols, 3 - d - (1 if d else 0))
    for j in np.flatnonzero(series_big):
        arr = arrays[idx[j]]
        out[idx[j]] = ",".join(
            "null" if x != x else format(x, f".{d}f") for x in arr.tolist()
        ).encode()
    # Group series by width so that one wide series (bytes/s counters) does not widen the
    # rows of the many small ones.
    for w in np.unique(ip_cols[~series_big]):
        members = np.flatnonzero((ip_cols == w) & ~series_big)
        if len(members) == 1:
            j = members[0]
            sl = slice(starts[j], starts[j] + sizes[j])
            text, ends = _format_fixed(ti[sl], neg[sl], nan[sl], int(w), d)
        else:
            sls = [slice(starts[j], starts[j] + sizes[j]) for j in members]
            text, ends = _format_fixed(
                np.concatenate([ti[sl] for sl in sls]),
                np.concatenate([neg[sl] for sl in sls]),
                np.concatenate([nan[sl] for sl in sls]),
                int(w),
                d,
            )
        mv = memoryview(text.tobytes())
        row = 0
        for j in members:
            lo = int(ends[row - 1]) if row else 0
            row += int(sizes[j])
            out[idx[j]] = mv[lo : int(ends[row - 1]) - 1]  # minus the trailing comma
    return out


def _format_series_repr(arrays: list[np.ndarray]) -> list[bytes | memoryview]:
    out: list[bytes | memoryview] = []
    for arr in arrays:
        if np.isinf(arr).any():
            raise ValueError("infinite values cannot be written as JSON")
        out.append(",".join(repr(x) if x == x else "null" for x in arr.tolist()).encode())
    return out


def json_bytes(level: Level, from_: int, to: int, decimals: int | None = 1) -> bytes:
    """Serialise a checkpoint as upstream-style JSON (SPEC §2); NaN becomes null.

    decimals=1 prints like the Go writer ("12.3"); None prints the float64's shortest repr.
    A Metric's own `decimals` overrides the file's for that series. Infinite values raise
    ValueError, as JSON cannot represent them.
    """
    if decimals is not None and not (isinstance(decimals, int) and 0 <= decimals <= 15):
        raise ValueError(f"decimals must be None or an int in 0..15, got {decimals!r}")
    metrics = list(_walk_metrics(level))
    arrays = [_as_f64(m.values) for m in metrics]
    digits = [decimals if m.decimals is None else m.decimals for m in metrics]
    texts: list[bytes | memoryview] = [b""] * len(arrays)
    # One batch per distinct fraction width: series with their own `decimals` cost no more
    # than a file-wide setting.
    for d in dict.fromkeys(digits):
        members = [i for i, x in enumerate(digits) if x == d]
        group = [arrays[i] for i in members]
        if d is None:
            done = _format_series_repr(group)
        else:
            if not (isinstance(d, int) and 0 <= d <= 15):
                raise ValueError(f"decimals must be None or an int in 0..15, got {d!r}")
            done = _format_series_fixed(group, d)
        for i, t in zip(members, done, strict=True):
            texts[i] = t
    it = iter(texts)
    parts: list[bytes | memoryview] = [b'{"from":%d,"to":%d,' % (int(from_), int(to))]

    def emit(lv: Level) -> None:
        parts.append(b'"metrics":{')
        for k, (name, m) in enumerate(lv.metrics.items()):
            head = b'%s%s:{"frequency":%d,"start":%d,"data":[' % (
                b"," if k else b"",
                orjson.dumps(name),
                int(m.frequency),
                int(m.start),
            )
            parts.append(head)
            parts.append(next(it))
            parts.append(b"]}")
        parts.append(b'},"children":{')
        for k, (name, child) in enumerate(lv.children.items()):
            parts.append(b"%s%s:{" % (b"," if k else b"", orjson.dumps(name)))
            emit(child)
            parts.append(b"}")
        parts.append(b"}")

    emit(level)
    parts.append(b"}")
    return b"".join(parts)


def _name_bytes(name: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError(f"name too long for the binary format: {len(raw)} bytes")
    return struct.pack("<H", len(raw)) + raw


def binary_bytes(level: Level, from_: int, to: int) -> bytes:
    """Serialise a checkpoint in the SPEC §2 binary format (little-endian, float32 values)."""
    parts: list[bytes] = [struct.pack("<Iqq", BINARY_MAGIC, int(from_), int(to))]

    def emit(lv: Level) -> None:
        parts.append(struct.pack("<I", len(lv.metrics)))
        for name, m in lv.metrics.items():
            # Overflowing float32 is legitimately inf here (binary keeps ±inf), not an error.
            with np.errstate(over="ignore"):
                vals = np.asarray(m.values).astype("<f4")
            if vals.ndim != 1:
                raise ValueError(f"metric values must be one-dimensional, got {vals.shape}")
            parts.append(_name_bytes(name))
            parts.append(struct.pack("<qqI", int(m.frequency), int(m.start), len(vals)))
            parts.append(vals.tobytes())
        parts.append(struct.pack("<I", len(lv.children)))
        for name, child in lv.children.items():
            parts.append(_name_bytes(name))
            emit(child)

    emit(level)
    return b"".join(parts)


def write_checkpoint(
    path: Path,
    level: Level,
    from_: int,
    to: int,
    fmt: str = "json",
    decimals: int | None = 1,
) -> int:
    """Write one checkpoint file ("json" or "bin") atomically; returns its size in bytes."""
    if fmt == "json":
        data = json_bytes(level, from_, to, decimals)
    elif fmt == "bin":
        data = binary_bytes(level, from_, to)
    else:
        raise ValueError(f"fmt must be 'json' or 'bin', got {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # `<name>.tmp` is what an interrupted upstream write leaves behind and is ignored by the
    # archiver, so a reader never sees a half-written checkpoint under its real name.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


# ---------------------------------------------------------------------------------------------
# Synthetic node data
# ---------------------------------------------------------------------------------------------


def _smooth(rng: np.random.Generator, rows: int, samples: int, knot: int) -> np.ndarray:
    # Linear interpolation between random knots: slow wiggles of roughly unit amplitude
    # without an O(samples) recursive filter.
    k = samples // knot + 2
    c = rng.standard_normal((rows, k))
    pos = np.arange(samples) / knot
    i = pos.astype(np.int64)
    f = pos - i
    return c[:, i] * (1.0 - f) + c[:, i + 1] * f


def _moving_avg(x: np.ndarray, window: int) -> np.ndarray:
    # Trailing mean along time; the first samples average over what exists so far.
    if window <= 1:
        return x.copy()
    c = np.cumsum(x, axis=-1)
    out = c.copy()
    out[..., window:] -= c[..., :-window]
    n = np.minimum(np.arange(1, x.shape[-1] + 1), window)
    return out / n


def _timeline(
    rng: np.random.Generator, samples: int, frequency: int, gpus: int
) -> dict[str, np.ndarray]:
    """Jobs and idle phases over the file: per-sample segment index and per-segment traits."""
    mean_job = max(4.0, 3 * 3600 / frequency)
    mean_idle = max(2.0, 1800 / frequency)
    bounds: list[int] = []
    busy_l: list[bool] = []
    pos = 0
    while pos < samples:
        segment_busy = bool(rng.random() >= 0.2)
        bounds.append(pos)
        busy_l.append(segment_busy)
        pos += 1 + int(rng.exponential(mean_job if segment_busy else mean_idle))
    nseg = len(bounds)
    lengths = np.diff(np.append(bounds, samples))
    seg = np.repeat(np.arange(nseg), lengths)
    busy = np.array(busy_l)

    def u(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, nseg)

    # Job kinds: 0 compute-bound DP, 1 memory-bound, 2 single precision, 3 light/serial.
    kind = rng.choice(4, nseg, p=[0.35, 0.35, 0.15, 0.15])
    nthr = rng.choice(np.array([72, 72, 36, 36, 18, 8]), nseg)
    nthr = np.where(kind == 3, rng.integers(1, 9, nseg), nthr)
    nthr = np.where(busy, nthr, 0)
    dp = np.select([kind == 0, kind == 1, kind == 2], [u(4, 18), u(0.5, 3), u(0, 1)], u(0, 0.5))
    sp = np.where(kind == 2, u(8, 30), u(0, 0.5))
    ipc = np.select(
        [kind == 0, kind == 1, kind == 2], [u(1.5, 3), u(0.4, 1), u(1.2, 2.5)], u(0.8, 2)
    )
    vec = np.select([kind == 0, kind == 1, kind == 2], [u(50, 99), u(10, 60), u(60, 99)], u(0, 20))
    membw = np.select(
        [kind == 0, kind == 1, kind == 2], [u(10, 40), u(80, 140), u(20, 60)], u(0.5, 5)
    )
    multi_node = rng.random(nseg) < 0.6
    ib = np.where(busy & multi_node, 10 ** u(6, 9.5), 0.0)
    gpus_used = np.where(busy, rng.integers(0, gpus + 1, nseg), 0) if gpus else np.zeros(nseg)
    return {
        "seg": seg,
        "busy": busy,
        # Compact pinning: one thread per core on socket 0 first, SMT siblings last.
        "active": np.arange(HWTHREADS)[None, :] < nthr[:, None],
        "nthr": nthr,
        "dp": dp,
        "sp": sp,
        "ipc": ipc,
        "vec": vec,
        "membw": membw,
        "mem_frac": np.where(busy, u(0.05, 0.8), u(0.01, 0.03)),
        "ib": ib,
        "net": 10 ** u(3, 6),
        "io_rate": np.where(busy, u(0, 0.05), 0.002),
        "io_size": 10 ** u(6, 9),
        "gpus_used": gpus_used,
        "gpu_util": u(30, 100),
        "gpu_mem": u(0.1, 0.95),
        "numa": 10 ** u(3, 6),
    }


def _gpu_names(gpus: int) -> list[str]:
    buses = list(_GPU_BUSES)
    extra = (f"{b:02X}" for b in range(0x20, 0x100) if f"{b:02X}" not in _GPU_BUSES)
    while len(buses) < gpus:
        buses.append(next(extra))
    return [f"accelerator00000000:{b}:00.0" for b in buses[:gpus]]


class _Missing:
    """Applies gaps (runs of NaN), fully missing and late-starting series to value matrices."""

    def __init__(self, rng: np.random.Generator, samples: int, nan_fraction: float) -> None:
        self.rng = rng
        self.samples = samples
        self.fraction = nan_fraction
        self.outage: slice | None = None
        # A collector outage blanks the same minutes in every series of the host; real gaps
        # are correlated like this, which matters for how well the archive compresses.
        if nan_fraction > 0 and rng.random() < 0.3:
            length = max(1, round(samples * nan_fraction))
            begin = int(rng.integers(0, max(1, samples - length)))
            self.outage = slice(begin, begin + length)

    def apply(self, m: np.ndarray) -> list[int]:
        """Mutates m (rows x samples); returns, per row, how many leading samples to drop."""
        rows, samples = m.shape
        if self.fraction <= 0:
            return [0] * rows
        rng = self.rng
        if self.outage is not None:
            m[:, self.outage] = np.nan
        mean_len = 5.0
        total = rows * samples
        count = int(rng.binomial(total, min(1.0, 0.7 * self.fraction / mean_len)))
        if count:
            pos = rng.integers(0, total, count)
            end = np.minimum(
                pos + rng.geometric(1.0 / mean_len, count), (pos // samples + 1) * samples
            )
            delta = np.bincount(pos, minlength=total + 1) - np.bincount(end, minlength=total + 1)
            m.reshape(-1)[np.cumsum(delta[:total]) > 0] = np.nan
        m[rng.random(rows) < 0.2 * self.fraction] = np.nan
        late = rng.random(rows) < 0.5 * self.fraction
        drops = np.where(late, rng.integers(1, max(2, samples // 4), rows), 0)
        return drops.tolist() if samples >= 4 else [0] * rows


def _finish(m: np.ndarray, decimals: np.ndarray | None = None) -> np.ndarray:
    # Every generated metric is a rate, size or count: never negative.
    np.maximum(m, 0.0, out=m)
    if decimals is None:
        np.round(m, 1, out=m)
    else:
        # Per row: scale, round half-even, unscale, as np.round does for one width. Negative
        # positions divide first, so that the result (an integer) is exact.
        up = 10.0 ** np.maximum(decimals, 0).astype(np.float64)[:, None]
        down = 10.0 ** np.maximum(-decimals, 0).astype(np.float64)[:, None]
        np.rint(m * up / down, out=m)
        m *= down
        m /= up
    # Adding +0.0 turns the -0.0 that rounding tiny negatives produces into 0.0.
    m += 0.0
    return m


def _significant_decimals(
    rng: np.random.Generator, m: np.ndarray, digits: tuple[int, int]
) -> np.ndarray:
    """Per row of m: the rounding position that gives its largest value digits[0]..digits[1]
    significant digits (drawn per row); negative rounds to tens, hundreds...; 0 for zeros."""
    k = rng.integers(digits[0], digits[1] + 1, m.shape[0])
    top = np.abs(m).max(axis=1, initial=0.0)  # no NaN yet: gaps come after rounding
    exp = np.floor(np.log10(np.where(top > 0, top, 1.0))).astype(np.int64)
    d = np.minimum(k - 1 - exp, 15)
    return np.where(top > 0, d, 0)


@dataclass
class _Draw:
    """The random source and time axis of one host's series (drawn in a fixed order, so a
    seed always gives the same tree)."""

    rng: np.random.Generator
    samples: int
    frequency: int
    tl: dict[str, np.ndarray]  # _timeline
    knot: int  # samples between the knots of slow wiggles

    @property
    def seg(self) -> np.ndarray:
        """Per sample, the index of its job or idle segment."""
        return self.tl["seg"]

    def white(self, rows: int) -> np.ndarray:
        """Standard normal noise, rows x samples."""
        return self.rng.standard_normal((rows, self.samples))

    def smooth(self, rows: int) -> np.ndarray:
        """Slow wiggles of about unit amplitude, rows x samples."""
        return _smooth(self.rng, rows, self.samples, self.knot)


def _hwthreads(
    d: _Draw, nominal: float, clock_pinned: bool
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Hardware-thread series (HWTHREADS x samples); also activity, flops and DP flops."""
    T, S, tl, seg = HWTHREADS, d.samples, d.tl, d.seg
    act = tl["active"].T[:, seg]  # bool (T, S)
    a = act.astype(np.float64)
    imb = (1.0 + 0.06 * d.rng.standard_normal((T, len(tl["busy"]))))[:, seg]
    idle_jitter = np.abs(d.white(T))
    fdp = a * tl["dp"][seg] * imb * (1.0 + 0.1 * d.smooth(T)) + 0.02 * idle_jitter
    fsp = a * tl["sp"][seg] * imb * (1.0 + 0.1 * d.smooth(T))
    fany = fdp + 0.5 * fsp  # DP-equivalent flops
    ipc = np.where(act, tl["ipc"][seg] * imb * (1.0 + 0.05 * d.smooth(T)), 0.7 + 0.15 * d.white(T))
    np.clip(ipc, 0.1, 5.0, out=ipc)
    if clock_pinned:
        clock = np.full((T, S), nominal)
    else:
        frac = tl["nthr"][seg] / T
        turbo = nominal + 900.0 - 500.0 * frac
        clock = np.where(act, turbo - 40.0 * idle_jitter, 1200.0 + 150.0 * d.white(T))
    hw = {
        "cpu_load": a + 0.03 * d.white(T),
        "cpu_user": np.where(
            act, np.minimum(96.0 + 4.5 * d.rng.random((T, S)), 100.0), 0.2 * idle_jitter
        ),
        "cpu_system": np.where(act, 0.3 + 1.2 * d.rng.random((T, S)), 0.1 * idle_jitter),
        "flops_any": fany,
        "flops_dp": fdp,
        "flops_sp": fsp,
        "ipc": ipc,
        "cpi": 1.0 / ipc,
        "clock": clock,
        "vectorization_ratio": np.where(
            act, np.minimum(tl["vec"][seg] + 1.5 * d.white(T), 100.0), 0.0
        ),
        "instructions": clock * ipc * np.where(act, 1.0, 0.03),
    }
    return hw, a, fany, fdp


def _by_socket(x: np.ndarray, op: Callable[..., np.ndarray] = np.sum) -> np.ndarray:
    """Per socket, op over its cores (x is CORES x samples; socket s holds cores s*18..)."""
    return op(x.reshape(SOCKETS, CORES_PER_SOCKET, x.shape[-1]), axis=1)


def _cores_and_sockets(
    d: _Draw, a: np.ndarray, fany: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Core series (CORES x samples), socket series (SOCKETS x samples), and per socket
    the fraction of its cores busy."""
    core_act = np.maximum(a[:CORES], a[CORES:])
    core_flops = fany[:CORES] + fany[CORES:]
    core_power = 1.5 + 4.0 * core_act + 0.25 * core_flops + 0.3 * d.white(CORES)
    np.clip(core_power, 0.5, None, out=core_power)
    core_temp = (
        32.0 + 4.5 * _moving_avg(core_power, max(1, 300 // d.frequency)) + 0.4 * d.white(CORES)
    )
    l2 = core_act * d.tl["membw"][d.seg] / CORES_PER_SOCKET
    cores = {
        "core_power": core_power,
        "core_temp": core_temp,
        "l2_bw": 3.0 * l2 * (1.0 + 0.1 * d.smooth(CORES)),
        "l3_bw": 1.8 * l2 * (1.0 + 0.1 * d.smooth(CORES)),
    }
    sock_frac = _by_socket(core_act) / CORES_PER_SOCKET
    sock_membw = sock_frac * d.tl["membw"][d.seg] * (1.0 + 0.05 * d.smooth(SOCKETS))
    sock_membw += 0.4 + 0.1 * np.abs(d.white(SOCKETS))
    sockets = {
        "mem_bw": sock_membw,
        "cpu_power": 35.0 + _by_socket(core_power) + 2.0 * d.white(SOCKETS),
        "dram_power": 6.0 + 0.12 * sock_membw + 0.3 * d.white(SOCKETS),
        "flops_any": _by_socket(core_flops),
        "cpu_temp": _by_socket(core_temp, np.max),
    }
    return cores, sockets, sock_frac


def _node(
    d: _Draw,
    mem_total: float,
    a: np.ndarray,
    hw: dict[str, np.ndarray],
    sockets: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Node-level series (1 x samples each), a table by metric name."""
    rng, S, tl, seg = d.rng, d.samples, d.tl, d.seg
    busy = tl["busy"][seg]
    runnable = a.sum(axis=0)[None, :]
    w1 = max(1, round(60 / d.frequency))
    load_one = _moving_avg(runnable + 0.3 * np.abs(d.white(1)), w1)
    walk = np.cumsum(0.002 * mem_total * d.white(1), axis=1)
    mem_used = 3.5 + tl["mem_frac"][seg] * mem_total * (1.0 + 0.03 * d.smooth(1))
    mem_used = np.clip(mem_used + np.where(busy, walk, 0.0), 1.0, 0.97 * mem_total)
    mem_cached = np.clip(
        0.05 * mem_total + np.cumsum(0.001 * mem_total * d.white(1), axis=1),
        0.5,
        np.maximum(0.9 * mem_total - mem_used, 0.5),
    )
    io_read = (rng.random((1, S)) < tl["io_rate"][seg]) * tl["io_size"][seg] * rng.random((1, S))
    io_write = (rng.random((1, S)) < tl["io_rate"][seg]) * tl["io_size"][seg] * rng.random((1, S))
    ib_rx = tl["ib"][seg] * (1.0 + 0.2 * d.smooth(1)) + 50.0 * np.abs(d.white(1))
    ib_tx = ib_rx * (0.95 + 0.1 * rng.random((1, S)))
    net_in = tl["net"][seg] * np.exp(0.5 * d.white(1)) + 2000.0
    net_out = tl["net"][seg] * np.exp(0.5 * d.white(1)) + 1500.0
    opens = np.where(busy, 5.0, 0.2) * rng.poisson(1.0, (1, S)) + (io_read + io_write > 0) * 50.0
    rare = rng.random((2, S)) < 0.01
    return {
        "cpu_load": load_one,
        "load_one": load_one,
        "load_five": _moving_avg(runnable, 5 * w1),
        "load_fifteen": _moving_avg(runnable, 15 * w1),
        "cpu_user": hw["cpu_user"].mean(axis=0, keepdims=True),
        "cpu_iowait": 0.05 * np.abs(d.white(1)) + ((io_read + io_write) > 0) * 4.0,
        "mem_total": np.full((1, S), mem_total),
        "mem_used": mem_used,
        "mem_cached": mem_cached,
        "mem_available": mem_total - mem_used - 0.3 * mem_cached,
        "swap_free": np.zeros((1, S)),
        # Local scratch fills up in steps when a job writes to it.
        "disk_free": 400.0 - np.cumsum((rng.random((1, S)) < 0.003) * 5.0, axis=1),
        "mem_bw": sockets["mem_bw"].sum(axis=0, keepdims=True),
        "flops_any": sockets["flops_any"].sum(axis=0, keepdims=True),
        "flops_dp": hw["flops_dp"].sum(axis=0, keepdims=True),
        "cpu_power": sockets["cpu_power"].sum(axis=0, keepdims=True),
        "net_bytes_in": net_in,
        "net_bytes_out": net_out,
        "net_pkts_in": net_in / 900.0,
        "net_pkts_out": net_out / 700.0,
        "ib_recv": ib_rx,
        "ib_xmit": ib_tx,
        "ib_recv_pkts": ib_rx / 4096.0,
        "ib_xmit_pkts": ib_tx / 4096.0,
        "lustre_read_bw": io_read,
        "lustre_write_bw": io_write,
        "lustre_read_requests": io_read / 1048576.0,
        "lustre_write_requests": io_write / 1048576.0,
        "lustre_open": opens,
        "lustre_close": opens,
        "nfs4_read": rare[:1] * 12.0,
        "nfs4_write": rare[1:] * 4.0,
    }


def _memory_domains(
    d: _Draw, sockets: dict[str, np.ndarray], mem_used: np.ndarray, sock_frac: np.ndarray
) -> dict[str, np.ndarray]:
    """Memory-domain series: one domain per socket (sub-NUMA clustering off)."""
    md_share = 0.5 + 0.1 * d.rng.uniform(-1.0, 1.0, (len(d.tl["busy"]),))[d.seg]
    return {
        "mem_bw": sockets["mem_bw"] * (1.0 + 0.01 * d.white(SOCKETS)),
        "mem_used": mem_used * np.stack([md_share, 1.0 - md_share]),
        "numa_misses": sock_frac * d.tl["numa"][d.seg] * (1.0 + 0.2 * d.smooth(SOCKETS)),
    }


def _accelerators(d: _Draw, gpus: int) -> dict[str, np.ndarray]:
    """Accelerator series (gpus x samples); none without GPUs."""
    if not gpus:
        return {}
    tl, seg = d.tl, d.seg
    g_act = (np.arange(gpus)[:, None] < tl["gpus_used"][seg][None, :]).astype(np.float64)
    util = g_act * tl["gpu_util"][seg] * (1.0 + 0.05 * d.smooth(gpus))
    util += g_act * 3.0 * d.white(gpus)
    np.clip(util, 0.0, 100.0, out=util)
    return {
        "acc_utilization": util,
        "acc_mem_used": 40960.0 * (0.01 + g_act * tl["gpu_mem"][seg]),
        "acc_mem_util": 0.6 * util,
        "acc_power": 55.0 + 3.0 * util + 2.0 * d.white(gpus),
        "acc_temp": 30.0 + 0.4 * _moving_avg(util, max(1, 300 // d.frequency)),
        "acc_sm_clock": np.where(g_act > 0, 1410.0, 210.0),
    }


@dataclass
class _Finisher:
    """Rounds a group's series, punches its gaps and makes `Metric`s of its rows."""

    d: _Draw
    start: int
    missing: _Missing
    digits: tuple[int, int] | None

    def rows(
        self, groups: dict[str, np.ndarray], names: tuple[str, ...]
    ) -> dict[str, list[Metric]]:
        """Per metric name, one `Metric` per row of its matrix."""
        out: dict[str, list[Metric]] = {}
        frequency = self.d.frequency
        for name in names:
            m = np.array(groups[name], dtype=np.float64)
            if self.digits is None:
                dec: list[int | None] = [None] * len(m)
                _finish(m)
            else:
                np.maximum(m, 0.0, out=m)
                sig = _significant_decimals(self.d.rng, m, self.digits)
                _finish(m, sig)
                dec = np.maximum(sig, 0).tolist()  # 1234000 prints with no fraction
            drops = self.missing.apply(m)
            out[name] = [
                Metric(frequency, self.start + k * frequency, m[r, k:], dec[r])
                for r, k in enumerate(drops)
            ]
        return out


def _tree(f: _Finisher, groups: dict[str, dict[str, np.ndarray]], gpus: int) -> Level:
    """The node's level tree: sockets with their cores, memory domains, threads, GPUs."""
    node_m = np.concatenate([groups["node"][n] for n in NODE_METRICS])
    node_rows = f.rows({n: node_m[i : i + 1] for i, n in enumerate(NODE_METRICS)}, NODE_METRICS)
    sock_rows = f.rows(groups["sockets"], SOCKET_METRICS)
    md_rows = f.rows(groups["mds"], MEMORY_DOMAIN_METRICS)
    core_rows = f.rows(groups["cores"], CORE_METRICS)
    hw_rows = f.rows(groups["hw"], HWTHREAD_METRICS)
    acc_rows = f.rows(groups["accs"], ACCELERATOR_METRICS) if gpus else {}
    root = Level(metrics={n: node_rows[n][0] for n in NODE_METRICS})
    for s in range(SOCKETS):
        sock = Level(metrics={n: sock_rows[n][s] for n in SOCKET_METRICS})
        for c in range(s * CORES_PER_SOCKET, (s + 1) * CORES_PER_SOCKET):
            sock.children[f"core{c}"] = Level(metrics={n: core_rows[n][c] for n in CORE_METRICS})
        root.children[f"socket{s}"] = sock
    for dom in range(SOCKETS):
        root.children[f"memoryDomain{dom}"] = Level(
            metrics={n: md_rows[n][dom] for n in MEMORY_DOMAIN_METRICS}
        )
    for t in range(HWTHREADS):
        root.children[f"hwthread{t}"] = Level(metrics={n: hw_rows[n][t] for n in HWTHREAD_METRICS})
    for g, name in enumerate(_gpu_names(gpus)):
        root.children[name] = Level(metrics={n: acc_rows[n][g] for n in ACCELERATOR_METRICS})
    return root


def host_level(
    rng: np.random.Generator,
    start: int,
    samples: int,
    frequency: int = 60,
    gpus: int = 0,
    nan_fraction: float = 0.01,
    digits: tuple[int, int] | None = None,
) -> Level:
    """One realistic dual-socket node (SPEC §1): ~980 series (+6 per GPU) of `samples` values.

    Values have one decimal, or with `digits=(lo, hi)` lo..hi significant digits (drawn per
    series, which then carries its own JSON `decimals`); about `nan_fraction` of them are
    missing (NaN runs, outages, whole series, late-starting series).
    """
    if digits is not None and not 1 <= digits[0] <= digits[1] <= 15:
        raise ValueError(f"digits must be (lo, hi) with 1 <= lo <= hi <= 15, got {digits!r}")
    if samples < 1 or frequency < 1:
        raise ValueError("samples and frequency must be >= 1")
    if gpus < 0:
        raise ValueError("gpus must be >= 0")
    if not 0.0 <= nan_fraction < 1.0:
        raise ValueError("nan_fraction must be in [0, 1)")
    tl = _timeline(rng, samples, frequency, gpus)
    d = _Draw(rng, samples, frequency, tl, knot=max(2, 600 // frequency))  # ~10 minute wiggles
    # Host traits: memory size, pinned clock (turbo off) or dynamic frequency scaling.
    mem_total = float(rng.choice([96.0, 192.0, 256.0, 512.0, 1024.0])) * 0.98
    nominal = float(rng.choice([2000.0, 2200.0, 2400.0, 2600.0]))
    clock_pinned = rng.random() < 0.3
    hw, a, fany, _fdp = _hwthreads(d, nominal, clock_pinned)
    cores, sockets, sock_frac = _cores_and_sockets(d, a, fany)
    node = _node(d, mem_total, a, hw, sockets)
    groups = {
        "hw": hw,
        "cores": cores,
        "sockets": sockets,
        "node": node,
        "mds": _memory_domains(d, sockets, node["mem_used"], sock_frac),
        "accs": _accelerators(d, gpus),
    }
    return _tree(_Finisher(d, start, _Missing(rng, samples, nan_fraction), digits), groups, gpus)


# ---------------------------------------------------------------------------------------------
# Trees
# ---------------------------------------------------------------------------------------------


def _count_values(level: Level) -> int:
    return sum(int(np.count_nonzero(~np.isnan(m.values))) for m in _walk_metrics(level))


def _host_prefix(cluster: str) -> str:
    c = cluster[0].lower()
    return c if "a" <= c <= "z" else "n"


def _default_start(files_per_host: int, samples: int, frequency: int, seed: int = 0) -> int:
    now = int(time.time())
    span = files_per_host * samples * frequency
    # A week back, and far enough back that the newest file ends 3 days ago: a 48 h
    # retention run then selects every generated file.
    latest = min(now - 7 * 86400, now - span - 3 * 86400)
    # Each seed its own minute: a tree regenerated with another seed gets other file names,
    # instead of same-named files with other content (which recovery reports as changed).
    return latest // 3600 * 3600 - (seed % 1000) * 60


@dataclass(frozen=True)
class _HostTask:
    root: str
    cluster: str
    host_index: int
    files_per_host: int
    fmt: str
    samples: int
    gpus: int
    seed: int
    frequency: int
    start: int
    shape: str = "node"


def _generate_host(task: _HostTask) -> tuple[int, int, int]:
    """Write all files of one host; returns (files, non-missing values, bytes)."""
    host = f"{_host_prefix(task.cluster)}{task.host_index + 1:04d}"
    span = task.samples * task.frequency
    files = values = size = 0
    for k in range(task.files_per_host):
        # One stream per (seed, cluster, host, file): output is independent of worker count
        # and task order, and a cluster's data does not depend on the other clusters listed.
        ss = np.random.SeedSequence(
            [task.seed, zlib.crc32(task.cluster.encode()), task.host_index, k]
        )
        ts = task.start + k * span
        rng = np.random.default_rng(ss)
        if task.shape == "hourly":
            level = host_level(
                rng,
                ts,
                task.samples,
                task.frequency,
                task.gpus,
                nan_fraction=HOURLY_NAN_FRACTION,
                digits=HOURLY_DIGITS,
            )
        else:
            level = host_level(rng, ts, task.samples, task.frequency, task.gpus)
        fmt = task.fmt if task.fmt != "mixed" else ("json", "bin")[(task.host_index + k) % 2]
        path = Path(task.root) / task.cluster / host / f"{ts}.{fmt}"
        size += write_checkpoint(path, level, ts, ts + span, fmt)
        values += _count_values(level)
        files += 1
    return files, values, size


def generate_tree(
    root: Path,
    clusters: list[str],
    hosts: int,
    files_per_host: int = 1,
    fmt: str = "json",
    samples: int = 720,
    gpus: int = 0,
    seed: int = 0,
    frequency: int = 60,
    start: int | None = None,
    workers: int = 1,
    shape: str = "node",
) -> GenerateSummary:
    """Write `<root>/<cluster>/<host>/<ts>.json|.bin` for `hosts` hosts per cluster.

    fmt "mixed" alternates json/bin by host and file. shape "hourly" writes values with 4-6
    significant digits and ~2 % nulls (use samples=60 for hourly files). Same arguments and
    seed give the same bytes (unless start defaults from the clock). The default start moves
    back by `seed % 1000` minutes, so other seeds give other file names. workers > 1: a pool
    over hosts.
    """
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {_FORMATS}, got {fmt!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if hosts < 0 or files_per_host < 1 or samples < 1 or frequency < 1 or workers < 1:
        raise ValueError("hosts >= 0 and files_per_host, samples, frequency, workers >= 1")
    if len(set(clusters)) != len(clusters):
        raise ValueError("duplicate cluster names")
    for c in clusters:
        if not _NAME_RE.fullmatch(c):
            raise ValueError(f"invalid cluster name {c!r}: use letters, digits, '-' and '_'")
    if start is None:
        start = _default_start(files_per_host, samples, frequency, seed)
    root = Path(root)
    tasks = [
        _HostTask(
            str(root), c, h, files_per_host, fmt, samples, gpus, seed, frequency, start, shape
        )
        for c in clusters
        for h in range(hosts)
    ]
    for c in clusters:
        (root / c).mkdir(parents=True, exist_ok=True)
    if workers > 1 and len(tasks) > 1:
        # spawn, not fork: a forked child inherits the parent's sockets and locks (a Celery
        # or Redis client in the same process can hang it).
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=spawn) as pool:
            results = list(pool.map(_generate_host, tasks))
    else:
        results = [_generate_host(t) for t in tasks]
    span = files_per_host * samples * frequency
    return GenerateSummary(
        root=root,
        clusters=list(clusters),
        hosts=len(tasks),
        files=sum(r[0] for r in results),
        values=sum(r[1] for r in results),
        bytes=sum(r[2] for r in results),
        first_ts=start,
        last_ts=start + span - frequency,
    )
