"""The documentation: its pictures are what the code draws now (tools/pictures.py), and its links lead somewhere.

The pictures are drawn from the session's eni synth (cdk.json's configuration, which is datapath eni) and
the datapath model, so their tests are in the full tier; drawing them takes a few seconds.
A stale picture is fixed by `python -m tools.pictures`, never by hand.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import CONTEXT, ROOT
from checks.deploy_graph import Graph
from tools import pictures
from stacks.config import load_config

# --- Links ---------------------------------------------------------------------------------------

INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.I)
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:name|id)=\"([^\"]+)\"", re.I)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http(s)://, mailto: and any other scheme
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, code spans blanked: where Markdown sees links and headings."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        opening = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if fence is None and opening:
            fence = opening.group(1)
            continue
        if fence is not None:
            if re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", line):
                fence = None
            continue
        lines.append((number, CODE_SPAN.sub("", line)))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text as shown, lowercased, punctuation but hyphens and spaces removed,
    each space a hyphen."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor (a repeated one with -1, -2, ...), and the HTML anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found |= set(HTML_ANCHOR.findall(line))
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link and image: inline, reference definitions, and HTML href/src."""
    found = []
    for number, line in prose_lines(text):
        targets = INLINE_LINK.findall(line) + HTML_LINK.findall(line)
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            targets.append(definition.group(1))
        found += [(number, target) for target in targets]
    return found


def broken_links(path: Path, root: Path, text: str | None = None) -> list[str]:
    """'file:line: target: why' for every relative link of a Markdown file that leads nowhere: a file that is
    not in the repository, or an anchor that is no heading of the Markdown file it points into."""
    text = path.read_text() if text is None else text
    broken = []
    for number, target in links(text):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part)
        where = f"{path.relative_to(root) if path.is_relative_to(root) else path}:{number}: {target}"
        if file_part:
            resolved = (root / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)
            resolved = resolved.resolve()
            if not resolved.is_relative_to(root.resolve()) or not resolved.exists():
                broken.append(f"{where}: no such file in the repository")
                continue
        else:
            resolved = path
        if anchor and resolved.suffix == ".md" and resolved.is_file():
            known = anchors(text if resolved == path.resolve() or not file_part else resolved.read_text())
            if unquote(anchor) not in known:
                broken.append(f"{where}: no heading with anchor #{anchor} in {resolved.name}")
    return broken


def test_every_relative_link_resolves():
    documents = pictures.documents(ROOT)
    assert documents, "no README.md or docs/*.md"
    broken = [line for path in documents for line in broken_links(path, ROOT)]
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Your services", "your-services"),
        ("Encryption (WireGuard)", "encryption-wireguard"),
        ("`cdk.json`: the settings", "cdkjson-the-settings"),
        ("What's in it?", "whats-in-it"),
        ("A -- B", "a----b"),
        ("[Links](docs/x.md) in a heading", "links-in-a-heading"),
        ("snake_case stays", "snake_case-stays"),
        ("Datapath **eni**", "datapath-eni"),
    ],
)
def test_slug_is_githubs(heading, anchor):
    assert slug(heading) == anchor


def test_the_link_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Setup\n\n## Setup\n\n```\n# not a heading\n```\n")
    (tmp_path / "picture.png").write_bytes(b"")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n## Same\n\n## Same\n\n"
        "[fine](docs/other.md) [fine](docs/other.md#setup-1) [fine](#same-1) [fine](#title) ![fine](picture.png)\n"
        "[external](https://example.com/missing.md) [mail](mailto:someone@example.com) [dir](docs/)\n"
        "[missing file](docs/missing.md)\n"
        "[missing anchor](docs/other.md#setup-2)\n"
        "[missing here](#nowhere)\n"
        "[no heading in code](docs/other.md#not-a-heading)\n"
        "`[in code](nowhere.md)`\n\n"
        "```\n[in a fence](nowhere.md)\n```\n\n"
        "[ref]: docs/gone.md\n"
        '<img src="missing.png">\n'
        "[outside](../outside.md)\n"
    )
    assert broken_links(page, tmp_path) == [
        "README.md:9: docs/missing.md: no such file in the repository",
        "README.md:10: docs/other.md#setup-2: no heading with anchor #setup-2 in other.md",
        "README.md:11: #nowhere: no heading with anchor #nowhere in README.md",
        "README.md:12: docs/other.md#not-a-heading: no heading with anchor #not-a-heading in other.md",
        "README.md:19: docs/gone.md: no such file in the repository",
        "README.md:20: missing.png: no such file in the repository",
        "README.md:21: ../outside.md: no such file in the repository",
    ]


# --- Pictures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(request) -> dict:
    """cdk.json's template: the session's eni synth when cdk.json says eni (the same template), else a synth here."""
    if load_config(CONTEXT).datapath == "eni":
        return request.getfixturevalue("synth_eni").template
    return pictures.synthesized_template()


@pytest.fixture(scope="module")
def generated(template) -> dict[str, str]:
    return pictures.generate(template)


