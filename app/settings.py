"""Server settings: `CLIPSEARCH_*` environment variables (and `clipsearch serve` flags) -> Settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.precision import INFERENCE_HELP


class Settings(BaseSettings):
    """Everything the service reads from its environment, validated once at start-up."""

    model_config = SettingsConfigDict(env_prefix="CLIPSEARCH_", env_file=None, extra="ignore")

    index_dir: Path = Field(Path("indexes/default"), description="index directory (its `current` is served)")
    model: str = Field("default", description="model: 'default', a model directory or an open_clip name")
    pretrained: str | None = Field(None, description="pretrained tag or checkpoint file for an open_clip name")
    device: str | None = Field(None, description="cpu, cuda, ... (default: CUDA when present)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description=INFERENCE_HELP)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free one)")
    workers: int = Field(1, ge=1, description="server processes (each loads its own model)")

    max_batch_size: int = Field(32, ge=1, description="largest model call the batcher forms")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch may wait to fill up")
    max_queue: int = Field(256, ge=1, description="queued requests per modality before 429")
    request_timeout_s: float = Field(30.0, gt=0, description="a queued request older than this fails (504)")

    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="request body limit (413)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb limit (400)")
    max_k: int = Field(1000, ge=1, description="largest k (and offset + k) a search may ask for")
    max_text_chars: int = Field(10_000, ge=1, description="longest query text")
    max_batch_inputs: int = Field(256, ge=1, description="most inputs in one embed request (at most max_queue: "
                                  "each input is queued on its own)")

    @property
    def inputs_per_request(self) -> int:
        """The most inputs an embed request may hold: each is queued on its own, so one longer than
        the queue would be refused (429) however idle the server."""
        return min(self.max_batch_inputs, self.max_queue)

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                      description="accepted API keys; empty: no auth")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="allowed CORS origins")
    reload_interval_s: float = Field(2.0, ge=0, description="index hot-reload poll period; 0 disables")
    keep_alive_s: int = Field(75, ge=1, description="idle keep-alive, longer than the proxy's upstream one")
    drain_s: float = Field(2.0, ge=0, description="after SIGTERM: seconds of serving while /readyz says 503, "
                           "before the listener closes (keep under the orchestrator's grace period)")
    thumbnail_size: int = Field(256, ge=16, le=1024)

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _list_from_text(cls, value: Any) -> Any:
        """A list from the environment as a JSON list ('["k1", "k2"]') or comma-separated (k1,k2):
        a bare key was "error parsing value for field api_keys", with no word on the format wanted."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list ({exc.msg}); or give the items comma-separated") from None
        return [item.strip() for item in text.split(",") if item.strip()]
