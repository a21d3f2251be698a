"""`clipsearch bench`: which outcomes fail a load run, and several generator processes as one."""

from __future__ import annotations

import asyncio
import json

import pytest

from app import bench_filters
from app.bench import QUERIES, WORDS, LoadReport, batch_sizes, drive_processes, text_query
from app.cli import main
from app.lbtest import free_port_block


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


def test_reports_of_several_generators_merge() -> None:
    first = _report({200: 3, 429: 1})
    first.seconds, first.latencies, first.rss_mb = 10.0, [0.1] * 4, [(0.0, 300.0), (9.0, 310.0)]
    second = _report({200: 2, 500: 1})
    second.seconds, second.latencies = 10.4, [0.2] * 3
    merged = LoadReport.merged([first, second])
    assert (merged.sent, merged.ok, merged.failed) == (7, 5, 2)
    assert merged.statuses == {200: 5, 429: 1, 500: 1}
    assert sorted(merged.latencies) == [0.1] * 4 + [0.2] * 3 and len(merged.shed_latencies) == 1
    assert merged.seconds == 10.4  # they ran side by side: the run lasted as long as the longest
    assert merged.rss_mb == first.rss_mb
    assert merged.as_dict()["qps"] == round(5 / 10.4, 1)


def test_several_generator_processes_drive_one_server(live_server: str) -> None:
    report = drive_processes(live_server, clients=5, duration_s=1.5, image_share=0.5, processes=2)
    assert report.sent > 5 and report.ok == report.sent and report.failed == 0
    assert len(report.latencies) == report.sent
    assert report.rss_mb, "the first generator samples the server's memory"
    assert 1.4 < report.seconds < 10


def test_varied_texts_span_every_length_up_to_sixty_words() -> None:
    """The soak's texts: 1 to 60 words (every width of a 64-token tower); the fixed queries otherwise."""
    import random

    rng = random.Random(0)
    lengths = {len(text_query(rng, varied=True).split()) for _ in range(3000)}
    assert lengths == set(range(1, 61))
    assert all(word in WORDS for word in text_query(rng, varied=True).split())
    assert {text_query(rng) for _ in range(500)} == set(QUERIES)


def test_a_varied_text_run_is_served_without_failures(live_server: str) -> None:
    report = drive_processes(live_server, clients=4, duration_s=1.0, image_share=0.0, processes=1, varied_texts=True)
    assert report.sent > 4 and report.ok == report.sent and report.failed == 0


@pytest.mark.parametrize("processes", ["0", "4"])
def test_more_processes_than_clients_is_refused(processes: str, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["bench", "--url", "http://127.0.0.1:9", "--clients", "3", "--processes", processes]) == 2
    assert "--processes must be between 1 and --clients (3)" in caplog.text


@pytest.mark.parametrize(("flags", "message"), [
    (["--clients", "0"], "--clients must be at least 1, got 0"),
    (["--duration", "-1"], "--duration must be positive (seconds), got -1.0"),
    (["--image-share", "2"], "--image-share must lie in [0, 1], got 2.0"),
])
def test_load_settings_that_measure_nothing_are_refused(flags: list[str], message: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """bench and lb-test share the check; lb-test with no clients ended in an IndexError."""
    assert main(["bench", "--url", "http://127.0.0.1:9", *flags]) == 2
    assert message in caplog.text
    caplog.clear()
    assert main(["lb-test", "--index", "nowhere", *flags]) == 2
    assert message in caplog.text


def test_lb_test_needs_a_replica_to_survive_the_kill(caplog: pytest.LogCaptureFixture) -> None:
    assert main(["lb-test", "--index", "nowhere", "--replicas", "1"]) == 2
    assert "--replicas must be at least 2, got 1" in caplog.text


def test_bench_without_a_server_says_so_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """Every client raised ConnectError and the command ended in its traceback."""
    port = free_port_block(1)  # nothing listens there
    assert main(["bench", "--url", f"http://127.0.0.1:{port}", "--duration", "1"]) == 2
    assert f"no clipsearch server answers at http://127.0.0.1:{port}" in caplog.text
    assert "Traceback" not in caplog.text


def test_bench_against_a_live_server_prints_its_report(live_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The command end to end, past the check that a server answers."""
    assert main(["bench", "--url", live_server, "--clients", "2", "--duration", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clients"] == 2 and report["failed"] == 0 and report["ok"] > 0


def test_bench_against_a_server_with_api_keys(index_dir, app_encoder, capsys: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Against a server with CLIPSEARCH_API_KEYS every request was a 401 and the run just failed,
    with no way to give a key. Now: --api-key, and a missing or wrong key said before the run."""
    from .conftest import serving, settings_for

    with serving(settings_for(index_dir, api_keys=["k1"]), app_encoder) as base:
        assert main(["bench", "--url", base, "--clients", "2", "--duration", "1"]) == 2
        assert "wants an API key (its CLIPSEARCH_API_KEYS): pass one with --api-key" in caplog.text
        assert main(["bench", "--url", base, "--clients", "2", "--duration", "1", "--api-key", "k2"]) == 2
        assert "refused the API key given" in caplog.text
        capsys.readouterr()
        assert main(["bench", "--url", base, "--clients", "2", "--duration", "1", "--processes", "2",
                     "--api-key", "k1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["failed"] == 0 and report["ok"] > 0


def test_filter_bench_serves_both_kinds_of_client(index_dir, app_encoder) -> None:
    """The filter benchmark's clients are all answered (a failed request would raise)."""
    for kind in ("eq", "contains"):
        report = asyncio.run(bench_filters.measure(index_dir, app_encoder, 2_000, 2, 1.0, kind))
        assert report["items"] == 2_000 and report["kind"] == kind
        assert report["plain_searches"] > 0 and report["filtered_searches"] > 0
        assert report["plain_p50_ms"] <= report["plain_p99_ms"] <= report["plain_max_ms"]
