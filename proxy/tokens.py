"""Prompt token counting with tiktoken, offline, cached per message.

Encodings load offline from the copies litellm bundles in ``litellm_core_utils/tokenizers`` (tiktoken's
cache layout: files named by the sha1 of the download URL). ``TIKTOKEN_CACHE_DIR`` is pointed there
before tiktoken first loads an encoding, unless the operator already set it.

Model -> encoding: ``o200k_base`` for the gpt-4o / gpt-4.1 / gpt-4.5 / gpt-5 / o1 / o3 / o4 families,
``cl100k_base`` for gpt-4 / gpt-3.5 and for every other model. Non-OpenAI models (Claude, Gemini,
Llama, ...) are therefore counted with cl100k as an approximation; exact vendor counting (litellm's
``token_counter``) would be a separate, opt-in path because importing litellm costs seconds.

Message accounting follows OpenAI's published recipe: 3 tokens per message, the tokens of the role,
of the content and of ``name`` (+1), and 3 tokens priming the reply. Content may be a string or a list
of parts (text and refusal parts are tokenized; every other part, e.g. an image, counts a fixed 85
tokens). Assistant ``tool_calls`` (and legacy ``function_call``) count their function name and
arguments. Agents resend the whole history every turn, so each message's count is cached in a bounded
LRU keyed by (encoding, hash of the message's canonical JSON): a turn tokenizes only its new messages.

Everything else in the request that the model reads is counted too (tools, legacy ``functions``,
``response_format`` schemas, ``tool_choice``, ``prediction``...): each top-level field except the
messages, sampling scalars and pure bookkeeping (``metadata``, ``user``, ``stream_options``...) counts as
the tokens of its canonical JSON. Images count their high-detail bound unless they ask for ``detail: low``.

Nothing blocks the event loop: :meth:`TokenCounter.count_request_async` counts the uncached part of a
request inline only when it is small, else in the counter's own worker thread (tiktoken releases the GIL
while it encodes), so a 7 MB prompt is counted while other requests are served. The cache is guarded by a
lock so the worker thread and the loop can share it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import orjson

from proxy.pricing import litellm_package_dir

if TYPE_CHECKING:
    import tiktoken

O200K = "o200k_base"
CL100K = "cl100k_base"
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
NON_TEXT_PART_TOKENS = 85
IMAGE_LOW_TOKENS = 85
IMAGE_HIGH_TOKENS = 1445  # 85 + 170 per 512 px tile, at most 8 tiles once scaled to fit 768 x 2048
_PIECE_CHARS = 65536  # long texts are encoded in pieces of at most this many characters
_KEY_TEXT_MAX = 4096  # longer message texts are cache-keyed by digest
INLINE_CHARS = 16_384  # uncached text above this is counted in the worker thread
# Top-level request fields the model does not read (or that are scalars counted nowhere).
NOT_PROMPT = frozenset({"messages", "model", "metadata", "user", "stream", "stream_options", "store",
                        "service_tier", "prompt_cache_key", "safety_identifier", "tools"})

# checked in order, so "gpt-4o" is tried before "gpt-4"
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("gpt-4o", O200K),
    ("chatgpt-4o", O200K),
    ("gpt-4.1", O200K),
    ("gpt-4.5", O200K),
    ("gpt-5", O200K),
    ("o1", O200K),
    ("o3", O200K),
    ("o4", O200K),
    ("gpt-4", CL100K),
    ("gpt-3.5", CL100K),
    ("text-embedding-3", CL100K),
    ("text-embedding-ada-002", CL100K),
)


def configure_offline_encodings() -> None:
    """Point tiktoken at litellm's bundled encoding files unless ``TIKTOKEN_CACHE_DIR`` is already set."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return
    pkg = litellm_package_dir()
    if pkg is not None:
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(pkg, "litellm_core_utils", "tokenizers")


def encoding_for(model: str) -> str:
    """tiktoken encoding name used for ``model`` (provider prefixes like ``openai/`` are ignored)."""
    base = model.rsplit("/", 1)[-1].lower()
    for prefix, enc in _PREFIXES:
        # "o1" must not match "o1x-something", but must match "o1" and "o1-mini"
        if base == prefix or base.startswith(prefix + "-") or (len(prefix) > 2 and base.startswith(prefix)):
            return enc
    return CL100K


