"""Building a model drops exactly the expected load messages and lets every other one through."""

from __future__ import annotations

import logging

import pytest

from models import load_encoder
from models.load_noise import TRANSFORMERS_LOAD_LOGGER, is_unused_pooler_report, quiet_model_build

# The shape of transformers' report (header, separator, one row per key, notes).
POOLER_REPORT = """BertModel LOAD REPORT from: /somewhere/model
Key                 | Status     |  |
--------------------+------------+--+-
pooler.dense.bias   | UNEXPECTED |  |
pooler.dense.weight | UNEXPECTED |  |

Notes:
- UNEXPECTED:\tcan be ignored when loading from different task/architecture."""
MISSING_REPORT = POOLER_REPORT.replace("pooler.dense.bias   | UNEXPECTED", "embeddings.word     | MISSING   ")


def test_only_a_report_of_unused_pooler_weights_counts_as_expected() -> None:
    assert is_unused_pooler_report(POOLER_REPORT)
    assert not is_unused_pooler_report(MISSING_REPORT)  # a missing weight is a real problem
    assert not is_unused_pooler_report("BertModel LOAD REPORT from: x\nNotes: none")  # no rows
    assert not is_unused_pooler_report("pooler.dense.bias | UNEXPECTED")  # not a load report


def test_quiet_model_build_drops_the_expected_messages_only(caplog: pytest.LogCaptureFixture) -> None:
    hf_logger = logging.getLogger(TRANSFORMERS_LOAD_LOGGER)
    # Capture transformers' logger directly, once: it need not propagate to the root logger.
    propagate, hf_logger.propagate = hf_logger.propagate, False
    hf_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING), quiet_model_build(partial_load=True):
            logging.warning("Model clipsearch-dyn-1 initialized partially.")
            hf_logger.warning(POOLER_REPORT)
            logging.warning("something else")
            hf_logger.warning(MISSING_REPORT)
        with quiet_model_build(partial_load=False):
            logging.warning("Model clipsearch-dyn-2 initialized partially.")  # no partial load: kept
        hf_logger.warning(POOLER_REPORT)  # outside the block every message is kept
    finally:
        hf_logger.removeHandler(caplog.handler)
        hf_logger.propagate = propagate
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "something else",
        MISSING_REPORT,
        "Model clipsearch-dyn-2 initialized partially.",
        POOLER_REPORT,
    ]


def test_loading_the_default_model_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    load_encoder()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
