"""The ``services`` declaration as cdk.json gives it: checked into MeshService (traffic.py) with pydantic,
one line per mistake, and published as a JSON Schema so an editor completes cdk.json.

pydantic checks the types, strictly (a string is not a number, a number not a string) and every key
(an unknown one is a mistake); MeshService's own checks do the rest, the same for a declaration
written in Python. The Lambda never imports this file (pydantic is not in its package).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from .manifests import SAMPLE_DECLARATION_FILE, load_documents
from .rollout_plan import RolloutError, RolloutLoad, RolloutSettings
from . import traffic
from .traffic import DeclarationError, MeshService

# What one deploy carries: every service adds a manifest, a rollout resource and rule groups, and the
# stack must stay within CloudFormation's 500 resources and AMP's rules (tools.bench_synth measures both).
MAX_SERVICES = 40

# A key no dataclass has is a mistake (a typo), at every depth: pydantic reads each dataclass's own
# config, set here so that traffic.py and rollout_plan.py stay free of pydantic (the Lambda imports them).
for _dataclass in (*(c for c in vars(traffic).values() if isinstance(c, type) and dataclasses.is_dataclass(c)),
                   RolloutSettings, RolloutLoad):  # fmt: skip
    _dataclass.__pydantic_config__ = ConfigDict(extra="forbid")
_ADAPTER = TypeAdapter(MeshService)


class ServicesError(ValueError):
    """One line: the declaration's path, what is wrong."""


def _entry_label(entry: Any, index: int) -> str:
    name = entry.get("name") if isinstance(entry, Mapping) else None
    return name if isinstance(name, str) and name else str(index)


def _path(loc: Sequence, value: Any) -> str:
    """pydantic's error location as the declaration's path (``routes[1].to``), without the tags it adds
    for the members of a union."""
    parts, current = [], value
    for part in loc:
        if isinstance(current, Mapping) and part in current:
            parts.append(f".{part}")
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and part < len(current):
            parts.append(f"[{part}]")
            current = current[part]
        elif isinstance(part, str) and not isinstance(current, (Mapping, list)):
            continue  # a union member's tag, e.g. 'bool' or 'tuple[str, ...]'
        elif isinstance(part, str) and re.fullmatch(r"[a-z_]+", part) and isinstance(current, Mapping):
            parts.append(f".{part}")  # a key left out
            current = None
    return "".join(parts).lstrip(".")


def service(entry: Any, index: int, prefix: str = "services") -> MeshService:
    """One entry of ``services`` as a MeshService, or ServicesError with its one line."""
    where = f"{prefix}[{_entry_label(entry, index)}]"
    if not isinstance(entry, Mapping):
        raise ServicesError(f"{where}: must be an object with name, namespace, port and versions")
    entry = dict(entry)
    rollout = entry.pop("rollout", None)
    try:
        declared = _ADAPTER.validate_json(json.dumps(entry), strict=True)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        if first["type"] == "value_error":
            raise ServicesError(str(first["ctx"]["error"])) from None
        path = _path(first["loc"], entry)
        shown = "" if first["type"] in ("missing", "unexpected_keyword_argument") else f" (got {json.dumps(first['input'])[:60]})"
        message = {"missing": "missing", "unexpected_keyword_argument": "not a setting here (a typo?)"}.get(first["type"], first["msg"])
        raise ServicesError(f"{where}.{path}: {message}{shown}") from None
    if rollout is None:
        return declared
    if not isinstance(rollout, Mapping):
        raise ServicesError(f"{where}.rollout: must be null or an object like {{\"steps\": [10, 50, 100], \"pause_s\": 300}}")
    try:
        settings = RolloutSettings.from_mapping(rollout)
    except (RolloutError, TypeError) as error:
        raise ServicesError(f"{where}.rollout: {error}") from None
    try:
        return dataclasses.replace(declared, rollout=settings)
    except DeclarationError as error:  # what only the rollout and the rest together show
        raise ServicesError(str(error)) from None


def services(value: Any, prefix: str = "services") -> tuple[MeshService, ...]:
    """The ``services`` list: each entry checked, then what only the list shows (a Service declared twice,
    more than a deploy carries)."""
    if not isinstance(value, list):
        raise ServicesError(f"{prefix}: must be a list of services (name, namespace, port, versions, ...)")
    check_count(len(value), prefix)
    declared = [service(entry, i, prefix) for i, entry in enumerate(value)]
    check_list(declared, prefix)
    return tuple(declared)


def check_count(count: int, prefix: str = "services") -> None:
    if count > MAX_SERVICES:
        raise ServicesError(f"{prefix}: {count} services, more than the {MAX_SERVICES} one deploy carries"
                            " (CloudFormation's 500 resources, AMP's rules); split them across stacks")  # fmt: skip


def check_list(declared: Sequence[MeshService], prefix: str = "services") -> None:
    """No more than a deploy carries; one CiliumEnvoyConfig per Service: Cilium 1.18/1.19 keeps one L7
    redirect per Service (cilium#45949), a second config silently wins; and one set of version Services per name."""
    check_count(len(declared), prefix)
    seen: dict[str, str] = {}
    for s in declared:
        for name in (s.name, *(s.version_service(v) for v in s.versions)):
            key = f"{s.namespace}/{name}"
            if key in seen:
                raise ServicesError(f"{prefix}[{s.name}]: {key} is also declared by services[{seen[key]}]; declare each Service once")
            seen[key] = s.name


def sample_service(weights: Mapping[str, int] | None = None, rollout: RolloutSettings | None = None) -> MeshService:
    """The sample app's catalogdetail, as manifests/app/mesh-services.yaml declares it (weights and rollout
    from the sample's own keys when given)."""
    (document,) = load_documents(SAMPLE_DECLARATION_FILE)
    (declared,) = services(document["services"], prefix="sample")
    changes = {k: v for k, v in (("weights", weights), ("rollout", rollout)) if v is not None}
    return dataclasses.replace(declared, **changes) if changes else declared


# --- JSON Schema ---------------------------------------------------------------------------------

def _field_docs(cls) -> dict[str, str]:
    """``name: text`` lines of a dataclass's docstring (continued by deeper-indented lines)."""
    docs, current = {}, None
    for line in (cls.__doc__ or "").splitlines():
        match = re.match(r"\s{4}([a-z_0-9, /]+):\s+(.*)", line)
        if match:
            current = [n.strip() for n in re.split(r"[,/]", match.group(1)) if n.strip()]
            for name in current:
                docs[name] = match.group(2).strip()
        elif current and line.startswith(" " * 8) and line.strip():
            for name in current:
                docs[name] += " " + line.strip()
        else:
            current = None
    return docs


def _describe(schema: dict, defs: dict) -> None:
    classes = {c.__name__: c for c in (*(getattr(traffic, n) for n in dir(traffic)), RolloutSettings, RolloutLoad)
               if isinstance(c, type) and dataclasses.is_dataclass(c)}  # fmt: skip
    for name, definition in defs.items():
        docs = _field_docs(classes[name]) if name in classes else {}
        for key, prop in definition.get("properties", {}).items():
            if key in docs:
                prop["description"] = docs[key]


def services_schema() -> dict:
    """The JSON Schema of ``services``: MeshService's, with the rollout's settings as the rollout key reads them."""
    schema = TypeAdapter(list[MeshService]).json_schema()
    defs = schema["$defs"]
    rollout = TypeAdapter(RolloutSettings).json_schema()
    defs.update(rollout.pop("$defs", {}))
    rollout["properties"].pop("min_pause_s")
    defs["RolloutSettings"] = rollout
    _describe(schema, defs)
    return schema
