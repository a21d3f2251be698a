"""`clipsearch bench`'s verdict: which outcomes fail a load run."""

from __future__ import annotations

from app.bench import LoadReport, batch_sizes


def _report(statuses: dict[int, int]) -> LoadReport:
    report = LoadReport()
    for status, count in statuses.items():
        for _ in range(count):
            report.sent += 1
            report.statuses[status] = report.statuses.get(status, 0) + 1
            if status == 200:
                report.ok += 1
            else:
                report.failed += 1
            if status == 429:
                report.shed_latencies.append(0.01)
    return report


def test_any_failure_fails_a_plain_run() -> None:
    assert _report({200: 10}).passed()
    assert not _report({200: 10, 429: 1}).passed()


def test_shedding_is_allowed_only_when_asked_and_only_as_429() -> None:
    assert _report({200: 10, 429: 5}).passed(allow_shed=True)
    assert not _report({200: 10, 429: 5, 500: 1}).passed(allow_shed=True)
    assert not _report({200: 10, 0: 1}).passed(allow_shed=True)  # a connection error is never shedding


def test_batch_sizes_read_from_prometheus_text() -> None:
    text = "\n".join([
        'clipsearch_batch_size_count{modality="text"} 4.0',
        'clipsearch_batch_size_sum{modality="text"} 10.0',
        'clipsearch_batch_size_bucket{le="1.0",modality="text"} 1.0',
    ])
    assert batch_sizes(text) == {"text": {"batches": 4.0, "mean_size": 2.5, "share_above_1": 0.75}}


def test_memory_summary_measures_growth_after_warm_up() -> None:
    report = LoadReport(seconds=100.0, rss_mb=[(0.0, 300.0), (5.0, 380.0), (10.0, 400.0), (50.0, 404.0),
                                               (100.0, 402.0)])
    assert report.memory_summary() == {"before": 300.0, "warm": 400.0, "halfway": 404.0, "end": 402.0,
                                       "peak": 404.0, "growth_after_warm": 2.0, "growth_second_half": -2.0}
    assert LoadReport().memory_summary() == {}
