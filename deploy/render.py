#!/usr/bin/env python3
"""Render the llm-proxy Helm chart into plain Kubernetes manifests.

    .venv/bin/python deploy/render.py            # rewrite deploy/kubernetes/llm-proxy.yaml
    .venv/bin/python deploy/render.py --check    # exit 1 if the file is out of date
    .venv/bin/python deploy/render.py -f my-values.yaml --stdout

Rendering uses Helm 4 as a library (PyPI ``helm-python-sdk``, import name
``helm_python``): no ``helm`` binary, cluster or network is needed.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY_DIR = Path(__file__).resolve().parent
CHART_DIR = DEPLOY_DIR / "helm" / "llm-proxy"
OUTPUT = DEPLOY_DIR / "kubernetes" / "llm-proxy.yaml"
RELEASE_NAME = "llm-proxy"
# Only used for .Release.Namespace (NOTES); the templates set no namespace so
# the plain manifests can be applied to any namespace.
RELEASE_NAMESPACE = "default"

# Apply order for the kinds this chart can produce (dependencies first).
KIND_ORDER = [
    "NetworkPolicy",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "PersistentVolumeClaim",
    "Service",
    "Deployment",
    "HorizontalPodAutoscaler",
    "Job",
    "Ingress",
]

HEADER = """\
# GENERATED FILE - do not edit by hand.
# Rendered from deploy/helm/llm-proxy with its default values by
#   .venv/bin/python deploy/render.py
# Apply with `kubectl apply -k deploy/kubernetes -n <namespace>`.
"""

_DOC_SEPARATOR = re.compile(r"^---[ \t]*$", re.MULTILINE)


def render_chart(
    values: dict[str, Any] | None = None,
    *,
    name: str = RELEASE_NAME,
    namespace: str = RELEASE_NAMESPACE,
    chart_dir: Path = CHART_DIR,
) -> dict[str, str]:
    """Render the chart offline; returns {template path: rendered text}."""
    try:
        import helm_python
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "deploy/render.py needs the 'helm-python-sdk' package (import helm_python); "
            "install the project's dev requirements"
        ) from exc
    with helm_python.Chart.load(chart_dir) as chart:
        return chart.render(values, name=name, namespace=namespace, is_install=True)


def documents(rendered: dict[str, str]) -> list[tuple[str, str, dict[str, Any]]]:
    """Split rendered templates into (source, text, parsed) manifests.

    NOTES.txt and empty documents are dropped; the result is in apply order
    (by kind, then source, then name) so the output is stable.
    """
    docs: list[tuple[str, str, dict[str, Any]]] = []
    for source, text in rendered.items():
        if source.endswith("NOTES.txt"):
            continue
        for chunk in _DOC_SEPARATOR.split(text):
            body = chunk.strip("\n")
            parsed = yaml.safe_load(body) if body.strip() else None
            if not parsed:
                continue
            if not isinstance(parsed, dict) or "kind" not in parsed:
                raise ValueError(f"{source}: rendered document is not a Kubernetes object")
            docs.append((source, body.rstrip() + "\n", parsed))

    def key(item: tuple[str, str, dict[str, Any]]) -> tuple[int, str, str]:
        source, _, obj = item
        kind = obj["kind"]
        rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
        return rank, source, obj.get("metadata", {}).get("name", "")

    return sorted(docs, key=key)


def plain_manifests(values: dict[str, Any] | None = None) -> str:
    """The text of deploy/kubernetes/llm-proxy.yaml for the given values."""
    parts = [HEADER]
    for source, body, _ in documents(render_chart(values)):
        parts.append(f"---\n# Source: {source}\n{body}")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the output file is out of date")
    parser.add_argument("--stdout", action="store_true", help="print instead of writing the file")
    parser.add_argument("-f", "--values", type=Path, action="append", default=[], help="values file (repeatable)")
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)

    values: dict[str, Any] = {}
    for path in args.values:
        loaded = yaml.safe_load(path.read_text()) or {}
        values = _deep_merge(values, loaded)
    text = plain_manifests(values or None)

    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current == text:
            return 0
        sys.stderr.writelines(
            difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                str(args.output),
                "fresh render",
            )
        )
        sys.stderr.write(f"\n{args.output} is out of date: run .venv/bin/python deploy/render.py\n")
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


if __name__ == "__main__":
    sys.exit(main())
