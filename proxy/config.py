"""The proxy's one YAML config file, validated into frozen models.

``${ENV}`` and ``${ENV:-default}`` are expanded in every string; every error
(unknown key, bad type, missing variable) is reported with file and line, all
at once. Relative paths (``policies:``, ``telemetry.audit_log``) are relative
to the config file's folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from rules.yamlsrc import SourceError, YamlLoadError, load_yaml, pydantic_errors

STORE_SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    upstream_timeout_s: float = Field(default=120.0, gt=0)
    upstream_connect_timeout_s: float = Field(default=10.0, gt=0)
    upstream_pool_size: int = Field(default=256, gt=0)
    max_body_depth: int = Field(default=64, gt=0, le=1000)
    body_read_timeout_s: float = Field(default=30.0, gt=0)
    stream_write_timeout_s: float = Field(default=30.0, gt=0)
    max_stream_buffer_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    max_tools: int = Field(default=512, gt=0)
    max_schema_bytes: int = Field(default=65536, gt=0)
    max_schema_depth: int = Field(default=32, gt=0, le=1000)
    schema_compile_budget_ms: float = Field(default=50.0, gt=0)
    json_max_depth: int = Field(default=32, gt=0)
    json_max_string: int = Field(default=65536, gt=0)
    watch_policies: bool = True
    watch_interval_s: float = Field(default=1.0, gt=0)
    decision_secret: SecretStr | None = None


class PriceConfig(_Frozen):
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cached_input_per_mtok: float | None = Field(default=None, ge=0)


class ModelRoute(_Frozen):
    """A client-facing model name and the upstream that serves it."""

    name: str = Field(min_length=1)
    upstream: str = Field(min_length=1, description="provider/model, litellm style")
    api_base: str | None = None
    api_key: SecretStr | None = None
    price: PriceConfig | None = None
    max_output_tokens: int | None = Field(default=None, gt=0)
    timeout_s: float | None = Field(default=None, gt=0)

    @property
    def provider(self) -> str:
        return self.upstream.split("/", 1)[0] if "/" in self.upstream else "openai"

    @property
    def upstream_model(self) -> str:
        return self.upstream.split("/", 1)[1] if "/" in self.upstream else self.upstream


class KeyConfig(_Frozen):
    """A proxy key and the principal it stands for."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    key: SecretStr | None = None
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    team: str | None = None
    org: str = "default"

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        has_key = self.key is not None and self.key.get_secret_value() != ""
        if has_key == (self.key_sha256 is not None):
            raise ValueError("give exactly one of key or key_sha256 (and the key must not be empty)")
        return self

    def digest(self) -> str:
        if self.key_sha256 is not None:
            return self.key_sha256
        assert self.key is not None
        return hashlib.sha256(self.key.get_secret_value().encode()).hexdigest()


class TelemetryConfig(_Frozen):
    # None = unset: the standard OTEL_TRACES_EXPORTER / OTEL_SERVICE_NAME fill it, else none / guardproxy.
    exporter: Literal["none", "console", "otlp"] | None = None
    endpoint: str | None = None
    service_name: str | None = None
    capture_content: bool = False
    audit_log: str | None = None  # "-" for stdout, a path, or none


class Config(_Frozen):
    server: ServerConfig = Field(default_factory=ServerConfig)
    policies: tuple[str, ...] = ("policies/",)
    store: str = "memory"
    store_timeout_s: float = Field(default=0.25, gt=0)
    store_max_entries: int = Field(default=1_000_000, gt=0)
    idempotency_ttl_s: int = Field(default=86400, gt=0)
    approval_ttl_s: int = Field(default=86400, gt=0)
    models: tuple[ModelRoute, ...] = Field(min_length=1)
    keys: tuple[KeyConfig, ...] = ()
    admin_keys: tuple[SecretStr, ...] = ()
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    base_dir: str = Field(default=".", exclude=True)

    @field_validator("store")
    @classmethod
    def _known_store(cls, v: str) -> str:
        # A typo (``memroy``) must fail at load, not fall back to a default or fail at first use.
        scheme = v.split("://", 1)[0].lower() if "://" in v else v
        if v != "memory" and ("://" not in v or scheme not in STORE_SCHEMES):
            raise ValueError(f"unknown store {v!r}: use memory or a URL with scheme " + ", ".join(STORE_SCHEMES))
        return v

    @field_validator("admin_keys")
    @classmethod
    def _no_empty_admin(cls, v: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        if any(k.get_secret_value() == "" for k in v):
            raise ValueError("admin keys must not be empty")
        return v

    @model_validator(mode="after")
    def _unique(self) -> Config:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        ids = [k.id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError("key ids must be unique")
        digests = [k.digest() for k in self.keys]
        if len(set(digests)) != len(digests):
            raise ValueError("two keys have the same secret")
        return self

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def route(self, name: str) -> ModelRoute | None:
        for m in self.models:
            if m.name == name:
                return m
        return None


class ConfigError(ValueError):
    """The config file is invalid; ``errors`` lists every problem with file and line."""

    def __init__(self, errors: list[SourceError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


def parse_config(text: str, source: str, env: Mapping[str, str] | None = None) -> Config:
    """Validate config text; raise :class:`ConfigError` with every error found."""
    environ = os.environ if env is None else env
    early: list[SourceError] = []
    try:
        located = load_yaml(text, source, env=environ)
    except YamlLoadError as exc:
        if exc.located is None or not isinstance(exc.located.data, dict):
            raise ConfigError(exc.errors) from None
        # A missing variable or duplicate key: validate anyway so every error shows up in one run.
        early, located = exc.errors, exc.located
    if not isinstance(located.data, dict):
        raise ConfigError([SourceError(source, 1, "", "the config file must be a YAML mapping")])
    data = dict(located.data)
    data["base_dir"] = str(Path(source).resolve().parent) if source != "<string>" else "."
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        # A missing variable expands to "", which may fail validation again at the same place.
        seen = {e.path for e in early}
        raise ConfigError(early + [e for e in pydantic_errors(exc, located) if e.path not in seen]) from None
    if early:
        raise ConfigError(early)
    return config


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file at ``path``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([SourceError(str(p), None, "", f"cannot read config: {exc.strerror}")]) from None
    return parse_config(text, str(p), env)
