"""Loading manifests, reporting every issue with its place, and the apply/delete-time checks."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from meshway.config.errors import ConfigError, ConfigIssue
from meshway.config.loader import (
    load_paths,
    parse_documents,
    parse_sources,
    parse_sources_detailed,
    parse_sources_with_origins,
    source_map,
)
from meshway.config.model import (
    Node,
    ObjectKey,
    ObjectMeta,
    Resource,
    Service,
    ServicePort,
    ServiceSpec,
    Workload,
    WorkloadSpec,
    kind_for,
)
from meshway.config.references import check_deletions, check_references, check_update

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mesh.yaml"


def issues_of(text: str, source: str = "test.yaml") -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        parse_documents(textwrap.dedent(text), source)
    return caught.value.issues


WORKLOAD = """\
apiVersion: meshway.io/v1alpha1
kind: Workload
metadata: {{name: {name}, namespace: shop}}
spec: {{nodeName: node-1, command: [server]{extra}}}
"""


def workload_doc(name: str, extra: str = "") -> str:
    return WORKLOAD.format(name=name, extra=extra)


# --------------------------------------------------------------------------- issues


def test_issue_and_error_rendering() -> None:
    full = ConfigIssue("mesh.yaml", 3, "Workload shop/a", "spec.nodeName", "bad")
    assert str(full) == "mesh.yaml: document 3 (Workload shop/a): spec.nodeName: bad"
    assert str(ConfigIssue("mesh.yaml", None, None, "", "missing")) == "mesh.yaml: missing"
    assert str(ConfigIssue("", None, "Node n", "", "in use")) == "Node n: in use"
    assert str(ConfigIssue("a.yaml", 2, None, "kind", "x")) == "a.yaml: document 2: kind: x"
    error = ConfigError([full, ConfigIssue("b.yaml", 1, None, "", "y")])
    assert str(error).splitlines() == [str(full), "b.yaml: document 1: y"]
    assert error.to_json()[0] == {
        "source": "mesh.yaml",
        "document": 3,
        "object": "Workload shop/a",
        "path": "spec.nodeName",
        "message": "bad",
    }
    json.dumps(error.to_json())


# --------------------------------------------------------------------------- document handling


def test_unknown_kind_lists_known_kinds() -> None:
    (issue,) = issues_of("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
    assert (issue.document, issue.path, issue.object) == (1, "kind", "Pod p")
    assert issue.message.startswith("unknown kind 'Pod'; known kinds: AuthorizationPolicy, ")
    assert "Workload" in issue.message
    (close,) = issues_of("apiVersion: v1\nkind: HttpRoute\nmetadata: {name: r}\n")
    assert "did you mean 'HTTPRoute'?" in close.message


def test_unknown_field_suggests_the_closest_one() -> None:
    (issue,) = issues_of(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-frontend, namespace: shop}
        spec:
          rules:
            - from:
                - source:
                    principles: ["cluster.local/ns/shop/sa/frontend"]
        """
    )
    assert issue.path == "spec.rules[0].from[0].source.principles"
    assert issue.message == "unknown field 'principles'; did you mean 'principals'?"
    assert issue.object == "AuthorizationPolicy shop/allow-frontend"
    assert str(issue).startswith("test.yaml: document 1 (AuthorizationPolicy shop/allow-frontend)")