@pytest.mark.slow  # the pictures draw from a synth and the model: the full tier's
def test_every_picture_block_is_what_the_code_draws_now(generated):
    stale = pictures.stale(pictures.documents(ROOT), generated)
    assert not stale, (f"picture blocks that differ from what the code draws now (run `{pictures.COMMAND}` "
                       "and commit the result):\n" + "\n".join(stale))  # fmt: skip


@pytest.mark.slow  # the pictures draw from a synth and the model: the full tier's
def test_every_picture_is_in_the_docs(generated):
    used = {b.name for path in pictures.documents(ROOT) for b in pictures.blocks(path.read_text(), str(path))}
    missing = sorted(set(generated) - used)
    assert not missing, "pictures in no file of README.md and docs/*.md: " + ", ".join(
        f"{name} (place {pictures.START.format(name=name)!r} ... {pictures.END!r}, then run `{pictures.COMMAND}`)" for name in missing)


@pytest.mark.slow  # the pictures draw from a synth and the model: the full tier's
def test_drawing_twice_gives_the_same_text(template, generated):
    assert pictures.generate(template) == generated


@pytest.mark.slow  # the pictures draw from a synth and the model: the full tier's
def test_the_generator_rewrites_stale_blocks_only(tmp_path, monkeypatch, generated, capsys):
    monkeypatch.setattr(pictures, "generate", lambda template=None: generated)
    page = tmp_path / "page.md"
    stale = "\n".join(f"{pictures.START.format(name=name)}\n```mermaid\nflowchart LR\n  old --> drawing\n```\n{pictures.END}"
                      for name in sorted(generated))  # fmt: skip
    page.write_text(f"# Page\n\nProse before.\n\n{stale}\n\nProse after, kept as it is.\n")
    assert pictures.main(["--check", str(page)]) == 1
    assert capsys.readouterr().out.count("stale: ") == len(generated)
    assert pictures.main([str(page)]) == 0
    current = "\n".join(pictures.block(name, generated[name]) for name in sorted(generated))
    assert page.read_text() == f"# Page\n\nProse before.\n\n{current}\n\nProse after, kept as it is.\n"
    assert pictures.main(["--check", str(page)]) == 0
    before = page.read_text()
    assert pictures.main([str(page)]) == 0 and page.read_text() == before


@pytest.mark.slow  # the pictures draw from a synth and the model: the full tier's
def test_a_broken_or_unknown_block_is_refused(generated):
    start = pictures.START.format(name="architecture")
    with pytest.raises(ValueError, match="picture markers"):
        pictures.blocks(f"{start}\n```mermaid\nflowchart LR\n```\n")
    with pytest.raises(ValueError, match="picture markers"):
        pictures.blocks("<!-- picture: architecture -->\n```mermaid\n```\n<!-- /picture -->\n")
    with pytest.raises(ValueError, match="no picture 'nonesuch'"):
        pictures.rewrite(f"{pictures.START.format(name='nonesuch')}\n```mermaid\n```\n{pictures.END}\n", generated)


def _nodes(mermaid: str) -> list[str]:
    return re.findall(r"^\s+(\w+)[\[(]{1,2}\"", mermaid, re.M)


@pytest.mark.slow  # the pictures draw from a synth and the model: the full tier's
def test_the_architecture_groups_what_the_stack_builds(generated, template):
    drawing = generated["architecture"]
    for group in ("g_vpc", "g_eks", "g_cilium", "g_app", "g_traffic", "g_metrics", "g_smoke"):
        assert f"subgraph {group}[" in drawing, group
    assert 20 <= len(_nodes(drawing)) <= 35, _nodes(drawing)
    for subnets in ("Public subnets", "ControlPlane subnets", "Private subnets"):
        assert subnets in drawing
    rollouts = [r for r in template["Resources"].values() if r["Type"] == pictures.ROLLOUT_RESOURCE_TYPE]
    assert drawing.count('["Rollout ') == len(rollouts) > 0
    assert "other resource" not in drawing, "a resource of no part: give it one in tools/pictures.py PARTS"


@pytest.mark.slow  # the pictures draw from a synth and the model: the full tier's
def test_the_deploy_order_bolds_the_longest_chain_after_the_node_group(generated, template):
    graph = Graph(template)
    (nodes,) = [k for k, r in template["Resources"].items() if r["Type"] == "AWS::EKS::Nodegroup"]
    steps = {k for k, r in template["Resources"].items() if r["Type"] in pictures.KUBERNETES_STEP and nodes in graph.after(k)}
    chain = graph.longest_chain(steps)
    drawing = generated["deploy-order"]
    (bold,) = re.findall(r"^  class (\S+) chain$", drawing, re.M)
    assert len(bold.split(",")) == len(chain) and set(bold.split(",")) <= steps
    assert drawing.count(" ==> ") == len(chain)  # the chain's links, and the node group's to its first step
    for a, b in re.findall(r"^  (\w+) [-=]=?-?> (\w+)$", drawing, re.M):  # direct edges only
        assert a in graph.after(b)
        assert not any(a in graph.after(m) and m in graph.after(b) for m in steps), (a, b)


