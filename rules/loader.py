"""Stage 1: policy text -> validated :class:`~rules.model.Policy` models.

The loader never touches the file system: the shell hands it ``(source, text)``
pairs. Every error is collected (not just the first) with file and line, and a
failure of one document never stops the others: whatever goes wrong becomes a
located error for that document. Documents that parsed but will not be compiled
are handed back (``rejected``) so a later stage can still look inside them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import ValidationError

from rules.model import Policy
from rules.yamlsrc import Located, SourceError, YamlLoadError, load_yaml, pydantic_errors


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy with the location map of the file it came from."""

    policy: Policy
    located: Located


@dataclass
class LoadResult:
    """Validated policies, every error, and the parsed documents that will not be compiled."""

    policies: list[LoadedPolicy] = field(default_factory=list)
    errors: list[SourceError] = field(default_factory=list)
    # YAML mappings that failed validation (or whose policy name is taken): the shell runs the
    # compile-stage precheck over them, so one run also reports their CEL, regex and schema errors.
    rejected: list[Located] = field(default_factory=list)


def _parse(text: str, source: str) -> tuple[LoadedPolicy | None, Located | None, list[SourceError]]:
    early: list[SourceError] = []
    try:
        located = load_yaml(text, source)
    except YamlLoadError as exc:
        if exc.located is None or not isinstance(exc.located.data, dict):
            return None, None, exc.errors
        # A duplicate key or a bad tag: validate anyway, so its other errors show up in the same run.
        early, located = exc.errors, exc.located
    if not isinstance(located.data, dict):
        return None, None, [SourceError(source, 1, "", "a policy file must be a YAML mapping")]
    try:
        policy = Policy.model_validate(located.data)
    except ValidationError as exc:
        return None, located, early + pydantic_errors(exc, located)
    if early:
        return None, located, early
    return LoadedPolicy(policy, located), None, []


def parse_policy(text: str, source: str) -> tuple[LoadedPolicy | None, list[SourceError]]:
    """Parse and validate one policy document."""
    loaded, _, errors = _parse(text, source)
    return loaded, errors


def load_policies(documents: Iterable[tuple[str, str]]) -> LoadResult:
    """Parse every ``(source, text)``; names must be unique across the set."""
    result = LoadResult()
    seen: dict[str, str] = {}
    for source, text in documents:
        try:
            loaded, rejected, errors = _parse(text, source)
        except Exception as exc:  # one broken document must not hide the others' errors
            loaded, rejected, errors = None, None, [SourceError(source, None, "", f"cannot load: {_describe(exc)}")]
        result.errors.extend(errors)
        if rejected is not None:
            result.rejected.append(rejected)
        if loaded is None:
            continue
        name = loaded.policy.metadata.name
        if name in seen:
            result.errors.append(
                SourceError(source, loaded.located.line_of(("metadata", "name")), "metadata.name",
                            f"policy name {name!r} is already used by {seen[name]}")
            )
            result.rejected.append(loaded.located)
            continue
        seen[name] = source
        result.policies.append(loaded)
    return result


def _describe(exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
