"""The FastAPI app: built once from a config, state on ``app.state.gp``.

``create_app(config)`` wires the parts chosen by config (store backend,
upstream targets, telemetry exporters) and starts the background tasks (policy
watcher) in the lifespan. With no provider key configured for an OpenAI route
whose base is the public API, the route goes to the built-in scripted model,
and the log says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

from otel.audit import AuditLog
from otel.metrics import Metrics
from otel.tracing import Tracing, TracingSettings
from proxy.admin import admin_routes
from proxy.auth import KeyRing
from proxy.chat import chat_completions
from proxy.config import Config
from proxy.costing import CostGovernor
from proxy.decisions import DecisionIds
from proxy.errors import ProxyError
from proxy.idempotency import Idempotency
from proxy.policy_source import PolicyHolder
from proxy.pricing import PriceBook
from proxy.responses import error_response
from proxy.routes import info_routes
from proxy.state import AppState
from proxy.stores import open_store
from proxy.telemetry import Telemetry, team_label
from proxy.tokens import TokenCounter, configure_offline_encodings
from proxy.upstream import Upstreams, build_target
from rules.schemas import SchemaCache

log = logging.getLogger("guardproxy")
PUBLIC_OPENAI = "https://api.openai.com/v1"


def _needs_mock(config: Config) -> bool:
    for m in config.models:
        key = m.api_key.get_secret_value() if m.api_key is not None else ""
        if m.provider == "openai" and not key and (m.api_base or PUBLIC_OPENAI).rstrip("/") == PUBLIC_OPENAI:
            return True
    return False


def build_state(config: Config, *, mock_base: str | None = None) -> AppState:
    prices = PriceBook.load({m.name: m.price.model_dump(exclude_none=True) for m in config.models if m.price})
    configure_offline_encodings()
    tokens = TokenCounter()
    store = open_store(config.store, timeout_s=config.store_timeout_s, max_entries=config.store_max_entries)
    srv = config.server
    targets = {}
    for m in config.models:
        key = m.api_key.get_secret_value() if m.api_key is not None else ""
        base = None
        if mock_base and m.provider == "openai" and not key and (
                (m.api_base or PUBLIC_OPENAI).rstrip("/") == PUBLIC_OPENAI):
            base = mock_base
            log.warning("model %s: no provider key set, routing to the built-in scripted model (not a real LLM)",
                        m.name)
        targets[m.name] = build_target(m, api_base=base, timeout_s=srv.upstream_timeout_s,
                                       connect_s=srv.upstream_connect_timeout_s)
    holder = PolicyHolder([config.resolve(p) for p in config.policies])
    tel = config.telemetry
    tracing = Tracing(TracingSettings.from_env({k: v for k, v in {
        "exporter": tel.exporter, "endpoint": tel.endpoint, "service_name": tel.service_name,
        "capture_content": tel.capture_content}.items() if v is not None}))
    metrics = Metrics(models=[m.name for m in config.models], keys=[k.id for k in config.keys],
                      teams=[team_label(k.org, k.team) for k in config.keys if k.team])
    audit = AuditLog(str(config.resolve(tel.audit_log)) if tel.audit_log not in (None, "-") else tel.audit_log) \
        if tel.audit_log else None
    telemetry = Telemetry(tracing, metrics, audit, providers={m.name: m.provider for m in config.models})
    holder._on_reload = lambda result, revision: telemetry.policies_loaded(result, revision, holder.current)
    secret = srv.decision_secret.get_secret_value() if srv.decision_secret is not None else None
    decision_ids = DecisionIds.from_config(secret, [k.digest() for k in config.keys]
                                           + [a.get_secret_value() for a in config.admin_keys])
    return AppState(
        config=config, keys=KeyRing(config), policies=holder, decision_ids=decision_ids,
        upstreams=Upstreams(srv.upstream_pool_size, max_depth=srv.max_body_depth),
        targets=targets, store=store, cost=CostGovernor(config, prices, tokens, store),
        idempotency=Idempotency(store, config.idempotency_ttl_s), schema_cache=SchemaCache(),
        telemetry=telemetry,
    )


def create_app(config: Config, *, state: AppState | None = None) -> FastAPI:
    """The ASGI app for ``config``. Policies are loaded before it serves; a broken set refuses to start."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st: AppState = app.state.gp
        await st.upstreams.start()
        st.cost.tokens.warm()
        if config.server.watch_policies:
            st.background.append(asyncio.create_task(st.policies.watch(config.server.watch_interval_s)))
        try:
            yield
        finally:
            for t in st.background:
                t.cancel()
            await st.upstreams.close()
            with contextlib.suppress(Exception):
                await st.store.close()
            if st.mock_server is not None:
                st.mock_server.close()
            st.telemetry.tracing.shutdown()
            st.cost.tokens.close()
            if st.telemetry.audit is not None:
                st.telemetry.audit.close()

    # No redirects: a trailing slash (``/v1/chat/completions/``) is a 404 envelope, not a 307 to the
    # route. One spelling per path keeps path-based metrics and any path rule in front unambiguous.
    app = FastAPI(title="guardproxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    st = state or build_state(config)
    errors = st.policies.load_initial()
    if errors:
        raise RuntimeError("policies failed to load:\n" + "\n".join(str(e) for e in errors))
    if st.policies.current is not None:
        st.telemetry.policies_loaded("ok", st.policies.current.revision, st.policies.current)
    app.state.gp = st
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/chat/completions", chat_completions, methods=["POST"])
    for path, endpoint, methods in [*info_routes(), *admin_routes()]:
        app.add_route(path, endpoint, methods=methods)

    @app.exception_handler(ProxyError)
    async def _proxy_error(request: Request, exc: ProxyError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        # The framework's own headers stay (405 carries ``Allow``).
        err = ProxyError(code, str(exc.detail), status=exc.status_code, headers=dict(exc.headers or {}))
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Chat requests record their own failures (decision id, span); any other route still leaves a
        # metric and an audit line. The route template, never the raw path, labels the metric.
        log.exception("unexpected error on %s", request.url.path)
        template = next((getattr(r, "path", "other") for r in app.router.routes
                         if r.matches(request.scope)[0] == Match.FULL), "other")
        st.telemetry.metrics.observe_request(template, None, 500, 0.0, code="internal_error")
        if st.telemetry.audit is not None:
            with contextlib.suppress(OSError, ValueError):
                st.telemetry.audit.record({"event": "internal_error", "route": template, "status": 500,
                                           "error_code": "internal_error"})
        err = ProxyError("internal_error", "internal error; see the proxy log")
        return error_response(err)

    return app
