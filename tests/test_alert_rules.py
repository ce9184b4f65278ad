"""The shipped alert rules fire on the textfile that two real one-shot runs write.

Three clusters, two `ccarchive archive` processes, one node_exporter textfile:

- `good`: archived cleanly both times;
- `bad`: holds a corrupt file, reported and kept by both runs;
- `conflict`: archived by the first run; the second finds another file under its
  archive's name and keeps everything (outcome `error`).

The textfile carries its counters over from run to run and holds no process series. The
rules of contrib/prometheus/ccarchive.rules.yml are checked and unit-tested with
`promtool` when it is installed (`make test` installs Debian's prometheus package), and
always evaluated by the small Python evaluator below, on the same two files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import ROOT, archive_argv, clean_env, level, metric, run_cli, write_json
from workers.metrics import Series, read_textfile

RULES = ROOT / "contrib" / "prometheus" / "ccarchive.rules.yml"
STALE_AFTER = 2 * 48 * 3600  # the rules' threshold


def write_host(cp: Path, cluster: str, host: str, ts: int) -> None:
    """One small checkpoint file."""
    write_json(cp / cluster / host / f"{ts}.json", level({"load": metric([1.0, 2.0, 3.0], 10, ts)}))


def archive(cp: Path, arc: Path, cutoff: int, textfile: Path, tmp: Path) -> int:
    """One one-shot run in its own process, as a timer starts it; its exit code."""
    env = clean_env(
        TMPDIR=str(tmp),
        XDG_STATE_HOME=str(tmp / "state"),
        CCARCHIVE_METRICS_TEXTFILE=str(textfile),
    )
    proc = run_cli(archive_argv(cp, arc, cutoff, 1), env)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The textfile after the first run and after the second."""
    tmp = tmp_path_factory.mktemp("alerts")
    cp, arc, textfile = tmp / "cp", tmp / "arc", tmp / "ccarchive.prom"
    for cluster in ("good", "bad", "conflict"):
        write_host(cp, cluster, "n1", 100)
    (cp / "bad" / "n1" / "150.json").write_text("{not json")  # kept by every run
    assert archive(cp, arc, 200, textfile, tmp) == 1
    first = tmp / "first.prom"
    shutil.copy(textfile, first)
    for cluster in ("good", "bad", "conflict"):
        write_host(cp, cluster, "n1", 300)
    # Another file under the name the second run's archive of `conflict` would get.
    pq.write_table(pa.table({"x": [1]}), arc / "conflict" / "400.parquet")
    assert archive(cp, arc, 400, textfile, tmp) == 1
    return first, textfile


def labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


@pytest.mark.slow
def test_the_textfile_carries_counters_and_holds_last_run_gauges(
    two_runs: tuple[Path, Path],
) -> None:
    first_path, second_path = two_runs
    text = second_path.read_text()
    assert not re.search(r"^(process|python)_", text, re.M)  # node_exporter has its own
    first, second = read_textfile(str(first_path)), read_textfile(str(second_path))
    # Counters grow from run to run: the same bad file counts once per run that kept it.
    assert first["ccarchive_bad_files_total", labels(cluster="bad")] == 1
    assert second["ccarchive_bad_files_total", labels(cluster="bad")] == 2
    assert second["ccarchive_runs_total", labels(cluster="good", outcome="ok")] == 2
    assert second["ccarchive_runs_total", labels(cluster="conflict", outcome="ok")] == 1
    assert second["ccarchive_runs_total", labels(cluster="conflict", outcome="error")] == 1
    rows = first["ccarchive_rows_archived_total", labels(cluster="good")]
    assert rows == 3 and second["ccarchive_rows_archived_total", labels(cluster="good")] == 6
    # Gauges: the last run of each cluster.
    assert second["ccarchive_last_run_outcome", labels(cluster="conflict", outcome="error")] == 1
    assert second["ccarchive_last_run_outcome", labels(cluster="conflict", outcome="ok")] == 0
    assert second["ccarchive_last_run_outcome", labels(cluster="bad", outcome="reported")] == 1
    assert second["ccarchive_last_run_bad_files", labels(cluster="bad")] == 1
    assert second["ccarchive_last_run_bad_files", labels(cluster="good")] == 0
    assert second["ccarchive_last_run_rows", labels(cluster="good")] == 3
    # The failed run does not move the last success: it stays the first run's.
    c = labels(cluster="conflict")
    assert (
        second["ccarchive_last_success_timestamp_seconds", c]
        == first["ccarchive_last_run_timestamp_seconds", c]
    )
    assert (
        second["ccarchive_last_run_timestamp_seconds", c]
        > first["ccarchive_last_success_timestamp_seconds", c] - 1
    )  # ends later (same second at worst)


