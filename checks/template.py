"""A synthesized template's string properties as text, every token (a Ref, a GetAtt) shown as <TOKEN>:
the manifests, values and policies the stack hands its custom resources, read without a deploy."""

from __future__ import annotations

import json

TOKEN = "<TOKEN>"


def resolve_join(value) -> str:
    """A string property that holds tokens, with every token replaced by <TOKEN>."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(resolve_join(part) for part in parts)
    return TOKEN


def json_property(resource: dict, name: str, default: str | None = None):
    """A JSON property of a resource (its tokens as <TOKEN>)."""
    value = resource["Properties"].get(name, default) if default is not None else resource["Properties"][name]
    return json.loads(resolve_join(value))


def manifest_documents(resource: dict) -> list[dict]:
    return json_property(resource, "Manifest")
