"""The cost governor on the request path: price, estimate, ladder, reserve; then settle.

Every request gets a price and an estimate before it leaves (unpriced models are
refused), the downgrade/compression ladder is applied from how full the
tightest ceiling is, and the estimate is reserved atomically against every
ceiling. After the call the reservation is replaced by the real cost from
``usage``. The arithmetic lives in :mod:`rules.cost`; this module only does the
I/O around it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from proxy.config import Config
from proxy.errors import ProxyError
from proxy.pricing import Price, PriceBook
from proxy.stores import Ceiling, Store, StoreUnavailable
from proxy.tokens import TokenCounter
from rules.ceilings import ceilings_for
from rules.compress import compress_messages
from rules.cost import (
    BudgetLimit,
    EffectiveCost,
    actual_micro,
    check_per_request,
    compress_target,
    cost_micro,
    estimate_micro,
    fill_of,
    ladder_step,
    micro_to_usd_str,
)
from rules.evaluate import Principal

DEFAULT_OUTPUT_BOUND = 4096
_ID_TEXT_MAX = 65536
WOULD_REFUSE = "would_refuse:budget_exceeded"
PROMPT_SLACK = 256  # tokens a provider may add to a prompt beyond the proxy's own count
UNLIMITED = 2**52  # a tracking counter: spend is recorded where no ceiling limits it
TRACKED = EffectiveCost(per_conversation=UNLIMITED, budgets=(BudgetLimit("key", "day", None, UNLIMITED),
                                                             BudgetLimit("team", "day", None, UNLIMITED)))


def conversation_id(principal: Principal, body: dict[str, Any], header: str | None) -> str:
    """The agent's ``x-guardproxy-conversation-id``, else a hash of (principal, system prompt, first user turn)."""
    if header:
        return header[:128]
    system = first_user = ""
    for m in body.get("messages") or ():
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        if role in ("system", "developer") and not system:
            system = str(m.get("content"))
        elif role == "user":
            first_user = str(m.get("content"))
            break
    h = hashlib.sha256(f"{principal.key_id}\x00{_head(system)}\x00{_head(first_user)}".encode("utf-8", "surrogatepass"))
    return "auto-" + h.hexdigest()[:24]


def _head(text: str) -> str:
    """A long text stands for itself by its first 64 KiB and its length: hashing a 7 MB prompt in full on the
    event loop would cost more than the id is worth."""
    return text if len(text) <= _ID_TEXT_MAX else f"{text[:_ID_TEXT_MAX]}\x00{len(text)}"


@dataclass
class CostPlan:
    """What the governor decided for one request, and the reservation to settle."""

    price: Price
    model: str  # client-facing route name actually used (after downgrade)
    prompt_tokens: int
    estimate: int
    ceilings: list[Ceiling] = field(default_factory=list)
    output_bound: int = 0  # the output tokens the estimate reserved (max_tokens sent upstream, times n)
    would: list[str] = field(default_factory=list)  # what shadow cost limits would have done
    reservation_id: str | None = None
    downgraded_from: str | None = None
    compressed: tuple[int, int] | None = None
    degraded: bool = False
    actual: int = 0
    conversation_spend: int | None = None
    settled: bool = False


def _store_ceilings(specs: list[Any]) -> list[Ceiling]:
    return [Ceiling(s.key, s.limit, s.ttl_s, s.scope, s.window or "", s.reset_at) for s in specs]