@pytest.mark.slow  # the pictures draw from a synth and the model: the full tier's
def test_the_creation_graph_holds_every_resource_in_order_with_the_kubernetes_steps_shaded(generated, template):
    drawing, resources = generated["creation-graph"], template["Resources"]
    boxes = _nodes(drawing)
    singles = [k for k, r in resources.items() if r["Type"] in pictures.SINGLE]
    assert set(singles) <= set(boxes), "each EKS resource and Kubernetes step is a box of its own"
    assert f"%% {len(resources)} resources;" in drawing
    (shaded,) = re.findall(r"^  class (\S+) kubernetes$", drawing, re.M)
    assert set(shaded.split(",")) == {k for k, r in resources.items() if r["Type"] in pictures.KUBERNETES_STEP}
    graph = Graph(template)
    (nodes,) = [k for k, r in resources.items() if r["Type"] == "AWS::EKS::Nodegroup"]
    steps = {k for k, r in resources.items() if r["Type"] in pictures.KUBERNETES_STEP and nodes in graph.after(k)}
    (bold,) = re.findall(r"^  class (\S+) chain$", drawing, re.M)
    assert len(bold.split(",")) == len(graph.longest_chain(steps))
    edges = re.findall(r"^  (\w+) [-=]=?-?> (\w+)$", drawing, re.M)
    for a, b in edges:  # between single resources: created in that order, with nothing drawn between
        if a in singles and b in singles:
            assert a in graph.after(b), (a, b)
    later = {b for _, b in edges}
    assert [b for b in boxes if b not in later] == sorted(b for b in boxes if b not in later)
    assert "part_vpc" in boxes and "part_vpc" not in later, "the VPC is created first"


@pytest.mark.slow  # the pictures draw from a synth and the model: the full tier's
@pytest.mark.parametrize(("picture", "datapath"), [("request-paths", "eni"), ("request-paths-chaining", "chaining")])
def test_the_request_paths_show_every_client_of_the_model(generated, picture, datapath):
    from checks.datapath import Deployed, evaluate_all

    config = load_config(CONTEXT)
    deployed = Deployed.of(datapath, config.services, config.sample_app, config.cilium_version)
    drawing = generated[picture]
    assert drawing.startswith(f"flowchart LR\n  %% datapath {datapath}: {len(evaluate_all(deployed))} paths")
    for client in sorted({o.hop.client for o in evaluate_all(deployed)}):
        assert f"w_{pictures._id(client)}" in drawing, client
    assert "denied" in drawing and "delivered" in drawing
    assert (", encrypted" in drawing) == (datapath == "eni"), "WireGuard encrypts between nodes in eni only"


# --- The declaration's reference, checked against the model ------------------------------------------


def _reference_rows() -> dict[str, str]:
    """docs/services.md's table of keys: each key of a row's first column -> the row (default and text)."""
    rows = {}
    for line in (ROOT / "docs" / "services.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        for key in re.findall(r"`([a-z_]+)`", cells[0]) if cells else []:
            rows[key] = " | ".join(cells[1:])
    return rows


def test_the_services_reference_names_every_key_of_the_model_and_no_other():
    """Every setting of MeshService, and of each setting that is an object, in docs/services.md; its default
    as the model has it; nothing the model does not have (so the reference cannot drift from the model)."""
    import dataclasses as dc

    from cilium_mesh.rollout_plan import RolloutLoad, RolloutSettings
    from cilium_mesh.traffic import Caller, HttpRule, MeshService, Mirror, Retries, Route

    rows = _reference_rows()
    fields = {f.name: f for f in dc.fields(MeshService)}
    assert set(rows) == set(fields), (sorted(set(fields) - set(rows)), sorted(set(rows) - set(fields)))
    for name, field in fields.items():
        default = field.default
        if default is dc.MISSING or not isinstance(default, (bool, int, str)) or default is None:
            continue
        shown = {True: "`true`", False: "`false`"}.get(default, str(default)) if isinstance(default, bool) else str(default)
        assert shown in rows[name].split(" | ")[0], (name, default, rows[name])
    nested = {"routes": Route, "mirror": Mirror, "retries": Retries, "callers": Caller}
    for name, cls in nested.items():
        for sub in dc.fields(cls):
            assert f"{sub.name}" in rows[name], (name, sub.name)
    text = (ROOT / "docs" / "services.md").read_text()
    for cls in (HttpRule, RolloutLoad):
        assert all(f"`{f.name}`" in text or f.name in rows["callers" if cls is HttpRule else "rollout"] for f in dc.fields(cls)), cls
    configuration = (ROOT / "docs" / "configuration.md").read_text()
    assert all(f"`{f.name}`" in configuration for f in dc.fields(RolloutSettings) if f.name not in ("min_pause_s", "load"))
