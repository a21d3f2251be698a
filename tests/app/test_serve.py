"""`clipsearch serve` at the edge: a server that cannot start says why in one line, and a real
bug still shows its traceback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from app.errors import NotReady
from app.serve import StartupErrorInOneLine
from models.encoder import WeightsNotCached

ROOT = Path(__file__).resolve().parents[2]


def _traceback_record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:  # noqa: BLE001 - the traceback text is what uvicorn logs
        text = traceback.format_exc()
    return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, text, (), None)


def test_self_explaining_startup_errors_shrink_to_one_line() -> None:
    cases = [
        (NotReady("index abc was made with model X, not Y"), "cannot start: index abc was made with model X, not Y"),
        (KeyError("unknown architecture 'nope'; known: A, B"), "cannot start: unknown architecture 'nope'; known: A, B"),
        (FileNotFoundError("model directory /m not found"), "cannot start: model directory /m not found"),
        (WeightsNotCached("the weights of hf-hub:o/m are not in the local model cache"),
         "cannot start: the weights of hf-hub:o/m are not in the local model cache"),
    ]
    for error, expected in cases:
        record = _traceback_record(error)
        assert StartupErrorInOneLine().filter(record)
        assert record.getMessage() == expected


def test_a_bug_keeps_its_traceback() -> None:
    record = _traceback_record(ZeroDivisionError("division by zero"))
    assert StartupErrorInOneLine().filter(record)
    assert record.getMessage().startswith("Traceback (most recent call last)")


def test_serve_with_a_missing_model_exits_with_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--model", str(tmp_path / "no-model"), "--index", str(tmp_path),
         "--port", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"cannot start: model directory {tmp_path / 'no-model'} not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_with_workers_and_a_missing_model_fails_with_one_clear_line(tmp_path: Path) -> None:
    # Each worker process sets up its own logging: the one-line filter must reach it, and the
    # supervisor must pass the failure on as its exit status (uvicorn.run alone returns 0).
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--model", str(tmp_path / "no-model"), "--index", str(tmp_path),
         "--port", "0", "--workers", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3
    assert f"cannot start: model directory {tmp_path / 'no-model'} not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_with_an_unknown_device_exits_with_one_clear_line(tmp_path: Path) -> None:
    """torch's RuntimeError for "tpu" reached uvicorn as a whole traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--index", str(tmp_path), "--port", "0", "--device", "tpu"],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "cannot start: unknown device 'tpu': use cpu, cuda or cuda:N" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_on_a_taken_port_is_refused_before_the_model_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  taken_port: int) -> None:
    """uvicorn binds after the app's startup: a taken port was reported only after the model load."""
    import app.main
    from app.cli import main

    def no_app(*args, **kwargs):
        raise AssertionError("the app was built for a server that had to be refused")

    monkeypatch.setattr(app.main, "create_app", no_app)
    for workers in ("1", "2"):
        assert main(["serve", "--index", str(tmp_path), "--port", str(taken_port), "--workers", workers]) == 2
        assert f"cannot listen on 127.0.0.1:{taken_port}: Address already in use" in caplog.text
        caplog.clear()


@pytest.mark.parametrize(("flags", "message"), [
    (["--port", "70000"], "invalid setting port (a flag, or CLIPSEARCH_PORT): Input should be less than or equal "
                          "to 65535, got 70000"),
    (["--workers", "0"], "invalid setting workers (a flag, or CLIPSEARCH_WORKERS): Input should be greater than "
                         "or equal to 1, got 0"),
])
def test_serve_settings_out_of_range_are_one_line_each(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        flags: list[str], message: str) -> None:
    """A port past 65535 ended in an OverflowError traceback from the socket; pydantic's own text
    took four lines and a URL a field."""
    from app.cli import main

    assert main(["serve", "--index", str(tmp_path), *flags]) == 2
    assert message in caplog.text
    assert "errors.pydantic.dev" not in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize(("text", "expected"), [
    ("k1", ["k1"]), ("k1, k2 ,", ["k1", "k2"]), ('["k1", "k2"]', ["k1", "k2"]), ("", []),
])
def test_list_settings_take_json_or_comma_separated_text(monkeypatch: pytest.MonkeyPatch, text: str,
                                                         expected: list[str]) -> None:
    """CLIPSEARCH_API_KEYS=k1 was 'error parsing value for field "api_keys"', with no word on the format."""
    from app.settings import Settings

    monkeypatch.setenv("CLIPSEARCH_API_KEYS", text)
    monkeypatch.setenv("CLIPSEARCH_CORS_ORIGINS", text)
    settings = Settings()
    assert settings.api_keys == expected and settings.cors_origins == expected


def test_a_bad_key_list_is_named_without_showing_the_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from app.cli import main

    monkeypatch.setenv("CLIPSEARCH_API_KEYS", '["secret-k1", ')
    assert main(["serve", "--index", str(tmp_path)]) == 2
    assert "invalid setting api_keys (a flag, or CLIPSEARCH_API_KEYS): not a JSON list" in caplog.text
    assert "secret-k1" not in caplog.text


def test_a_rule_across_settings_is_reported_alone(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A validation error with no one field (a model-level rule) has every setting as its input:
    it is named without them (they may hold API keys), not as a setting called "body"."""
    from pydantic import BaseModel, model_validator

    import app.serve
    from app.cli import main

    class Rule(BaseModel):
        api_keys: list[str]

        @model_validator(mode="after")
        def _never(self) -> Rule:
            raise ValueError("these settings do not go together")

    def serve(args):
        return Rule(api_keys=["secret-k1"])

    monkeypatch.setattr(app.serve, "_serve", serve)
    assert main(["serve"]) == 2
    assert "invalid settings: these settings do not go together" in caplog.text
    assert "secret-k1" not in caplog.text and "body" not in caplog.text


def test_serve_takes_the_weights_and_precision_an_index_was_built_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`clipsearch index --model ViT-B-32 --pretrained FILE` had no `serve` counterpart: only the
    CLIPSEARCH_PRETRAINED variable reached the server's model load."""
    import app.main
    from app.cli import main

    class Built(Exception):
        pass

    seen = []

    def create_app(settings):
        seen.append(settings)
        raise Built

    monkeypatch.setattr(app.main, "create_app", create_app)
    with pytest.raises(Built):
        main(["serve", "--index", str(tmp_path), "--model", "ViT-B-32", "--pretrained", "/models/vit-b-32.pt",
              "--precision", "bf16", "--port", "0"])
    assert (seen[0].model, seen[0].pretrained, seen[0].precision) == ("ViT-B-32", "/models/vit-b-32.pt", "bf16")


def test_a_precision_the_encoder_does_not_know_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from app.cli import main

    monkeypatch.setenv("CLIPSEARCH_PRECISION", "fp16")
    assert main(["serve", "--index", str(tmp_path)]) == 2
    assert "invalid setting precision (a flag, or CLIPSEARCH_PRECISION): Input should be 'auto', 'fp32' or 'bf16', " \
           "got 'fp16'" in caplog.text