def _digest(obj: Any) -> bytes:
    return hashlib.blake2b(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


def _message_key(message: Mapping[str, Any]) -> Any:
    """The cache key of a message: the common ``{role, content: str}`` shape keys by its strings directly
    (hashing a str is far cheaper than serialising and digesting it: long histories are mostly these);
    anything else by a digest of its canonical JSON. Long strings are keyed by their digest too, so the
    cache never holds megabytes of prompt text as keys."""
    if len(message) == 2:
        role, content = message.get("role"), message.get("content")
        if isinstance(role, str) and isinstance(content, str):
            if len(content) <= _KEY_TEXT_MAX:
                return (role, content)
            # str's own 64-bit hash (keyed per process, computed once per string): a long text is not
            # encoded and digested again on the event loop, and the cache never holds it as a key.
            return (role, len(content), hash(content))
    return _digest(message)


class TokenCounter:
    """Counts prompt tokens; owns its encoders and LRU caches (one instance per app).

    ``encode_calls`` counts calls into tiktoken, ``cache_hits`` / ``cache_misses`` the per-message and
    per-tool cache lookups; both exist so tests and metrics can see the cache working. The cache and the
    counters are guarded by a lock: the loop and the counter's worker thread share them.
    """

    def __init__(self, *, max_cached: int = 65_536) -> None:
        configure_offline_encodings()
        self._max_cached = max_cached
        self._encoders: dict[str, tiktoken.Encoding] = {}
        self._cache: OrderedDict[tuple[str, Any], int] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self.encode_calls = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.offloaded = 0  # requests counted in the worker thread

    def encoder(self, encoding: str) -> tiktoken.Encoding:
        """The tiktoken encoder for an encoding name, loaded on first use."""
        enc = self._encoders.get(encoding)
        if enc is None:
            import tiktoken  # deferred so TIKTOKEN_CACHE_DIR is in place before any encoding loads

            with self._lock:
                enc = self._encoders.get(encoding) or tiktoken.get_encoding(encoding)
                self._encoders[encoding] = enc
        return enc

    def warm(self, encodings: tuple[str, ...] = (O200K, CL100K)) -> None:
        """Load encoders ahead of the first request (each costs ~100 ms to build)."""
        for name in encodings:
            self.encoder(name)

    def _encode_len(self, encoding: str, text: str) -> int:
        if not text:
            return 0
        with self._lock:
            self.encode_calls += 1
        # encode_ordinary: user text containing "<|endoftext|>" is just text, not an error
        enc = self.encoder(encoding)
        if len(text) <= _PIECE_CHARS:
            return len(enc.encode_ordinary(text))
        # tiktoken releases the GIL while it encodes but not while it builds the list of token ids (5 million
        # ints for a 7 MB prompt, ~150 ms): count long text in pieces, cut at a space where there is one, so
        # no single call holds the interpreter for long. A cut can split one token in two: at most one
        # extra token per piece, an over-count, never an under-count.
        n, start = 0, 0
        while start < len(text):
            end = min(len(text), start + _PIECE_CHARS)
            if end < len(text):
                space = text.rfind(" ", start + _PIECE_CHARS // 2, end)
                end = space if space > start else end
            n += len(enc.encode_ordinary(text[start:end]))
            start = end
        return n

    def _cached(self, key: tuple[str, Any]) -> int | None:
        with self._lock:
            n = self._cache.get(key)
            if n is None:
                self.cache_misses += 1
                return None
            self.cache_hits += 1
            self._cache.move_to_end(key)
            return n

    def _store(self, key: tuple[str, Any], n: int) -> None:
        with self._lock:
            self._cache[key] = n
            if len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)

    def cache_size(self) -> int:
        """Number of cached message/tool counts."""
        return len(self._cache)

    def count_text(self, model: str, s: str) -> int:
        """Tokens of a bare string under ``model``'s encoding (not cached)."""
        return self._encode_len(encoding_for(model), s)

    def _content_tokens(self, encoding: str, content: Any) -> int:
        if content is None:
            return 0
        if isinstance(content, str):
            return self._encode_len(encoding, content)
        if isinstance(content, list):
            n = 0
            for part in content:
                if isinstance(part, Mapping) and part.get("type") in ("text", "refusal"):
                    text = part.get(part["type"])
                    n += self._encode_len(encoding, text if isinstance(text, str) else "")
                elif isinstance(part, str):
                    n += self._encode_len(encoding, part)
                else:
                    n += self._part_tokens(encoding, part)
            return n
        return self._encode_len(encoding, orjson.dumps(content).decode())

    def _part_tokens(self, encoding: str, part: Any) -> int:
        """A non-text content part: images by their detail bound, anything else (audio, files) by the
        tokens of its JSON, so a large payload can never pass as a few tokens."""
        if isinstance(part, Mapping) and part.get("type") == "image_url":
            image = part.get("image_url")
            low = isinstance(image, Mapping) and image.get("detail") == "low"
            return IMAGE_LOW_TOKENS if low else IMAGE_HIGH_TOKENS
        return max(NON_TEXT_PART_TOKENS, self._encode_len(encoding, orjson.dumps(part).decode()))

    def _call_tokens(self, encoding: str, call: Any) -> int:
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping):
            return 0
        n = 0
        for field in ("name", "arguments"):
            v = fn.get(field)
            if isinstance(v, str):
                n += self._encode_len(encoding, v)
            elif v is not None:
                n += self._encode_len(encoding, orjson.dumps(v).decode())
        return n

    def message_tokens(self, encoding: str, message: Mapping[str, Any], key: Any = None) -> int:
        """One message's tokens (without the reply priming); cached by content hash (``key``: the
        message's cache key, when the caller already has it)."""
        key = (encoding, _message_key(message)) if key is None else key
        hit = self._cached(key)
        if hit is not None:
            return hit
        n = TOKENS_PER_MESSAGE
        role = message.get("role")
        if isinstance(role, str):
            n += self._encode_len(encoding, role)
        n += self._content_tokens(encoding, message.get("content"))
        name = message.get("name")
        if isinstance(name, str):
            n += self._encode_len(encoding, name) + TOKENS_PER_NAME
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            n += sum(self._call_tokens(encoding, c) for c in calls)
        if message.get("function_call") is not None:
            n += self._call_tokens(encoding, message["function_call"])
        self._store(key, n)
        return n

    def count_messages(self, model: str, messages: list[dict[str, Any]], keys: list[Any] | None = None) -> int:
        """Prompt tokens of a chat history under OpenAI's accounting (including the 3 priming tokens);
        ``keys``: the messages' cache keys, when the caller already has them."""
        encoding = encoding_for(model)
        if keys is None:
            return REPLY_PRIMING + sum(self.message_tokens(encoding, m) for m in messages)
        return REPLY_PRIMING + sum(self.message_tokens(encoding, m, k) for m, k in zip(messages, keys, strict=True))

    def count_tools(self, model: str, tools: list[dict[str, Any]] | None) -> int:
        """Tokens of the tool definitions, as their canonical (sorted-key) JSON; each tool cached by hash."""
        if not tools:
            return 0
        encoding = encoding_for(model)
        return sum(self._item_tokens(key, canonical, encoding)
                   for key, canonical in self._extras(encoding, {"tools": list(tools)}))

    # -- whole requests, off the loop when large ----------------------------------------------------
    @staticmethod
    def _extras(encoding: str, body: Mapping[str, Any]) -> list[tuple[tuple[str, Any], bytes]]:
        """Everything besides messages the model reads, as (cache key, canonical JSON): tools one by one,
        then each other prompt field."""
        items: list[Any] = list(body.get("tools") or ()) if isinstance(body.get("tools"), list) else []
        items.extend({k: v} for k, v in body.items()
                     if k not in NOT_PROMPT and v is not None and not isinstance(v, bool | int | float))
        out = []
        for item in items:
            canonical = orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
            out.append(((encoding, b"tool:" + hashlib.blake2b(canonical, digest_size=16).digest()), canonical))
        return out

    def _item_tokens(self, key: tuple[str, Any], canonical: bytes, encoding: str) -> int:
        """Tokens of one tool or request field as its canonical JSON, cached by the JSON's digest."""
        n = self._cached(key)
        if n is None:
            n = self._encode_len(encoding, canonical.decode())
            self._store(key, n)
        return n

    def count_request(self, model: str, body: Mapping[str, Any],
                      extras: list[tuple[tuple[str, Any], bytes]] | None = None,
                      keys: list[Any] | None = None) -> int:
        """Prompt tokens of a whole request body: messages plus every other field the model reads
        (``extras``: :meth:`_extras` of the body, ``keys``: the messages' cache keys, when the caller
        already has them)."""
        messages = body.get("messages")
        total = self.count_messages(model, messages if isinstance(messages, list) else [], keys)
        encoding = encoding_for(model)
        items = self._extras(encoding, body) if extras is None else extras
        return total + sum(self._item_tokens(key, canonical, encoding) for key, canonical in items)

    async def count_request_async(self, model: str, body: Mapping[str, Any]) -> int:
        """:meth:`count_request`, with the uncached part counted in the worker thread when it is large."""
        encoding = encoding_for(model)
        messages = body.get("messages")
        messages = messages if isinstance(messages, list) else []
        # Each message's cache key is computed once, here, and handed on to the count.
        keys = [(encoding, _message_key(m)) if isinstance(m, Mapping) else None for m in messages]
        extras = self._extras(encoding, body)
        with self._lock:
            new_messages = [m for m, k in zip(messages, keys, strict=True) if k is not None and k not in self._cache]
            pending = sum(len(canonical) for key, canonical in extras if key not in self._cache)
        pending += sum(len(c) if isinstance(c := m.get("content"), str) else len(orjson.dumps(m))
                       for m in new_messages)
        if pending <= INLINE_CHARS:
            return self.count_request(model, body, extras, keys)
        self.offloaded += 1
        return await asyncio.get_running_loop().run_in_executor(self._worker(), self.count_request, model, body,
                                                                extras, keys)

    async def count_text_async(self, model: str, text: str) -> int:
        """:meth:`count_text`, in the worker thread when the text is large."""
        if len(text) <= INLINE_CHARS:
            return self.count_text(model, text)
        return await asyncio.get_running_loop().run_in_executor(self._worker(), self.count_text, model, text)

    def _worker(self) -> ThreadPoolExecutor:
        # One thread: large counts queue behind each other instead of taking every core from the loop.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardproxy-tokens")
        return self._executor

    def close(self) -> None:
        """Stop the worker thread (app shutdown)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
