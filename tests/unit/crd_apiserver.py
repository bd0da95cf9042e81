"""A small stand-in for the API server admitting a custom resource against a CRD schema, so the
tests can check manifests without a cluster.

Steps in the apiextensions-apiserver's order: nulls of non-nullable fields pruned, defaults
applied, the OpenAPI schema validated (with kubectl's default strict field validation: unknown
fields are errors), then every CEL ``x-kubernetes-validations`` rule evaluated with ``self``
bound to the value at the node that carries the rule. CEL runs on cel-python (``celpy``), whose
``matches`` uses RE2 as Kubernetes does.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from celpy import celtypes

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "quantizationjob.yaml"


def load_schema(path: Path = CRD_PATH) -> dict[str, Any]:
    """The openAPIV3Schema of the (single) version of the CRD at ``path``."""
    crd = yaml.safe_load(path.read_text(encoding="utf-8"))
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _children(value: Any, schema: dict[str, Any]) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(key, child value, child schema) for each child of ``value`` that has a schema."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield str(key), child, sub
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, child in enumerate(value):
            yield f"[{i}]", child, schema["items"]


def prune_nulls(value: Any, schema: dict[str, Any]) -> None:
    """Drop ``null`` values of fields that are not ``nullable`` (in place)."""
    for key, child, sub in list(_children(value, schema)):
        if child is None and not sub.get("nullable") and isinstance(value, dict):
            del value[key]
        else:
            prune_nulls(child, sub)


def apply_defaults(value: Any, schema: dict[str, Any]) -> None:
    """Fill absent fields that have a ``default``, where their parent exists (in place)."""
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
    for _, child, sub in _children(value, schema):
        apply_defaults(child, sub)


def to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3.0 structural schema as JSON Schema Draft 7: ``x-kubernetes-*`` dropped,
    ``nullable`` as a null type, boolean exclusive bounds as numbers, unknown fields refused
    unless ``x-kubernetes-preserve-unknown-fields``."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_jsonschema(value)
        elif key == "anyOf":
            out[key] = [to_jsonschema(sub) for sub in value]
        else:
            out[key] = value
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(bound) is True:
            out[bound] = out.pop(limit)
        elif out.get(bound) is False:
            del out[bound]
    if node.get("nullable"):
        out["type"] = [out["type"], "null"]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def schema_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """OpenAPI validation errors as ``field.path: message``."""
    validator = jsonschema.Draft7Validator(to_jsonschema(schema))
    errors = []
    for err in sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path)):
        where = ".".join([path, *(str(p) for p in err.absolute_path)] if path else
                         [str(p) for p in err.absolute_path])  # fmt: skip
        errors.append(f"{where or '<root>'}: {err.message}")
    return errors


@functools.cache
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Messages of the CEL rules that ``value`` breaks, each as ``field.path: message``."""
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        result = _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        if not isinstance(result, celtypes.BoolType):  # CELEvalError: a broken rule
            errors.append(f"{path}: rule {rule['rule']!r} did not evaluate: {result!r}")
        elif not result:
            errors.append(f"{path}: Invalid value: {rule['message']}")
    for key, child, sub in _children(value, schema):
        where = f"{path}{key}" if key.startswith("[") else f"{path}.{key}" if path else key
        errors += cel_errors(child, sub, where)
    return errors


def admit(doc: dict[str, Any], schema: dict[str, Any] | None = None) -> list[str]:
    """Errors the API server would answer for creating ``doc``; empty when admitted."""
    schema = schema if schema is not None else load_schema()
    obj = copy.deepcopy(doc)
    prune_nulls(obj, schema)
    apply_defaults(obj, schema)
    errors = schema_errors(obj, schema)
    # A value of the wrong shape would only make the rules fail to evaluate.
    return errors or cel_errors(obj, schema)


def rules(
    schema: dict[str, Any], path: str = ""
) -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    """(field path, schema node, rule) for every CEL rule in ``schema``."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, schema, rule
    for name, sub in schema.get("properties", {}).items():
        yield from rules(sub, f"{path}.{name}" if path else name)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from rules(schema[key], f"{path}[]")


SELF_FIELDS = re.compile(r"\bself((?:\.[A-Za-z_]\w*)+)")


def unknown_references(node: dict[str, Any], rule: str) -> list[str]:
    """``self.a.b`` references in ``rule`` that name no field of ``node``'s schema (what the
    API server's type check of a rule refuses), skipping CEL methods such as startsWith."""
    bad = []
    for match in SELF_FIELDS.finditer(rule):
        names = match.group(1)[1:].split(".")
        if rule[match.end() :].startswith("("):  # a method on the value: self.startsWith(...)
            names = names[:-1]
        sub = node
        for name in names:
            if name not in sub.get("properties", {}):
                bad.append(match.group(0))
                break
            sub = sub["properties"][name]
    return bad


def structural_violations(node: dict[str, Any], path: str = "<root>") -> list[str]:
    """What the apiextensions structural-schema check (and our own rule, a description on
    every field) would refuse in ``node`` and below."""
    found = []
    int_or_string = node.get("x-kubernetes-int-or-string")
    for key in ("$ref", "oneOf", "allOf", "not", "title", "$defs"):
        if key in node:
            found.append(f"{path}: {key}")
    if "anyOf" in node and not int_or_string:
        found.append(f"{path}: anyOf")
    if "type" not in node and not int_or_string:
        found.append(f"{path}: no type")
    if "default" in node:
        if node["default"] is None:
            found.append(f"{path}: default null")
        found += schema_errors(node["default"], node, f"{path}.default")
    extra = node.get("additionalProperties")
    if extra is not None and (not isinstance(extra, dict) or "properties" in node):
        found.append(f"{path}: additionalProperties {extra!r} beside properties or not a schema")
    for key in node.get("x-kubernetes-list-map-keys", []):
        if key not in node["items"].get("required", []):
            found.append(f"{path}: list-map key {key} not required")
    for name, sub in node.get("properties", {}).items():
        if path == "<root>" and name == "metadata":
            if sub != {"type": "object"}:
                found.append("metadata: anything but type: object is forbidden")
            continue
        if not sub.get("description"):
            found.append(f"{path}.{name}: no description")
        found += structural_violations(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            found += structural_violations(node[key], f"{path}[{key}]")
    return found
