"""Admin routes (admin key only): policy reload and human approvals."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.body import read_raw
from proxy.errors import ProxyError
from proxy.responses import error_response, json_response
from proxy.stores import StoreUnavailable
from rules.strictjson import StrictJSONError, loads_strict

if TYPE_CHECKING:
    from proxy.state import AppState



async def reload_policies(request: Request) -> Response:
    st: AppState = request.app.state.gp
    try:
        st.keys.require_admin(request.headers.get("authorization"))
    except ProxyError as e:
        return error_response(e)
    ok, errors = await st.policies.reload()
    current = st.policies.current
    return json_response({"reloaded": ok, "policy_revision": current.revision if current else None,
                  "errors": [str(e) for e in errors]}, 200 if ok else 422)


async def list_approvals(request: Request) -> Response:
    st: AppState = request.app.state.gp
    try:
        st.keys.require_admin(request.headers.get("authorization"))
        items = await st.store.approval_list(request.query_params.get("status"), now=time.time())
    except ProxyError as e:
        return error_response(e)
    except StoreUnavailable:
        return error_response(ProxyError("state_unavailable", "approval store unavailable"))
    return json_response({"object": "list", "data": [dataclasses.asdict(a) for a in items]})


async def _decide(request: Request, approve: bool) -> Response:
    st: AppState = request.app.state.gp
    try:
        st.keys.require_admin(request.headers.get("authorization"))
        srv = st.config.server
        raw = await read_raw(request, 65536, timeout_s=srv.body_read_timeout_s)
        note = None
        if raw.strip():
            try:
                doc = loads_strict(raw, max_depth=srv.max_body_depth, max_bytes=65536)
            except StrictJSONError as exc:
                raise ProxyError("invalid_json", f"body must be JSON like {{\"note\": \"...\"}}: {exc}") from None
            note = doc.get("note") if isinstance(doc, dict) else None
            if note is not None and not isinstance(note, str):
                raise ProxyError("invalid_request", "note must be a string", param="note")
        approval_id = request.path_params["approval_id"]
        decided = await st.store.approval_decide(approval_id, approve, note, "admin", now=time.time())
    except ProxyError as e:
        return error_response(e)
    except StoreUnavailable:
        return error_response(ProxyError("state_unavailable", "approval store unavailable"))
    a = decided.approval
    if a is None:
        return error_response(ProxyError("not_found", f"no approval {approval_id!r}"))
    # Only the call that made the transition answers 200 and is counted: a repeat, or the losers of a race,
    # get 409 even when the approval ended up in the state they asked for.
    if not decided.changed:
        return error_response(ProxyError("approval_not_pending", f"approval is {a.status}, not pending"))
    expected = "approved" if approve else "rejected"
    st.telemetry.metrics.approval(expected)
    if st.telemetry.audit is not None:
        st.telemetry.audit.record({"event": "approval", "approval_id": a.id, "outcome": expected,
                                   "rule_id": a.rule_id, "tool": a.tool, "principal": a.principal})
    return json_response(dataclasses.asdict(a))


async def approve(request: Request) -> Response:
    return await _decide(request, True)


async def reject(request: Request) -> Response:
    return await _decide(request, False)


def admin_routes() -> list[tuple[str, Callable[..., Any], list[str]]]:
    return [("/admin/reload", reload_policies, ["POST"]), ("/admin/approvals", list_approvals, ["GET"]),
            ("/admin/approvals/{approval_id}/approve", approve, ["POST"]),
            ("/admin/approvals/{approval_id}/reject", reject, ["POST"])]