# --- the rules, evaluated in Python -----------------------------------------------------------

_SELECTOR = r"(\w+)(?:\{(\w+)=~\"([^\"]*)\"\})?"
#: The expression shapes the rules use, and how each one is evaluated at `now`.
_SHAPES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"time\(\) - {_SELECTOR} > (.+)"), "age"),
    (re.compile(rf"{_SELECTOR} (==|>) (\S+)"), "compare"),
]


def _select(series: Series, name: str, label: str | None, pattern: str | None) -> Series:
    """An instant vector selector `name{label=~"pattern"}` (fully anchored, as PromQL's)."""
    return {
        key: v
        for key, v in series.items()
        if key[0] == name
        and (label is None or re.fullmatch(pattern or "", dict(key[1]).get(label, "")))
    }


def firing(expr: str, series: Series, now: float) -> dict[tuple[tuple[str, str], ...], float]:
    """The label sets (metric name dropped) for which `expr` holds at `now`, with values.

    Knows only the shapes of _SHAPES: a rule of another shape fails the test here, so the
    Python check can never silently pass a rule it does not understand.
    """
    for pattern, kind in _SHAPES:
        m = pattern.fullmatch(" ".join(expr.split()))
        if m is None:
            continue
        name, label, regex = m.group(1), m.group(2), m.group(3)
        selected = _select(series, name, label, regex)
        if kind == "age":
            limit = eval(m.group(4), {"__builtins__": {}})  # digits and * only, from our file
            return {k[1]: now - v for k, v in selected.items() if now - v > limit}
        op: Callable[[float, float], bool] = (
            (lambda a, b: a == b) if m.group(4) == "==" else (lambda a, b: a > b)
        )
        bound = float(m.group(5))
        return {k[1]: v for k, v in selected.items() if op(v, bound)}
    raise AssertionError(f"the Python evaluator does not know the shape of {expr!r}")


def rules() -> dict[str, dict[str, Any]]:
    """The shipped alert rules by name."""
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def test_the_rules_fire_in_python(two_runs: tuple[Path, Path]) -> None:
    first_path, second_path = two_runs
    first, second = read_textfile(str(first_path)), read_textfile(str(second_path))
    ended = max(v for k, v in second.items() if k[0] == "ccarchive_last_run_timestamp_seconds")
    r = rules()
    assert set(r) == {"CcarchiveStale", "CcarchiveFailed", "CcarchiveBadInput"}

    # After run 1: only the bad file.
    assert firing(r["CcarchiveFailed"]["expr"], first, ended) == {}
    assert firing(r["CcarchiveBadInput"]["expr"], first, ended) == {labels(cluster="bad"): 1}
    # After run 2: the conflict, and the bad file still there.
    assert firing(r["CcarchiveFailed"]["expr"], second, ended) == {
        labels(cluster="conflict", outcome="error"): 1
    }
    assert firing(r["CcarchiveBadInput"]["expr"], second, ended) == {labels(cluster="bad"): 1}
    assert firing(r["CcarchiveStale"]["expr"], second, ended) == {}
    # Two retention periods later without a run: every cluster is stale.
    later = firing(r["CcarchiveStale"]["expr"], second, ended + STALE_AFTER + 120)
    assert set(later) == {labels(cluster=c) for c in ("good", "bad", "conflict")}


