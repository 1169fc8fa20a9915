"""Lints the Sluice chart, renders it with every values file in helm/ci/, and validates each
rendered manifest against the Kubernetes schemas (kubernetes-validate). KEDA's ScaledObject is
not a Kubernetes type: it is checked against the subset of KEDA's CRD schema in
helm/ci/keda-scaledobject.schema.json. Also checks that a release without Postgres is refused.

Usage: python helm/ci/check.py   (scripts/test runs it with the tools' virtualenv)
"""

import json
import pathlib
import sys

import helm_python
import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "sluice"
KUBERNETES_VERSION = "1.30.0"
KEDA_SCHEMA = json.loads((ROOT / "ci" / "keda-scaledobject.schema.json").read_text())


def fail(message):
    print(f"helm check: {message}", file=sys.stderr)
    sys.exit(1)


def check(values_file):
    values = yaml.safe_load(values_file.read_text()) or {}
    lint = helm_python.lint(str(CHART), values, strict=True, kube_version=KUBERNETES_VERSION)
    if lint["errors"]:
        fail(f"{values_file.name}: lint errors: {lint['errors']}")
    # Severity 1 is informational ("icon is recommended"); warnings and errors are not.
    serious = [m for m in lint["messages"] if m["severity"] > 1]
    if serious:
        fail(f"{values_file.name}: lint messages: {serious}")
    chart = helm_python.Chart.load(str(CHART))
    rendered = chart.render(values=values, name="sluice", namespace="sluice", is_install=True)
    kinds = []
    for path, text in sorted(rendered.items()):
        if not path.endswith(".yaml"):
            continue
        for manifest in yaml.safe_load_all(text):
            if not manifest:
                continue
            kind = f"{manifest['apiVersion']}/{manifest['kind']}"
            kinds.append(manifest["kind"])
            if manifest["apiVersion"].startswith("keda.sh/"):
                try:
                    jsonschema.validate(manifest, KEDA_SCHEMA)
                except jsonschema.ValidationError as error:
                    fail(f"{values_file.name}: {path}: {kind}: {error.message}")
                continue
            try:
                kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                fail(f"{values_file.name}: {path}: {kind} {manifest['metadata']['name']}: {error.message}")
    return kinds


def main():
    for values_file in sorted((ROOT / "ci").glob("*.yaml")):
        kinds = check(values_file)
        summary = ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds)))
        print(f"helm check: {values_file.name}: lint clean; {len(kinds)} manifests valid for Kubernetes {KUBERNETES_VERSION} ({summary})")
    try:
        helm_python.Chart.load(str(CHART)).render(values={}, name="sluice", namespace="sluice", is_install=True)
    except helm_python.HelmError as error:
        print(f"helm check: without Postgres the chart refuses to render: {str(error).splitlines()[0][:160]}")
    else:
        fail("a release without postgres.url or postgres.existingSecret rendered")


if __name__ == "__main__":
    main()