def test_unknown_top_level_and_case_mismatch_fields() -> None:
    found = issues_of(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: backend}
        specs: {}
        spec: {clusterIp: 10.0.0.1, ports: [{port: 80}]}
        """
    )
    by_path = {i.path: i.message for i in found}
    assert by_path["specs"] == "unknown field 'specs'; did you mean 'spec'?"
    assert by_path["spec.clusterIp"] == "unknown field 'clusterIp'; did you mean 'clusterIP'?"


def test_mistyped_field() -> None:
    (issue,) = issues_of(workload_doc("w", ", ports: [{containerPort: abc}]"))
    assert issue.path == "spec.ports[0].containerPort"
    assert issue.message == "expected integer, got string 'abc'"
    (quoted,) = issues_of(workload_doc("w", ", env: {PORT: 8080}"))
    assert quoted.path == "spec.env[PORT]"
    assert quoted.message == 'expected string, got integer 8080 (quote it: "8080")'
    (literal,) = issues_of(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
        "spec: {ports: [{port: 80, protocol: HTTP}]}\n"
    )
    (boolean,) = issues_of(workload_doc("w", ", env: {DEBUG: yes}"))
    assert boolean.message == "expected string, got boolean true (quote it if you meant a string)"
    assert literal.path == "spec.ports[0].protocol"
    assert literal.message == "must be one of 'TCP', 'UDP' or 'SCTP', got string 'HTTP'"


def test_missing_fields_and_wrong_api_version() -> None:
    found = issues_of(
        """
        kind: Workload
        metadata: {name: a}
        ---
        apiVersion: v1
        kind: Workload
        metadata: {name: b}
        spec: {nodeName: node-1, command: [x]}
        ---
        apiVersion: meshway.io/v1alpha1
        kind: Workload
        metadata: {namespace: shop}
        spec: {command: [x]}
        """
    )
    assert [(i.document, i.path, i.message) for i in found] == [
        (1, "apiVersion", "required field is missing; use 'meshway.io/v1alpha1'"),
        (1, "spec", "required field is missing"),
        (
            2,
            "apiVersion",
            "apiVersion 'v1' is not accepted for Workload; use 'meshway.io/v1alpha1'",
        ),
        (3, "metadata.name", "required field is missing"),
        (3, "spec.nodeName", "required field is missing"),
    ]


def test_document_that_is_not_a_mapping() -> None:
    (issue,) = issues_of("- a\n- b\n")
    assert (issue.document, issue.path) == (1, "")
    assert "expected a mapping" in issue.message


def test_yaml_syntax_error_reports_line_and_column() -> None:
    text = workload_doc("a") + "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: [shop\n"
    found = issues_of(text)
    assert len(found) == 1
    assert found[0].document == 2
    assert found[0].message.startswith("YAML syntax error at line 10, column 1:")


def test_yaml_syntax_error_comes_after_issues_of_earlier_documents() -> None:
    text = workload_doc("Bad") + "---\nkind: [\n"
    found = issues_of(text)
    assert [i.document for i in found] == [1, 2]
    assert "YAML syntax error at line 7" in found[1].message


def test_duplicate_yaml_keys_are_reported() -> None:
    (issue,) = issues_of(
        """
        apiVersion: v1
        kind: Namespace
        metadata: {name: shop}
        metadata: {name: other}
        """
    )
    assert issue.message == "duplicate key 'metadata' at line 5, column 1"


def test_empty_documents_are_skipped_but_counted() -> None:
    text = "---\n# only a comment\n---\n" + workload_doc("Bad")
    (issue,) = issues_of(text)
    assert issue.document == 2
    assert issue.path == "metadata.name"


def test_all_issues_are_collected_across_documents() -> None:
    text = "\n---\n".join(
        [
            workload_doc("ok-1"),
            workload_doc("w", ", ports: [{containerPort: 0}]"),
            "apiVersion: v1\nkind: Foo\nmetadata: {name: f}",
            workload_doc("ok-2"),
            "apiVersion: v1\nkind: Node\nmetadata: {name: n, namespace: shop}",
        ]
    )
    found = issues_of(text)
    assert [(i.document, i.path) for i in found] == [
        (2, "spec.ports[0].containerPort"),
        (3, "kind"),
        (5, "apiVersion"),
        (5, "metadata.namespace"),
    ]


def test_list_kind_items_keep_the_document_index() -> None:
    text = """
        apiVersion: v1
        kind: List
        items:
          - {apiVersion: v1, kind: ServiceAccount, metadata: {name: a, namespace: shop}}
          - {apiVersion: v1, kind: ServiceAccount, metadata: {name: B, namespace: shop}}
        """
    (issue,) = issues_of(text)
    assert (issue.document, issue.path) == (1, "items[1].metadata.name")
    (issue,) = issues_of("apiVersion: v1\nkind: List\nitems: {}\n")
    assert (issue.path, issue.message) == ("items", "a List needs a list of items, got a mapping")


def test_namespace_defaults_and_cluster_scoped_kinds() -> None:
    workload, namespace = parse_documents(
        workload_doc("w").replace(", namespace: shop", "")
        + "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
        "t.yaml",
    )
    assert workload.metadata.namespace == "default"
    assert namespace.metadata.namespace is None
    (issue,) = issues_of("apiVersion: v1\nkind: Namespace\nmetadata: {name: a, namespace: b}\n")
    assert (issue.path, issue.message) == (
        "metadata.namespace",
        "Namespace is cluster-scoped: remove the namespace",
    )


def test_duplicate_object_in_batch() -> None:
    (issue,) = issues_of(workload_doc("w") + "---\n" + workload_doc("w"))
    assert (issue.document, issue.object, issue.path) == (2, "Workload shop/w", "metadata.name")
    assert issue.message == "duplicate object: also defined in test.yaml document 1"
    with pytest.raises(ConfigError) as caught:
        parse_sources([("a.yaml", workload_doc("w")), ("b.yaml", workload_doc("w"))])
    assert caught.value.issues[0].source == "b.yaml"
    assert "also defined in a.yaml document 1" in caught.value.issues[0].message


def test_issues_are_collected_across_sources() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_sources([("a.yaml", workload_doc("A")), ("b.yaml", "kind: [")])
    assert [i.source for i in caught.value.issues] == ["a.yaml", "b.yaml"]


def test_json_sources_and_timestamps() -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "shop", "creationTimestamp": "2024-05-01T10:00:00Z"},
    }
    (namespace,) = parse_documents(json.dumps(doc), "ns.json")
    assert namespace.metadata.creation_timestamp == "2024-05-01T10:00:00Z"
    (from_yaml,) = parse_documents(
        "apiVersion: v1\nkind: Namespace\n"
        "metadata: {name: shop, creationTimestamp: 2024-05-01T10:00:00Z}\n",
        "ns.yaml",
    )
    assert from_yaml == namespace
    (issue,) = issues_of('{"kind": ', "bad.json")
    assert issue.message.startswith("JSON syntax error at line 1, column 10")


def test_detailed_parse_remembers_where_objects_came_from() -> None:
    parsed = parse_sources_detailed([("a.yaml", "---\n" + workload_doc("w"))])
    assert source_map(parsed) == {ObjectKey("Workload", "shop", "w"): ("a.yaml", 1)}
    objects, origins = parse_sources_with_origins([("a.yaml", "---\n---\n" + workload_doc("w"))])
    assert [o.key for o in objects] == [ObjectKey("Workload", "shop", "w")]
    assert origins == {ObjectKey("Workload", "shop", "w"): ("a.yaml", 2)}


def test_load_paths(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text("b")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.yml").write_text("a")
    (tmp_path / "c.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("skip")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.yaml").write_text("skip")
    single = tmp_path / "notes.txt"
    loaded = load_paths([tmp_path, single])
    assert [Path(name).relative_to(tmp_path).as_posix() for name, _ in loaded] == [
        "b.yaml",
        "c.json",
        "sub/a.yml",
        "notes.txt",
    ]
    assert loaded[0][1] == "b"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as caught:
        load_paths([tmp_path / "missing.yaml", empty])
    assert [i.message for i in caught.value.issues] == [
        "no such file or directory",
        "no *.yaml, *.yml, *.json files",
    ]


def test_example_round_trips() -> None:
    original = parse_documents(EXAMPLE.read_text(), str(EXAMPLE))
    assert {r.KIND for r in original} >= {
        "Namespace",
        "Node",
        "ServiceAccount",
        "Workload",
        "Service",
        "AuthorizationPolicy",
        "PeerAuthentication",
        "Gateway",
        "HTTPRoute",
        "DestinationRule",
    }
    again = [kind_for(r.kind).model_validate(r.to_dict()) for r in original]
    assert again == original
    text = "\n---\n".join(json.dumps(r.to_dict()) for r in original)
    assert parse_documents(text, "again.yaml") == original


# --------------------------------------------------------------------------- references


def _store(objects: Sequence[Resource]) -> dict[ObjectKey, Resource]:
    return {o.key: o for o in objects}


def _parse(text: str) -> list[Resource]:
    return parse_documents(textwrap.dedent(text), "apply.yaml")


BASE = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: meshway.io/v1alpha1
kind: Node
metadata: {name: node-1}
"""


