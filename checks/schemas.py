"""Validate a Kubernetes object against the schema the API server would use: unknown fields are errors.

Built-in kinds use kubernetes-validate's strict schemas for the cluster's
version. cilium.io/v2 kinds use the JSON Schemas of Cilium's own CRDs
(datreeio/CRDs-catalog, via checks.fixtures), which reject unknown fields
below ``spec``; the top level is closed here too, and ``metadata`` is checked
as the ObjectMeta every object has. A hand-written schema would only know the
fields we thought of.
"""

from __future__ import annotations

import functools
import json

import jsonschema
import kubernetes_validate
import regex

from checks.fixtures import cilium_crd_schema

CILIUM_API_VERSION = "cilium.io/v2"


class InvalidObject(ValueError):
    """The object would be rejected; the message names the object and the path of each problem."""


def validate_object(document: dict, kubernetes_version: str) -> None:
    """Raise InvalidObject unless ``document`` is valid, with no unknown field, for that Kubernetes version."""
    name = f"{document.get('kind')} {document.get('metadata', {}).get('name')}"
    if document.get("apiVersion", "").startswith("cilium.io/"):
        problems = _cilium_problems(document)
        # A custom resource's metadata is ObjectMeta, validated like a built-in object's.
        problems += _kubernetes_problems(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": document.get("metadata", {})}, kubernetes_version
        )
    else:
        problems = _kubernetes_problems(document, kubernetes_version)
    if problems:
        raise InvalidObject(f"{name}: " + "; ".join(problems))


def _kubernetes_problems(document: dict, kubernetes_version: str) -> list[str]:
    try:
        kubernetes_validate.validate(document, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return _describe(error)
    except kubernetes_validate.SchemaNotFoundError as error:
        return [error.message]
    return []


def _cilium_problems(document: dict) -> list[str]:
    if document["apiVersion"] != CILIUM_API_VERSION:
        return [f"no schema for {document['apiVersion']} (only {CILIUM_API_VERSION})"]
    validator = _cilium_validator(document["kind"])
    errors = sorted(validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    return [problem for error in errors for problem in _describe(error)]


@functools.cache
def _cilium_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads(cilium_crd_schema(kind).read_text())
    schema = {**schema, "additionalProperties": False}
    base = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return jsonschema.validators.extend(base, {"pattern": _go_pattern})(schema)


def _go_pattern(validator, pattern: str, instance, schema):
    """The API server matches CRD patterns with Go's regexp; Python's ``re`` cannot read some (``^\\PC*$``)."""
    if validator.is_type(instance, "string") and not regex.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _describe(error: jsonschema.ValidationError) -> list[str]:
    """``path: message``; an unknown field is named by its own path."""
    path = _path(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        unknown = [key for key in error.instance if key not in known]
        if unknown and not error.schema.get("patternProperties"):
            return [f"{_path([*error.absolute_path, key])}: unknown field" for key in unknown]
    return [f"{path or '(top level)'}: {error.message}"]


def _path(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text
