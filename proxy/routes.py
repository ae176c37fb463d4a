"""Informational routes: models, health, readiness, metrics, spend, feedback."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.body import read_json_body
from proxy.errors import ProxyError
from proxy.responses import error_response, json_response
from proxy.stores import StoreUnavailable
from rules.ceilings import escape_ident
from rules.cost import micro_to_usd_str

if TYPE_CHECKING:
    from proxy.state import AppState



async def list_models(request: Request) -> Response:
    """Only the models the caller's policies allow."""
    st: AppState = request.app.state.gp
    try:
        p = st.keys.principal(request.headers.get("authorization"))
    except ProxyError as e:
        return error_response(e)
    current = st.policies.current
    eff = current.for_principal(p.key_id, p.team, p.org) if current else None
    data = []
    for m in st.config.models:
        if eff is not None and any(not shadow and m.name not in allowed for _, shadow, allowed in eff.model_gates):
            continue
        data.append({"id": m.name, "object": "model", "created": 0, "owned_by": "guardproxy"})
    return json_response({"object": "list", "data": data})


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    st: AppState = request.app.state.gp
    store_ok = await st.store.ping()
    current = st.policies.current
    ready = store_ok and current is not None
    doc = {"status": "ready" if ready else "not_ready", "policy_revision": current.revision if current else None,
           "policies": list(p.name for p in current.policies) if current else [],
           "policy_errors": [str(e) for e in st.policies.last_errors],
           "store": {**st.store.describe(), "reachable": store_ok}}
    return json_response(doc, 200 if ready else 503)


async def metrics(request: Request) -> Response:
    st: AppState = request.app.state.gp
    try:
        counts = await st.store.approval_counts(now=time.time())
        st.telemetry.metrics.set_pending(counts.get("pending", 0))
    except StoreUnavailable:
        st.telemetry.metrics.store_error("approval_counts")
    body, ctype = st.telemetry.metrics.render(request.headers.get("accept"))
    return Response(body, media_type=ctype)


async def spend(request: Request) -> Response:
    """Settled spend per counter; admins see everything, a caller only its own key's counters."""
    st: AppState = request.app.state.gp
    auth = request.headers.get("authorization")
    try:
        if st.keys.is_admin(auth):
            prefix = request.query_params.get("prefix", "")
        else:
            p = st.keys.principal(auth)
            prefix = f"key:{escape_ident(p.key_id)}:"
        rows = await st.store.spend(prefix)
    except ProxyError as e:
        return error_response(e)
    except StoreUnavailable:
        return error_response(ProxyError("state_unavailable", "spend store unavailable"))
    out = [{"counter": k, "scope": k.split(":", 1)[0], "spend_usd": micro_to_usd_str(v)}
           for k, v in sorted(rows.items())]
    return json_response({"object": "list", "data": out})


FEEDBACK_TTL_S = 90 * 86400  # how long a verdict is remembered, so a later one replaces it


async def feedback(request: Request) -> Response:
    """``{decision_id, outcome: overridden|confirmed}``: a human's verdict on one of the caller's decisions.

    Accepted only for a decision issued to the caller's own key (any key's, for an admin key); any other
    id is ``404 decision_not_found``, the same answer whether it exists or not. One verdict per decision:
    a later one replaces the earlier, so the override ratio counts decisions, not posts.
    """
    st: AppState = request.app.state.gp
    srv = st.config.server
    auth = request.headers.get("authorization")
    try:
        admin = st.keys.is_admin(auth)
        sender = "admin" if admin else st.keys.principal(auth).key_id
        _, body = await read_json_body(request, 65536, max_depth=srv.max_body_depth,
                                       timeout_s=srv.body_read_timeout_s)
        did, outcome = body.get("decision_id"), body.get("outcome")
        if not isinstance(did, str) or not did:
            raise ProxyError("invalid_request", "decision_id must be a non-empty string", param="decision_id")
        if outcome not in ("overridden", "confirmed"):
            raise ProxyError("invalid_request", "outcome must be overridden or confirmed", param="outcome")
        owner = (st.decision_ids.owner(did, [k.id for k in st.config.keys]) if admin
                 else sender if st.decision_ids.issued_to(did, sender) else None)
        if owner is None:
            raise ProxyError("decision_not_found", "no such decision for this key", param="decision_id")
        previous = await st.store.feedback_set(did, outcome, sender, ttl_s=FEEDBACK_TTL_S)
    except ProxyError as e:
        return error_response(e)
    except StoreUnavailable:
        return error_response(ProxyError("state_unavailable", "feedback store unavailable"))
    st.telemetry.metrics.feedback(outcome, previous)
    if st.telemetry.audit is not None:
        st.telemetry.audit.record({"event": "feedback", "decision_id": did, "outcome": outcome,
                                   "previous": previous, "by": sender, "key": owner})
    return json_response({"ok": True, "decision_id": did, "outcome": outcome, "replaced": previous})


def info_routes() -> list[tuple[str, Callable[..., Any], list[str]]]:
    return [("/v1/models", list_models, ["GET"]), ("/healthz", healthz, ["GET"]), ("/readyz", readyz, ["GET"]),
            ("/metrics", metrics, ["GET"]), ("/v1/spend", spend, ["GET"]), ("/v1/feedback", feedback, ["POST"])]
