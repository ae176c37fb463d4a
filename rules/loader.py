"""Stage 1: policy text -> validated :class:`~rules.model.Policy` models.

The loader never touches the file system: the shell hands it ``(source, text)``
pairs. Every error is collected (not just the first) with file and line.
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
    policies: list[LoadedPolicy] = field(default_factory=list)
    errors: list[SourceError] = field(default_factory=list)


def parse_policy(text: str, source: str) -> tuple[LoadedPolicy | None, list[SourceError]]:
    """Parse and validate one policy document."""
    try:
        located = load_yaml(text, source)
    except YamlLoadError as exc:
        return None, exc.errors
    if not isinstance(located.data, dict):
        return None, [SourceError(source, 1, "", "a policy file must be a YAML mapping")]
    try:
        policy = Policy.model_validate(located.data)
    except ValidationError as exc:
        return None, pydantic_errors(exc, located)
    return LoadedPolicy(policy, located), []


def load_policies(documents: Iterable[tuple[str, str]]) -> LoadResult:
    """Parse every ``(source, text)``; names must be unique across the set."""
    result = LoadResult()
    seen: dict[str, str] = {}
    for source, text in documents:
        loaded, errors = parse_policy(text, source)
        result.errors.extend(errors)
        if loaded is None:
            continue
        name = loaded.policy.metadata.name
        if name in seen:
            result.errors.append(
                SourceError(source, loaded.located.line_of(("metadata", "name")), "metadata.name",
                            f"policy name {name!r} is already used by {seen[name]}")
            )
            continue
        seen[name] = source
        result.policies.append(loaded)
    return result
