"""Rendering charts/kquant with a real Helm engine, shared by the chart and RBAC tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")

CHART = Path(__file__).resolve().parents[1] / "charts" / "kquant"
NAMESPACE = "kquant-system"


def render(values: dict[str, Any] | None = None, name: str = "kquant") -> list[dict[str, Any]]:
    """The chart's manifests (NOTES.txt left out) for ``values``, parsed."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name=name, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    """Every (apiGroup, resource, verb) a Role or ClusterRole grants."""
    return {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