# --- the rules, with promtool ------------------------------------------------------------------

# On PATH, or unpacked into the virtualenv by `make test` (see the Makefile).
PROMTOOL = shutil.which("promtool") or shutil.which(
    "promtool", path=str(Path(sys.executable).parent)
)
STEP_MINUTES = 1
RUN2_AT = 3600  # promtool's clock: the second run ends 1 h in; the first file is scraped before


def _series_values(first: Series, second: Series, until_minutes: int) -> list[dict[str, str]]:
    """promtool `input_series`: the first file's values for an hour, then the second's.

    Timestamps in the files are shifted onto promtool's clock (which starts at 0) so that
    the second run ended at RUN2_AT; everything else is as written.
    """
    t2 = max(v for k, v in second.items() if k[0] == "ccarchive_last_run_timestamp_seconds")

    def shifted(name: str, v: float | None) -> str:
        if v is None:
            return "_"
        return repr(v - t2 + RUN2_AT) if name.endswith("_timestamp_seconds") else repr(v)

    out = []
    for key in sorted(set(first) | set(second)):
        name, lab = key
        a, b = first.get(key), second.get(key)
        before = "_x60" if a is None else f"{shifted(name, a)}x59"
        after_n = until_minutes - 60
        selector = name + "{" + ",".join(f'{k}="{v}"' for k, v in lab) + "}"
        out.append({"series": selector, "values": f"{before} {shifted(name, b)}x{after_n}"})
    return out


def _expected(rule: dict[str, Any], value: float, **lab: str) -> dict[str, Any]:
    """An alert as promtool reports it: labels, and annotations with $labels/$value filled."""

    def fill(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: lab[m.group(1)], text)
        return text.replace("{{ $value }}", f"{value:g}")

    return {
        "exp_labels": {**lab, **rule.get("labels", {})},
        "exp_annotations": {k: fill(v) for k, v in rule.get("annotations", {}).items()},
    }


@pytest.mark.slow
@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")
def test_the_rules_fire_in_promtool(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    assert PROMTOOL is not None
    check = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    first_path, second_path = two_runs
    first, second = read_textfile(str(first_path)), read_textfile(str(second_path))
    r = rules()
    stale_minute = (RUN2_AT + STALE_AFTER) // 60 + 5
    failed = _expected(r["CcarchiveFailed"], 1, cluster="conflict", outcome="error")
    bad = _expected(r["CcarchiveBadInput"], 1, cluster="bad")
    stale = [_expected(r["CcarchiveStale"], 0, cluster=c) for c in ("bad", "conflict", "good")]
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": f"{STEP_MINUTES}m",
        "tests": [
            {
                "interval": f"{STEP_MINUTES}m",
                "input_series": _series_values(first, second, stale_minute + 10),
                "alert_rule_test": [
                    # After run 1 only the bad file fires.
                    {"eval_time": "30m", "alertname": "CcarchiveFailed", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "CcarchiveBadInput", "exp_alerts": [bad]},
                    # After run 2 the conflict fires too; nothing is stale yet.
                    {"eval_time": "90m", "alertname": "CcarchiveFailed", "exp_alerts": [failed]},
                    {"eval_time": "90m", "alertname": "CcarchiveBadInput", "exp_alerts": [bad]},
                    {"eval_time": "90m", "alertname": "CcarchiveStale", "exp_alerts": []},
                    {
                        "eval_time": f"{stale_minute}m",
                        "alertname": "CcarchiveStale",
                        "exp_alerts": stale,
                    },
                ],
            }
        ],
    }
    unit = tmp_path / "unit.yml"
    unit.write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = subprocess.run(
        [PROMTOOL, "test", "rules", str(unit)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr
