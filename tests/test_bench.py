"""``mpwal bench``'s bookkeeping, without running a figure: the mpwal/this column of rate and
latency tables, and the latency sample's percentiles and reservoir (nothing here times anything)."""

from __future__ import annotations

from mpwal.tools import bench


def ratios(fig: bench.Figure) -> dict[str, str]:
    """{system: its mpwal/this cell} from the Markdown table of a figure of workload "w"."""
    cells = [[c.strip() for c in line.strip("|").split("|")]
             for line in bench.render(fig, markdown=True).splitlines() if line.startswith("| w |")]
    return {c[1]: c[-1] for c in cells}


def test_rates_divide_the_first_mpwal_row_by_each_row():
    fig = bench.Figure("t", ["records/s"], [
        bench.Row("w", "mpwal (relaxed)", {"records/s": 300.0}),
        bench.Row("w", "mpwal (relaxed), Python backend", {"records/s": 100.0}),
        bench.Row("w", "SQLite WAL NORMAL", {"records/s": 600.0}),
        bench.Row("w", "LMDB", None, "lmdb not installed")])
    assert ratios(fig) == {"mpwal (relaxed)": "", "mpwal (relaxed), Python backend": "3.00×",
                           "SQLite WAL NORMAL": "0.50×", "LMDB": ""}


def test_latencies_divide_each_rows_p99_by_mpwals():
    cols = ["p50 µs", "p99 µs", "max µs"]
    fig = bench.Figure("t", cols, [
        bench.Row("w", "mpwal", dict(zip(cols, (1.0, 2.0, 9.0)))),
        bench.Row("w", "SQLite WAL NORMAL", dict(zip(cols, (50.0, 8.0, 9.0)))),
        bench.Row("w", "LMDB", dict(zip(cols, (0.5, 1.0, 9.0))))],
        ratio_on="p99 µs", lower_is_better=True)
    assert ratios(fig) == {"mpwal": "", "SQLite WAL NORMAL": "4.00×", "LMDB": "0.50×"}


def test_sample_percentiles_by_nearest_rank():
    s = bench.Sample()
    for ns in range(1000, 0, -1):      # 1 … 1000 µs, in any order
        s.add(ns * 1000)
    assert s.summary() == {"p50 µs": 500.0, "p99 µs": 990.0, "max µs": 1000.0}
    assert bench.Sample().summary() == {}


def test_sample_keeps_a_bounded_reservoir_and_the_exact_max(monkeypatch):
    monkeypatch.setattr(bench, "LATENCY_SAMPLE", 100)
    s = bench.Sample()
    for ns in range(10_000):
        s.add(5_000_000 if ns == 7_777 else ns)
    assert len(s.kept) == 100 and s.seen == 10_000
    assert s.summary()["max µs"] == 5000.0
