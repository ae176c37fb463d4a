"""Approvals as Redis hash fields and back (the Redis store's record format)."""

from __future__ import annotations

from .base import APPROVAL_STATUSES, Approval

__all__ = ["approval_fields", "parse_approval"]


def approval_fields(a: Approval) -> dict[str, str]:
    out = {
        "id": a.id,
        "principal": a.principal,
        "team": a.team,
        "conversation": a.conversation,
        "tool": a.tool,
        "args_hash": a.args_hash,
        "rule_id": a.rule_id,
        "reason": a.reason,
        "created_at": repr(float(a.created_at)),
        "expires_at": repr(float(a.expires_at)),
        "status": a.status,
    }
    if a.note is not None:
        out["note"] = a.note
    if a.decided_by is not None:
        out["decided_by"] = a.decided_by
    if a.decided_at is not None:
        out["decided_at"] = repr(float(a.decided_at))
    return out


def parse_approval(raw: dict[bytes, bytes] | list[bytes]) -> Approval:
    if isinstance(raw, list):
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    d = {k.decode(): v.decode() for k, v in raw.items()}
    status = d["status"]
    if status not in APPROVAL_STATUSES:
        raise ValueError(f"corrupt approval status {status!r}")
    return Approval(
        id=d["id"],
        principal=d["principal"],
        team=d["team"],
        conversation=d["conversation"],
        tool=d["tool"],
        args_hash=d["args_hash"],
        rule_id=d["rule_id"],
        reason=d["reason"],
        created_at=float(d["created_at"]),
        expires_at=float(d["expires_at"]),
        status=status,  # narrowed to ApprovalStatus by the check above
        note=d.get("note"),
        decided_by=d.get("decided_by"),
        decided_at=float(d["decided_at"]) if "decided_at" in d else None,
    )