def test_missing_namespace_reference() -> None:
    batch = _parse(workload_doc("w"))
    found = check_references(batch, _store([]).get, {batch[0].key: ("apply.yaml", 1)})
    assert [(i.path, i.source, i.document) for i in found] == [
        ("metadata.namespace", "apply.yaml", 1),
        ("spec.nodeName", "apply.yaml", 1),
    ]
    assert found[0].message == (
        "namespace 'shop' does not exist: create it first or include a Namespace document"
    )
    assert found[0].object == "Workload shop/w"


def test_objects_in_the_batch_or_store_satisfy_references() -> None:
    store = _store(_parse(BASE))
    assert check_references(_parse(workload_doc("w")), store.get) == []
    assert check_references(_parse(BASE + "---\n" + workload_doc("w")), _store([]).get) == []


def test_missing_service_account() -> None:
    store = _store(_parse(BASE))
    batch = _parse(workload_doc("w", ", serviceAccountName: backend"))
    (issue,) = check_references(batch, store.get)
    assert issue.path == "spec.serviceAccountName"
    assert "service account 'backend' does not exist in namespace 'shop'" in issue.message
    account = (
        "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: backend, namespace: shop}\n"
    )
    assert (
        check_references(
            _parse(workload_doc("w", ", serviceAccountName: backend") + account), store.get
        )
        == []
    )


