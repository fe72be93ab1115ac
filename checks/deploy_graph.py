"""The order CloudFormation deploys and destroys a template's resources, from its dependency graph.

CloudFormation creates a resource after everything it depends on (DependsOn,
Ref, Fn::GetAtt) and deletes it before them, so one graph gives both orders.
"""

from __future__ import annotations

import heapq
from functools import cache

import aws_cdk as cdk


def logical_id(stack: cdk.Stack, construct) -> str:
    """The logical ID of a construct's CloudFormation resource, through wrapper constructs."""
    while not isinstance(construct, cdk.CfnElement):
        construct = construct.node.default_child
    return stack.get_logical_id(construct)


def references(value) -> set[str]:
    """Logical IDs named by Ref and Fn::GetAtt anywhere inside ``value``."""
    if isinstance(value, dict):
        found = set()
        for key, inner in value.items():
            if key == "Ref" and isinstance(inner, str):
                found.add(inner)
            elif key == "Fn::GetAtt":
                found.add(inner[0] if isinstance(inner, list) else inner.split(".")[0])
            else:
                found |= references(inner)
        return found
    if isinstance(value, list):
        return set().union(*map(references, value)) if value else set()
    return set()


class Graph:
    """Each resource's direct dependencies as CloudFormation reads them, and their closure."""

    def __init__(self, template: dict):
        self.resources = template["Resources"]
        self.direct = {
            name: (set(res.get("DependsOn", [])) | references(res.get("Properties", {}))) & self.resources.keys()
            for name, res in self.resources.items()
        }

    @cache  # noqa: B019 (few graphs, each as long-lived as its template)
    def after(self, name: str) -> frozenset[str]:
        """Everything ``name`` is created after (and deleted before)."""
        closure = set()
        for dep in self.direct[name]:
            closure |= {dep} | self.after(dep)
        return frozenset(closure)

    def longest_chain(self, members: set[str]) -> list[str]:
        """The longest run of members each created after the next one (last: created first)."""

        def chain(name: str) -> list[str]:
            below = [chain(d) for d in self.after(name) & members]
            return [name, *max(below, key=len, default=[])]

        return max((chain(m) for m in members), key=len, default=[])


def creation_order(template: dict) -> list[str]:
    """Every resource, each after everything it depends on; ties go by logical ID, so the order is stable."""
    graph = Graph(template)
    waiting = {name: set(deps) for name, deps in graph.direct.items()}
    dependents: dict[str, list[str]] = {name: [] for name in waiting}
    for name, deps in waiting.items():
        for dep in deps:
            dependents[dep].append(name)
    ready = [name for name, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    order = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for dependent in dependents[name]:
            waiting[dependent].discard(name)
            if not waiting[dependent]:
                heapq.heappush(ready, dependent)
    if len(order) != len(waiting):
        raise ValueError(f"dependency cycle among {sorted(set(waiting) - set(order))}")
    return order
