"""Validate deploy/*.yaml offline, against the real schemas (no cluster can run here).

Kubernetes' own kinds (Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget) go through
``kubernetes-validate``, which carries Kubernetes' JSON schemas, in strict mode (an unknown field is
an error). KServe's kinds (ServingRuntime, InferenceService) go through the API models KServe
generates from its own OpenAPI spec, in the ``kserve`` SDK from PyPI (and the ``kubernetes``
client's models for the pod fields they embed): every field must be one the model has, of its
type. Usage: python tools/validate_deploy.py [--sdk DIR] [FILE ...]; exit 1 on any error.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import types
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.33.0"
KSERVE_KINDS = {"ServingRuntime": "V1alpha1ServingRuntime", "ClusterServingRuntime": "V1alpha1ClusterServingRuntime",
                "InferenceService": "V1beta1InferenceService"}


def _package(name: str, root: Path) -> None:
    """Import a package's submodules without running its ``__init__`` (the kserve SDK's starts a
    model server's imports; the kubernetes client's needs OAuth libraries): only the models are used."""
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(root / name.replace(".", "/"))]
    sys.modules[name] = pkg


def load_models(sdk: Path) -> dict[str, Any]:
    sys.path.insert(0, str(sdk))
    for name in ("kserve", "kubernetes", "kubernetes.client"):
        _package(name, sdk)
    ks = importlib.import_module("kserve.models")
    km = importlib.import_module("kubernetes.client.models")
    found = {n: c for n, c in vars(ks).items() if isinstance(c, type) and hasattr(c, "openapi_types")}
    for name in getattr(km, "__all__", []):  # the kubernetes client loads its models lazily
        if name.startswith("V1") and name not in found:
            found[name] = _Lazy(km, name)
    return found


class _Lazy:
    def __init__(self, module: Any, name: str):
        self.module, self.name = module, name

    def __getattr__(self, attr: str) -> Any:
        return getattr(getattr(self.module, self.name), attr)


def check(value: Any, kind: str, models: dict[str, Any], where: str, errors: list[str]) -> None:
    """``value`` (parsed YAML) against the generated model type ``kind`` (e.g. ``list[V1Container]``)."""
    if value is None:
        return
    m = re.fullmatch(r"[lL]ist\[(.+)\]", kind)
    if m:
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__}")
            return
        for i, v in enumerate(value):
            check(v, m.group(1), models, f"{where}[{i}]", errors)
        return
    m = re.fullmatch(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])", kind)
    if m:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a map, got {type(value).__name__}")
            return
        for k, v in value.items():
            check(v, m.group(1) or m.group(2), models, f"{where}.{k}", errors)
        return
    simple = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str, "date": str}
    if kind in simple:
        ok = isinstance(value, simple[kind]) and not (kind in ("int", "float") and isinstance(value, bool))
        if not ok:
            errors.append(f"{where}: expected {kind}, got {value!r}")
        return
    if kind == "object":
        return  # IntOrString, Quantity, free-form
    cls = models.get(kind)
    if cls is None:
        errors.append(f"{where}: the schema names an unknown type {kind}")
        return
    if not isinstance(value, dict):
        errors.append(f"{where}: expected an object ({kind}), got {type(value).__name__}")
        return
    by_json = {j: a for a, j in cls.attribute_map.items()}
    for key, v in value.items():
        if key not in by_json:
            errors.append(f"{where}: unknown field {key!r} in {kind} (it has: {', '.join(sorted(by_json))})")
            continue
        check(v, cls.openapi_types[by_json[key]], models, f"{where}.{key}", errors)


def validate(path: Path, models: dict[str, Any] | None) -> list[str]:
    import kubernetes_validate

    errors: list[str] = []
    for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d):
        where = f"{path.name}[{i}] {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        if doc.get("kind") in KSERVE_KINDS:
            if models is None:
                errors.append(f"{where}: no KServe SDK to validate against (--sdk DIR)")
                continue
            if not str(doc.get("apiVersion", "")).startswith("serving.kserve.io/"):
                errors.append(f"{where}: apiVersion {doc.get('apiVersion')} is not serving.kserve.io")
            check(doc, KSERVE_KINDS[doc["kind"]], models, where, errors)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{where}: no schema for it ({e})")
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, default=sorted((ROOT / "deploy").glob("*.yaml")))
    ap.add_argument("--sdk", type=Path, default=ROOT / "build" / "kserve-sdk",
                    help="where the kserve and kubernetes SDKs were installed (make validate-deploy does it)")
    a = ap.parse_args(argv)
    models = load_models(a.sdk) if (a.sdk / "kserve").is_dir() else None
    errors = [e for f in a.files for e in validate(f, models)]
    for e in errors:
        print(f"ERROR {e}")
    print(f"{len(a.files)} files: {'valid' if not errors else f'{len(errors)} errors'} (Kubernetes {K8S_VERSION} "
          f"schemas, strict; KServe API models{'' if models else ': missing'})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
