"""Pydantic JSON schemas as Kubernetes *structural* OpenAPI v3 schemas.

The rules (https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/
custom-resource-definitions/#specifying-a-structural-schema): a ``type`` on every node, no
``$ref``, no ``anyOf``/``oneOf``/``allOf`` of different types (only ``x-kubernetes-int-or-string``
may use ``anyOf``), ``additionalProperties`` never beside ``properties`` and never a boolean,
no ``default: null``. Pydantic's ``Optional`` (``anyOf: [X, {type: null}]``) becomes ``X``: the
API server then prunes nulls, which matches pydantic's "None means unset".
"""

from __future__ import annotations

from typing import Any

# Keywords a structural schema may carry here; anything else fails generation loudly.
_KEYWORDS = {
    "type", "description", "properties", "required", "items", "additionalProperties", "enum",
    "default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
    "maxLength", "pattern", "minItems", "maxItems", "nullable", "anyOf",
}  # fmt: skip
# Emitted key order, for a readable file: what a field is first, then what it holds.
_ORDER = (
    "type", "description", "format", "enum", "default", "minimum", "exclusiveMinimum",
    "maximum", "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
    "required", "properties", "items", "additionalProperties", "anyOf",
)  # fmt: skip


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema (with ``$defs``) as a Kubernetes structural schema.

    Raises ValueError on a construct Kubernetes cannot take (a union of two real types, an
    unknown keyword) or on a property without a description.
    """
    defs = schema.get("$defs", {})
    root = {k: v for k, v in schema.items() if k != "$defs"}
    return _walk(root, defs, "")


def _walk(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    node = dict(node)
    if "$ref" in node:  # field keywords (description, default) win over the target's
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}
    for key in ("anyOf", "allOf", "oneOf"):
        options = [o for o in node.get(key, []) if o != {"type": "null"}]
        if key in node and not node.get("x-kubernetes-int-or-string"):
            if len(options) != 1:
                raise ValueError(f"{path or '<root>'}: {key} of several types is not structural")
            del node[key]
            node = {**options[0], **node}
            return _walk(node, defs, path)
    node.pop("title", None)
    if "default" in node and node["default"] is None:
        del node["default"]
    if node.get("additionalProperties") is True:  # dict[str, Any]: kept as given
        del node["additionalProperties"]
        node["x-kubernetes-preserve-unknown-fields"] = True
    elif node.get("additionalProperties") is False:  # extra="forbid": the API server prunes
        del node["additionalProperties"]
    if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(
        node["exclusiveMinimum"], bool
    ):  # JSON Schema 2020 number -> OpenAPI 3.0 boolean form
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if isinstance(node.get("exclusiveMaximum"), (int, float)) and not isinstance(
        node["exclusiveMaximum"], bool
    ):
        node["maximum"], node["exclusiveMaximum"] = node["exclusiveMaximum"], True
    unknown = {k for k in node if k not in _KEYWORDS and not k.startswith("x-kubernetes-")}
    if unknown:
        raise ValueError(f"{path or '<root>'}: unsupported schema keywords {sorted(unknown)}")
    if "properties" in node:
        props = {}
        for name, sub in node["properties"].items():
            if not sub.get("description"):
                raise ValueError(f"{path}.{name}: no description (every field needs one)")
            props[name] = _walk(sub, defs, f"{path}.{name}")
        node["properties"] = props
    if isinstance(node.get("items"), dict):
        node["items"] = _walk(node["items"], defs, f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _walk(node["additionalProperties"], defs, f"{path}{{}}")
    return node


def ordered(node: Any) -> Any:
    """A deep copy with schema keys in _ORDER (x-kubernetes-* last); property names and
    rule lists keep their order."""
    if isinstance(node, list):
        return [ordered(n) for n in node]
    if not isinstance(node, dict):
        return node
    rank = {k: i for i, k in enumerate(_ORDER)}
    keys = sorted(node, key=lambda k: (rank.get(k, len(_ORDER)), list(node).index(k)))
    out = {}
    for key in keys:
        value = node[key]
        if key == "properties":
            out[key] = {name: ordered(sub) for name, sub in value.items()}
        else:
            out[key] = ordered(value)
    return out