class CostGovernor:
    """Owned by the app; one per process."""

    def __init__(self, config: Config, prices: PriceBook, tokens: TokenCounter, store: Store) -> None:
        self.config = config
        self.prices = prices
        self.tokens = tokens
        self.store = store

    def price_of(self, route_name: str) -> Price:
        route = self.config.route(route_name)
        names = [route_name] if route is None else [route.name, route.upstream, route.upstream_model]
        for n in names:
            p = self.prices.lookup(n)
            if p is not None:
                return p
        raise ProxyError("unpriced_model", f"model {route_name!r} has no price; set price: in its model route",
                         param="model")

    def _output_bound(self, body: dict[str, Any], price: Price, route_name: str) -> tuple[int, dict[str, Any]]:
        route = self.config.route(route_name)
        limit = (route.max_output_tokens if route else None) or price.max_output_tokens
        for name in ("max_completion_tokens", "max_tokens"):
            v = body.get(name)
            if isinstance(v, int) and not isinstance(v, bool):
                if limit is not None and v > limit:
                    return limit, {**body, name: limit}  # clamp to the model's own limit before reserving
                return v, body
        return limit or DEFAULT_OUTPUT_BOUND, body

    async def count_prompt(self, model: str, body: dict[str, Any]) -> int:
        """The proxy's own count of the prompt tokens of a request body (off the loop when large)."""
        return await self.tokens.count_request_async(model, body)

    async def admit(self, eff: EffectiveCost | None, principal: Principal, conversation: str, route_name: str,
                    body: dict[str, Any], *, fail_open: bool, now: float,
                    model_allowed: Callable[[str], bool] = lambda _m: True,
                    shadow: EffectiveCost | None = None) -> tuple[CostPlan, dict[str, Any]]:
        """Price and estimate; apply the ladder; reserve. Raises 403/429/503 ProxyErrors.

        ``shadow`` is what the limits would be with the shadow policies enforced: the request is judged
        against it too, and what it would have done lands in ``plan.would`` (``would_refuse:budget_exceeded``,
        ``would_downgraded:a->b``, ``would_compressed``). Its counters are charged like any other, so a
        shadow budget sees the real spend."""
        price = self.price_of(route_name)
        prompt = await self.count_prompt(route_name, body)
        when = datetime.fromtimestamp(now, UTC)
        owners = {"key_id": principal.key_id, "team": principal.team, "org": principal.org,
                  # conversation ids are chosen by clients: scope the counter to the key so two keys
                  # reusing one id never share (or see) each other's conversation spend
                  "conversation": f"{principal.key_id}/{conversation}", "now": when}
        specs = ceilings_for(eff, **owners) if eff else []  # type: ignore[arg-type]
        shadow_specs = ceilings_for(shadow, **owners) if shadow else []  # type: ignore[arg-type]
        # Spend is also tracked where no ceiling limits it: shadow budgets, and per key, team and
        # conversation for reporting.
        limited = {s.key for s in specs}
        for extra in (*shadow_specs, *ceilings_for(TRACKED, **owners)):  # type: ignore[arg-type]
            if extra.key not in limited:
                limited.add(extra.key)
                specs.append(replace(extra, limit=UNLIMITED))
        ceilings = _store_ceilings(specs)
        plan = CostPlan(price, route_name, prompt, 0, ceilings)
        if shadow is not None and (shadow.ladder or shadow.compress is not None):
            await self._shadow_ladder(shadow, shadow_specs, plan, now=now)
        if eff is not None and (eff.ladder or eff.compress is not None):
            body = await self._ladder(eff, plan, body, now=now, fail_open=fail_open, model_allowed=model_allowed)
        ceilings.append(Ceiling(f"model:{plan.model}:day:{when.date().isoformat()}", UNLIMITED, 2 * 86400,
                                "model", "day", None))
        bound, body = self._output_bound(body, plan.price, plan.model)
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            bound *= n  # every choice can use the whole output bound
        plan.output_bound = bound
        plan.estimate = estimate_micro(plan.prompt_tokens, bound, plan.price.input_per_mtok,
                                       plan.price.output_per_mtok)
        if eff is not None and not check_per_request(eff, plan.estimate):
            assert eff.per_request is not None
            raise _over("request", "", plan.estimate, eff.per_request, None, now)
        if shadow is not None and not check_per_request(shadow, plan.estimate):
            plan.would.append(WOULD_REFUSE)
        try:
            res = await self.store.reserve(ceilings, plan.estimate, now=now)
        except StoreUnavailable:
            if not fail_open:
                raise ProxyError("state_unavailable", "budget store unavailable; failing closed") from None
            plan.degraded = True
            return plan, body
        if not res.ok:
            failed = res.failed
            assert failed is not None
            raise _over(failed.scope, failed.window, res.spent, failed.limit, failed.reset_at, now)
        plan.reservation_id = res.reservation_id
        if WOULD_REFUSE not in plan.would and any(res.fills.get(c.key, 0) + plan.estimate > c.limit
                                                  for c in shadow_specs):
            plan.would.append(WOULD_REFUSE)
        conv_key = next(c.key for c in ceilings if c.scope == "conversation")
        plan.conversation_spend = res.fills.get(conv_key)
        return plan, body

    async def _shadow_ladder(self, shadow: EffectiveCost, specs: list[Any], plan: CostPlan, *, now: float) -> None:
        """What the ladder would do with the shadow limits in force (reported, never applied)."""
        try:
            used = await self.store.usage(_store_ceilings(specs), now=now) if specs else {}
        except StoreUnavailable:
            return
        step = ladder_step(shadow, fill_of((used.get(s.key, 0), s.limit) for s in specs))
        target = step.model_for(plan.model)
        if target != plan.model and self.config.route(target) is not None:
            plan.would.append(f"would_downgraded:{plan.model}->{target}")
        if compress_target(shadow, step, plan.prompt_tokens) is not None:
            plan.would.append("would_compressed")

    async def _ladder(self, eff: EffectiveCost, plan: CostPlan, body: dict[str, Any], *, now: float,
                      fail_open: bool, model_allowed: Callable[[str], bool]) -> dict[str, Any]:
        try:
            used = await self.store.usage(plan.ceilings, now=now)
        except StoreUnavailable:
            if not fail_open:
                raise ProxyError("state_unavailable", "budget store unavailable; failing closed") from None
            used = {}
        fill = fill_of((used.get(c.key, 0), c.limit) for c in plan.ceilings if c.limit < UNLIMITED)
        step = ladder_step(eff, fill)
        target_model = step.model_for(plan.model)
        # A downgrade only goes to a configured route that every enforcing policy also allows.
        if target_model != plan.model and self.config.route(target_model) is not None and model_allowed(target_model):
            plan.downgraded_from = plan.model
            plan.model = target_model
            plan.price = self.price_of(target_model)
            body = {**body, "model": target_model}
        target = compress_target(eff, step, plan.prompt_tokens)
        if target is not None:
            enc_model = plan.model
            enc = self.tokens
            result = compress_messages(list(body.get("messages") or []), target,
                                       lambda m: enc.count_messages(enc_model, [m]))
            if result.dropped:
                body = {**body, "messages": result.messages}
                before = plan.prompt_tokens
                plan.prompt_tokens = await self.count_prompt(plan.model, body)
                plan.compressed = (before, plan.prompt_tokens)
        return body

    @staticmethod
    def bound_usage(plan: CostPlan, usage: dict[str, Any], prompt_tokens: int) -> tuple[dict[str, Any], bool]:
        """``usage`` with counts the upstream cannot have used capped: completion tokens at the output bound
        the proxy sent (``max_tokens``, times ``n``), prompt tokens at twice the proxy's own count (at least
        the count plus :data:`PROMPT_SLACK`: providers add a few tokens of their own for tools and formats).
        One bad answer can then never charge more than about twice what was reserved. Returns (usage, capped)."""
        out = dict(usage)
        capped = False
        prompt_cap = max(2 * prompt_tokens, prompt_tokens + PROMPT_SLACK)
        for name, cap in (("completion_tokens", plan.output_bound), ("prompt_tokens", prompt_cap)):
            v = out.get(name)
            if isinstance(v, int) and cap and v > cap:
                out[name], capped = cap, True
        if capped:
            out["total_tokens"] = int(out.get("prompt_tokens") or 0) + int(out.get("completion_tokens") or 0)
            details = out.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                out["prompt_tokens_details"] = {**details,
                                                "cached_tokens": min(details["cached_tokens"], out["prompt_tokens"])}
        return out, capped

    async def settle(self, plan: CostPlan, usage: dict[str, Any] | None, *, streamed_text: str = "",
                     extra_output_tokens: int = 0, now: float) -> None:
        """Replace the reservation by the real cost (idempotent). Without usage, charge input + output so far."""
        if plan.settled:
            return
        plan.settled = True
        p = plan.price
        if usage:
            try:
                plan.actual = actual_micro(usage, p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok)
            except ValueError:
                plan.actual = plan.estimate  # malformed usage (negative, bool): bill the bound, never zero
        else:
            out_tokens = await self.tokens.count_text_async(plan.model, streamed_text) if streamed_text else 0
            out_tokens += extra_output_tokens
            plan.actual = cost_micro(plan.prompt_tokens, p.input_per_mtok) + cost_micro(out_tokens,
                                                                                      p.output_per_mtok)
        if plan.reservation_id is None and plan.degraded:
            return
        try:
            await self.store.settle(plan.reservation_id or "", plan.ceilings, plan.actual, now=now)
        except StoreUnavailable:
            plan.degraded = True  # the reservation expires by itself; nothing leaks
            return
        if plan.conversation_spend is not None:
            plan.conversation_spend += plan.actual

    async def release(self, plan: CostPlan, *, now: float) -> None:
        """Upstream billed nothing (it failed before answering): drop the reservation."""
        if plan.settled or plan.reservation_id is None:
            plan.settled = True
            return
        plan.settled = True
        try:
            await self.store.release(plan.reservation_id, plan.ceilings, now=now)
        except StoreUnavailable:
            plan.degraded = True


def _over(scope: str, window: str, spent: int, limit: int, reset_at: float | None, now: float) -> ProxyError:
    when = datetime.fromtimestamp(reset_at, UTC).isoformat() if reset_at else None
    what = f"{scope} budget" + (f" ({window})" if window else "")
    msg = (f"{what} exceeded: spent ${micro_to_usd_str(spent)} of ${micro_to_usd_str(limit)}"
           + (f"; resets at {when}" if when else ""))
    headers = {"retry-after": str(max(1, int(reset_at - now + 0.999)))} if reset_at else {}
    extra = {"budget": {"scope": scope, "window": window or None, "spent_usd": micro_to_usd_str(spent),
                        "limit_usd": micro_to_usd_str(limit), "reset_at": when}}
    return ProxyError("budget_exceeded", msg, headers=headers, extra=extra)
