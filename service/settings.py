"""Service settings, read from ``MM_``-prefixed environment variables (pydantic-settings).

Lists may be given as JSON (``MM_API_KEYS='["a","b"]'``) or comma-separated (``MM_API_KEYS=a,b``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The generator backends: the one list (service.generation's registry builds each; the API, the OpenAI
# route's model names and `mm ask --backend` take these names).
Backend = Literal["extractive", "local", "openai", "gguf"]
BACKENDS: tuple[str, ...] = get_args(Backend)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MM_", extra="ignore")

    collection: Path = Path("collection")  # collection directory (created on first start if missing)
    model: str = "default"  # model name (mm/configs) or checkpoint path, see service.embedding
    allowed_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)  # dirs POST /ingest may read
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)  # empty: no authentication
    max_upload_mb: float = Field(100.0, gt=0)  # request bodies above this answer 413 (checked while reading)
    body_timeout_s: float = Field(30.0, gt=0)  # a request body that stops arriving this long answers 408
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)  # empty: no CORS headers
    media_dir: Path | None = None  # where uploads are stored; None: <collection>/media
    thumbnail_size: int = Field(256, ge=16, le=2048)  # longest side of image thumbnails, pixels
    ingest_workers: int = Field(2, ge=1, le=64)  # decode threads of background ingest jobs
    batch_size: int = Field(32, ge=1, le=4096)  # encode batch of background ingest jobs
    memory_budget_mb: int = Field(1024, ge=16)  # FAISS index budget when the collection is created
    generator: Backend = "extractive"  # default answer backend
    lm_path: Path | None = None  # local backend: LM checkpoint dir; None: mm/checkpoints/lm
    openai_base_url: str | None = None  # openai backend: e.g. http://localhost:8080/v1
    openai_api_key: str | None = None
    openai_model: str = "gpt-4o-mini"
    openai_timeout: float = Field(30.0, gt=0)  # seconds
    gguf_path: Path | None = None  # gguf backend: model file; None: the `llm` extra's Gemma 3 270M (mm.gemma)
    # rewrite a question into the name of the thing it asks for before grounded retrieval, with the `llm`
    # extra's Gemma 3 270M (service.generation.rewrite); "off": the question's own words are searched
    rewrite: Literal["off", "gguf"] = "off"
    fast_search: bool = True  # answer POST /search in front of the framework (service.fastpath)
    adapter: Path | None = None  # LoRA adapter directory (from `mm finetune`) merged into the model at start
    shard_deadline_s: float = Field(2.0, gt=0)  # a sharded search waits this long for each shard (then 503)
    ray_address: str | None = None  # serve a sharded collection's shards as Ray actors on this cluster
    # FAISS's OpenMP threads per search. One query at a time gains nothing from more, and with the
    # default (every core) a search on a busy machine waits on its spinning sibling threads: measured
    # 12-15 ms p50 against 0.4-0.6 ms with one thread while training ran beside it
    search_threads: int = Field(1, ge=1, le=256)

    @field_validator("allowed_roots", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def media_path(self) -> Path:
        return self.media_dir if self.media_dir is not None else self.collection / "media"

    @property
    def thumbnail_path(self) -> Path:
        return self.collection / "thumbnails"
