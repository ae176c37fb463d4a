"""Policy documents and compiled sets for the in-process ``rules/`` tests."""

from __future__ import annotations

from rules.compiler import CompiledPolicySet, compile_policies
from rules.loader import load_policies
from rules.yamlsrc import SourceError


def policy(name: str, body: str = "", match: str = "{all: true}", mode: str = "enforce") -> str:
    """A policy file's text: the header fields, then ``body`` (YAML) as written."""
    return (f"apiVersion: guardproxy/v1\nkind: Policy\nmetadata: {{name: {name}}}\nmatch: {match}\n"
            f"mode: {mode}\n{body}")


def compile_docs(*docs: str) -> tuple[CompiledPolicySet | None, list[SourceError]]:
    """Load (which must succeed) and compile; ``docs`` are named ``0.yaml``, ``1.yaml``, ..."""
    loaded = load_policies([(f"{i}.yaml", d) for i, d in enumerate(docs)])
    assert loaded.errors == [], loaded.errors
    return compile_policies(loaded.policies)


def compiled(*docs: str) -> CompiledPolicySet:
    """A set that must compile without errors."""
    cps, errors = compile_docs(*docs)
    assert errors == [] and cps is not None
    return cps
