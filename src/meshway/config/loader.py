"""Read manifests (multi-document YAML or JSON) into typed resources, reporting every problem.

A user applying a directory wants all of its mistakes at once, each with the file, the document
and the field path in the names they wrote (camelCase), not Python's.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from meshway.config.errors import ConfigError, ConfigIssue, FieldError
from meshway.config.model import DEFAULT_NAMESPACE, KINDS, ObjectKey, Resource, describe_value

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

_YamlLoaderBase: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"


MAX_ALIAS_EXPANSION = 100_000


class ExcessiveAliasing(yaml.YAMLError):
    pass


class _ManifestLoader(_YamlLoaderBase):  # type: ignore[misc,valid-type]
    """Safe YAML read the way Kubernetes reads it.

    Timestamps stay strings (`creationTimestamp` is a string field), and duplicate keys are
    recorded: PyYAML would silently keep the last one, hiding half of a user's spec.
    """

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[tuple[str, yaml.Mark]] = []
        self._sizes: dict[int, int] = {}

    def construct_document(self, node: yaml.Node) -> Any:
        """Refuse alias bombs ("billion laughs"): a few anchors can stand for billions of nodes
        once expanded, which validation would then walk. Counted on the composed graph, where
        an aliased node is shared, so the count itself is cheap."""
        self._sizes.clear()
        if self._size(node) > MAX_ALIAS_EXPANSION:
            raise ExcessiveAliasing(
                f"the document expands to more than {MAX_ALIAS_EXPANSION} nodes through aliases"
            )
        return super().construct_document(node)

    def _size(self, node: yaml.Node) -> int:
        known = self._sizes.get(id(node))
        if known is not None:
            return known
        if isinstance(node, yaml.MappingNode):
            size = 1 + sum(self._size(k) + self._size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._size(v) for v in node.value)
        else:
            size = 1
        self._sizes[id(node)] = size
        return size

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                if key_node.value in seen:
                    self.duplicate_keys.append((key_node.value, key_node.start_mark))
                seen.add(key_node.value)
        result: dict[Hashable, Any] = super().construct_mapping(node, deep)
        return result


class ParsedDocument(NamedTuple):
    """A resource and where it came from, for messages that point back at the file."""

    resource: Resource
    source: str
    document: int


class _RawDocument(NamedTuple):
    number: int
    data: Any


def _read_documents(text: str, source: str) -> Iterator[_RawDocument | ConfigIssue]:
    """Documents of a file in order, with file-level issues where they occur.

    A generator, so that each raw document is validated and dropped before the next is read:
    holding 10,000 raw documents at once makes the garbage collector dominate the load time.
    A syntax error ends the file, since the parser cannot resynchronise.
    """
    if source.endswith(".json"):
        try:
            yield _RawDocument(1, json.loads(text))
        except json.JSONDecodeError as exc:
            message = f"JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            yield ConfigIssue(source, 1, None, "", message)
        return

    loader = _ManifestLoader(text)
    number = 0
    try:
        while loader.check_data():
            data = loader.get_data()
            number += 1
            if not loader.duplicate_keys:
                yield _RawDocument(number, data)
                continue
            for key, mark in loader.duplicate_keys:
                message = f"duplicate key {key!r} at line {mark.line + 1}, column {mark.column + 1}"
                yield ConfigIssue(source, number, None, "", message)
            loader.duplicate_keys.clear()
    except yaml.MarkedYAMLError as exc:
        yield ConfigIssue(source, number + 1, None, "", _yaml_error_message(exc))
    except yaml.YAMLError as exc:
        yield ConfigIssue(source, number + 1, None, "", f"YAML error: {exc}")
    finally:
        loader.dispose()


def _yaml_error_message(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = exc.problem or exc.context or "invalid YAML"
    if exc.context and exc.problem:
        problem = f"{problem} ({exc.context})"
    return f"YAML syntax error{where}: {problem}"


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


def _object_label(data: dict[Any, Any], cls: type[Resource] | None) -> str | None:
    """'Kind ns/name' from raw data, for issues about objects that failed validation."""
    kind = data.get("kind")
    if not isinstance(kind, str) or not kind:
        return None
    metadata = data.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name:
        return kind
    namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
    if cls is not None and cls.NAMESPACED and not namespace:
        namespace = DEFAULT_NAMESPACE
    if isinstance(namespace, str) and namespace and (cls is None or cls.NAMESPACED):
        return f"{kind} {namespace}/{name}"
    return f"{kind} {name}"


# --------------------------------------------------------------------------- error rendering


_EXPECTED = {
    "string_type": "string",
    "int_type": "integer",
    "bool_type": "boolean",
    "float_type": "number",
    "list_type": "list",
    "dict_type": "mapping",
    "model_type": "mapping",
    "model_attributes_type": "mapping",
}


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated and Optional so that the walk sees the model, list or dict type."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
            annotation = models[0] if models else members[0]
        else:
            return annotation


def _walk(root: type[BaseModel], loc: Sequence[int | str]) -> tuple[str, Any]:
    """Render a pydantic `loc` with YAML names (`a.b[0].c`, dict keys as `[key]`).

    Returns the path and the (unwrapped) type found at the end, so that an unknown-field error
    can list the fields that the enclosing model does have.
    """
    path = ""
    current: Any = root
    for elem in loc:
        current = _unwrap(current)
        origin = typing.get_origin(current)
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(elem, str):
            field = _fields_by_yaml_name(current).get(elem)
            name = (field.alias or elem) if field is not None else elem
            path = _join(path, name)
            current = field.annotation if field is not None else None
        elif origin is list and isinstance(elem, int):
            path += f"[{elem}]"
            current = typing.get_args(current)[0]
        elif origin is dict:
            path += f"[{elem}]"
            current = typing.get_args(current)[1]
        else:
            path = path + f"[{elem}]" if isinstance(elem, int) else _join(path, str(elem))
            current = None
    return path, _unwrap(current) if current is not None else None


_FIELD_INDEX: dict[type[BaseModel], dict[str, Any]] = {}


def _fields_by_yaml_name(cls: type[BaseModel]) -> dict[str, Any]:
    index = _FIELD_INDEX.get(cls)
    if index is None:
        index = {}
        for name, info in cls.model_fields.items():
            index[name] = info
            index[info.alias or name] = info
        _FIELD_INDEX[cls] = index
    return index


def _unknown_field(name: str, holder: Any) -> str:
    message = f"unknown field {name!r}"
    if isinstance(holder, type) and issubclass(holder, BaseModel):
        known = sorted({info.alias or n for n, info in holder.model_fields.items()})
        lowered = {k.lower(): k for k in known}
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        suggestion = close[0] if close else lowered.get(name.lower())
        if suggestion:
            message += f"; did you mean {suggestion!r}?"
        elif known:
            message += f"; known fields: {', '.join(known)}"
    return message


def _message(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {describe_value(value)}"
        if kind == "string_type" and isinstance(value, bool):
            message += " (quote it if you meant a string)"
        elif kind == "string_type" and isinstance(value, int | float):
            message += f' (quote it: "{value}")'
        return message
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {describe_value(value)}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}, got {value}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}, got {value}"
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}, got {value}"
    if kind == "less_than":
        return f"must be less than {ctx.get('lt')}, got {value}"
    if kind in ("too_short", "string_too_short"):
        minimum = ctx.get("min_length", 1)
        return "must not be empty" if minimum == 1 else f"needs at least {minimum} items"
    if kind in ("too_long", "string_too_long"):
        return f"must be at most {ctx.get('max_length')} long"
    if kind in ("value_error", "assertion_error"):
        cause = ctx.get("error")
        return str(cause) if cause is not None else error["msg"]
    return error["msg"]


def _validation_issues(
    exc: ValidationError,
    cls: type[Resource],
    source: str,
    document: int,
    prefix: str,
    label: str | None,
) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    for error in exc.errors():
        loc = list(error["loc"])
        key_error = bool(loc) and loc[-1] == "[key]"
        if key_error:
            loc.pop()
        cause = (error.get("ctx") or {}).get("error")
        if error["type"] == "extra_forbidden" and loc:
            parent_path, holder = _walk(cls, loc[:-1])
            name = str(loc[-1])
            path = _join(parent_path, name)
            issues.append(
                ConfigIssue(
                    source, document, label, _join(prefix, path), _unknown_field(name, holder)
                )
            )
            continue
        path, _ = _walk(cls, loc)
        if isinstance(cause, FieldError):
            for sub_path, sub_message in cause.problems:
                full = _join(prefix, _join(path, sub_path))
                issues.append(ConfigIssue(source, document, label, full, sub_message))
            continue
        message = _message(error)
        if key_error:
            message = f"invalid key: {message}"
        issues.append(ConfigIssue(source, document, label, _join(prefix, path), message))
    return issues


# --------------------------------------------------------------------------- parsing


def _parse_object(
    data: Any, source: str, document: int, prefix: str, issues: list[ConfigIssue]
) -> list[tuple[Resource, str]]:
    """Validate one object (or the items of a `kind: List`); returns (resource, path prefix)."""
    if not isinstance(data, dict):
        message = (
            f"expected a mapping with apiVersion, kind and metadata, got {describe_value(data)}"
        )
        issues.append(ConfigIssue(source, document, None, prefix, message))
        return []
    kind = data.get("kind")
    api_version = data.get("apiVersion")
    if kind == "List":
        items = data.get("items")
        if not isinstance(items, list):
            message = f"a List needs a list of items, got {describe_value(items)}"
            issues.append(ConfigIssue(source, document, None, _join(prefix, "items"), message))
            return []
        parsed: list[tuple[Resource, str]] = []
        for i, item in enumerate(items):
            parsed += _parse_object(item, source, document, _join(prefix, f"items[{i}]"), issues)
        return parsed
    problems: list[tuple[str, str]] = []
    cls: type[Resource] | None = None
    if not isinstance(kind, str) or not kind:
        problems.append(
            ("kind", "required field is missing" if kind is None else "must be a string")
        )
    else:
        cls = KINDS.get(kind)
        if cls is None:
            close = difflib.get_close_matches(kind, list(KINDS), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                ("kind", f"unknown kind {kind!r}; {hint}known kinds: {', '.join(sorted(KINDS))}")
            )
    if not isinstance(api_version, str) or not api_version:
        message = "required field is missing" if api_version is None else "must be a string"
        if cls is not None:
            message += f"; use {cls.API_VERSIONS[0]!r}"
        problems.append(("apiVersion", message))
    label = _object_label(data, cls)
    for path, message in problems:
        issues.append(ConfigIssue(source, document, label, _join(prefix, path), message))
    if cls is None:
        return []
    if problems:
        # Still validate the rest, so that fixing apiVersion does not reveal a second round.
        data = {**data, "apiVersion": cls.API_VERSIONS[0]}
    try:
        resource = cls.model_validate(data)
    except ValidationError as exc:
        issues.extend(_validation_issues(exc, cls, source, document, prefix, label))
        return []
    return [] if problems else [(resource, prefix)]


def parse_sources_detailed(sources: Sequence[tuple[str, str]]) -> list[ParsedDocument]:
    """Parse (source name, text) pairs; each resource comes back with its file and document.

    Raises one ConfigError with every issue of every source, including objects defined twice.
    """
    issues: list[ConfigIssue] = []
    parsed: list[ParsedDocument] = []
    first_seen: dict[ObjectKey, tuple[str, int]] = {}
    for source, text in sources:
        for raw in _read_documents(text, source):
            if isinstance(raw, ConfigIssue):
                issues.append(raw)
                continue
            if raw.data is None:
                continue
            for resource, prefix in _parse_object(raw.data, source, raw.number, "", issues):
                key = resource.key
                if key in first_seen:
                    other_source, other_doc = first_seen[key]
                    issues.append(
                        ConfigIssue(
                            source,
                            raw.number,
                            resource.object_ref,
                            _join(prefix, "metadata.name"),
                            f"duplicate object: also defined in {other_source} "
                            f"document {other_doc}",
                        )
                    )
                    continue
                first_seen[key] = (source, raw.number)
                parsed.append(ParsedDocument(resource, source, raw.number))
    if issues:
        raise ConfigError(issues)
    return parsed


def parse_sources(sources: Sequence[tuple[str, str]]) -> list[Resource]:
    """Parse several files as one batch: issues are collected across all of them."""
    return [doc.resource for doc in parse_sources_detailed(sources)]


def parse_documents(text: str, source: str) -> list[Resource]:
    """Parse one multi-document YAML (or JSON, by the source's suffix) text."""
    return parse_sources([(source, text)])


def source_map(parsed: Sequence[ParsedDocument]) -> dict[ObjectKey, tuple[str, int]]:
    """The `sources` argument of `check_references`: where each object was defined."""
    return {doc.resource.key: (doc.source, doc.document) for doc in parsed}


def parse_sources_with_origins(
    sources: Sequence[tuple[str, str]],
) -> tuple[list[Resource], dict[ObjectKey, tuple[str, int]]]:
    """`parse_sources` plus the origins that the reference checks cite in their messages."""
    parsed = parse_sources_detailed(sources)
    return [doc.resource for doc in parsed], source_map(parsed)


def load_paths(paths: Sequence[Path]) -> list[tuple[str, str]]:
    """(source name, text) for each file, and for each manifest below each directory, sorted.

    Hidden files and directories are skipped (editors and VCS keep state there).
    """
    issues: list[ConfigIssue] = []
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix in MANIFEST_SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                suffixes = ", ".join(f"*{s}" for s in MANIFEST_SUFFIXES)
                issues.append(ConfigIssue(str(path), None, None, "", f"no {suffixes} files"))
            files += found
        elif path.exists():
            files.append(path)
        else:
            issues.append(ConfigIssue(str(path), None, None, "", "no such file or directory"))
    sources: list[tuple[str, str]] = []
    for file in files:
        try:
            sources.append((str(file), file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            issues.append(ConfigIssue(str(file), None, None, "", f"cannot read: {exc}"))
    if issues:
        raise ConfigError(issues)
    return sources
