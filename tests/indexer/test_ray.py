"""The Ray backend on a local Ray instance gives the same index as the local pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray

from indexer.artifacts import load_index
from indexer.ray_backend import RayOptions
from indexer.reader import open_source
from indexer.runner import IndexConfig, run_index
from models import load_encoder

from .conftest import make_messy_folder


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_ray_backend_matches_local(tmp_path: Path, tiny_model_dir: Path, local_ray) -> None:
    bad = make_messy_folder(tmp_path / "data", good=30, bad=5)
    import shutil

    shutil.copy(next((tmp_path / "data").rglob("img00004.png")), tmp_path / "data" / "dup.png")
    encoder = load_encoder(tiny_model_dir, device="cpu")
    local = run_index(open_source(tmp_path / "data"), encoder,
                      IndexConfig(out_dir=tmp_path / "local", batch_size=16, workers=2, progress=False))
    options = RayOptions(model=str(tiny_model_dir), actors=1, batch_size=16, device="cpu")
    distributed = run_index(open_source(tmp_path / "data"), encoder,
                            IndexConfig(out_dir=tmp_path / "ray", batch_size=16, progress=False, backend="ray",
                                        ray=options, shard_size=32))
    assert distributed.as_dict() | {"seconds": 0, "embed_seconds": 0} == local.as_dict() | {"seconds": 0,
                                                                                            "embed_seconds": 0}
    assert distributed.rejected_total == len(bad) and distributed.duplicates == 1
    want, got = load_index(tmp_path / "local"), load_index(tmp_path / "ray")
    assert got.metadata == want.metadata and got.texts == want.texts
    np.testing.assert_allclose(got.embeddings, want.embeddings, atol=1e-5)

    # an incremental re-run through Ray reuses every vector
    again = run_index(open_source(tmp_path / "data"), encoder,
                      IndexConfig(out_dir=tmp_path / "ray", batch_size=16, progress=False, backend="ray",
                                  ray=options))
    assert again.embedded == 0 and again.unchanged