def test_missing_node_and_unknown_gateway_class() -> None:
    store = _store(_parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"))
    batch = _parse(
        workload_doc("w")
        + """---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: missing}]
  rules: [{backendRefs: [{name: missing, port: 80}]}]
"""
    )
    found = check_references(batch, store.get)
    assert [(i.object, i.path) for i in found] == [
        ("Workload shop/w", "spec.nodeName"),
        ("Gateway shop/waypoint", "spec.gatewayClassName"),
    ]
    assert "node 'node-1' does not exist" in found[0].message
    assert "use one of istio-waypoint, meshway-waypoint" in found[1].message


def test_immutable_fields() -> None:
    old = Workload(
        metadata=ObjectMeta(name="w", namespace="shop"),
        spec=WorkloadSpec(node_name="node-1", command=["x"]),
    )
    moved = old.model_copy(update={"spec": old.spec.model_copy(update={"node_name": "node-2"})})
    (issue,) = check_update(old, moved)
    assert issue.path == "spec.nodeName"
    assert issue.message.startswith("field is immutable")
    assert check_update(old, old.model_copy(deep=True)) == []

    def service(cluster_ip: str | None) -> Service:
        spec = ServiceSpec(ports=[ServicePort(port=80)], cluster_ip=cluster_ip)
        return Service(metadata=ObjectMeta(name="s"), spec=spec)

    (issue,) = check_update(service("10.96.0.1"), service("10.96.0.2"))
    assert (issue.path, issue.object) == ("spec.clusterIP", "Service default/s")
    assert "field is immutable" in issue.message
    assert check_update(service("10.96.0.1"), service(None)) == []
    assert check_update(service(None), service("10.96.0.2")) == []


def test_namespace_deletion_with_dependents() -> None:
    objects = _parse(
        BASE
        + "---\n"
        + "---\n".join(workload_doc(f"w{i}") for i in range(5))
        + "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa, namespace: shop}\n"
    )
    (issue,) = check_deletions([ObjectKey("Namespace", "", "shop")], objects)
    assert issue.object == "Namespace shop"
    assert issue.message == (
        "namespace 'shop' still holds 6 objects: ServiceAccount shop/sa, Workload shop/w0, "
        "Workload shop/w1 and 3 more; delete them first"
    )
    everything = [o.key for o in objects]
    assert check_deletions(everything, objects) == []


def test_service_account_and_node_deletion_with_dependents() -> None:
    objects = _parse(BASE + "---\n" + workload_doc("w", ", serviceAccountName: sa"))
    found = check_deletions(
        [ObjectKey("ServiceAccount", "shop", "sa"), ObjectKey("Node", "", "node-1")], objects
    )
    assert [i.message for i in found] == [
        "service account 'sa' is used by 1 Workload: Workload shop/w; delete or move them first",
        "node 'node-1' still runs 1 Workload: Workload shop/w; delete them first",
    ]
    unused = Node(metadata=ObjectMeta(name="node-2"))
    assert check_deletions([unused.key], [*objects, unused]) == []


def test_alias_bomb_is_refused_quickly() -> None:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        levels.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: boom\n  annotations:\n"
    bomb += "".join(f"    {line}\n" for line in levels)
    with pytest.raises(ConfigError) as caught:
        parse_documents(bomb, "bomb.yaml")
    (issue,) = caught.value.issues
    assert "expands to more than" in issue.message and issue.document == 1


def test_small_anchors_still_work() -> None:
    text = (
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n"
        "spec:\n  selector: &sel {app: web}\n  ports: [{port: 80}]\n"
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: web2, namespace: shop}\n"
        "spec:\n  selector: {app: web2}\n  ports: [{port: 80}]\n"
    )
    assert [o.metadata.name for o in parse_documents(text, "ok.yaml")] == ["web", "web2"]


@pytest.mark.parametrize(
    "name",
    sorted(p.name for p in (Path(__file__).resolve().parents[2] / "examples").glob("*.yaml")),
)
def test_every_example_file_parses(name: str) -> None:
    """What the docs tell users to copy must be accepted as it is."""
    path = Path(__file__).resolve().parents[2] / "examples" / name
    objects = parse_documents(path.read_text(), str(path))
    assert objects, f"{name} holds no object"
