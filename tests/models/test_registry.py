"""Config registration shared by processes: replicas that start together must never see a torn file."""

from __future__ import annotations

import json
import multiprocessing as mp
import uuid

import open_clip

from models import registry


def _rewrite(name: str, texts: list[str], rounds: int) -> None:
    for i in range(rounds):
        registry.write_config_file(name, texts[i % len(texts)])


def test_config_file_is_never_read_torn_while_other_processes_write_it() -> None:
    # Two contents alternate so each write really replaces the file (same content is skipped).
    name = f"clipsearch-test-{uuid.uuid4().hex[:8]}"
    texts = [json.dumps({"embed_dim": 8, "pad": "x" * 20_000, "v": v}) for v in range(2)]
    path = registry.write_config_file(name, texts[0])
    writers = [mp.get_context("fork").Process(target=_rewrite, args=(name, texts, 150)) for _ in range(3)]
    for writer in writers:
        writer.start()
    reads = 0
    try:
        while any(writer.is_alive() for writer in writers):
            assert json.loads(path.read_text())["embed_dim"] == 8
            reads += 1
    finally:
        for writer in writers:
            writer.join()
        path.unlink(missing_ok=True)
    assert all(writer.exitcode == 0 for writer in writers)
    assert reads > 0


def test_register_config_is_found_by_open_clip_under_its_content_name() -> None:
    config = registry.get_model_config("clipsearch-tiny")
    config["embed_dim"] = 24  # a config no built-in name holds
    name = registry.register_config(config)
    assert name == registry.register_config(config)  # idempotent: same content, same name
    assert open_clip.get_model_config(name)["embed_dim"] == 24
