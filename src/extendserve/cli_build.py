"""``extendserve build`` and ``demo``: a base and heads -> one verified model folder (and store version).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .cli_common import absolute, base_from_args, save_and_say, store_name_for, warn_if_takes_world, weights_settings
from .errors import ExtendserveError


def cmd_build(a: argparse.Namespace) -> int:
    from .export import build_model, output_dir
    from .head import load_head

    recorded = None
    if a.from_manifest:
        recorded = settings_from_manifest(a)
    if a.output is None:
        raise ExtendserveError("give the model folder to write with -o DIR (for example -o models/celebs); build "
                               "never writes a default folder, so the demo in models/default is not replaced by accident")
    output_dir(a.output)  # refused now, before any work, if it is not a folder a build may replace
    before = previous_model(a.output)
    name = store_name_for(a)
    classes = a.classes or []
    if classes and len(classes) != len(a.new_head or []):
        raise ExtendserveError("give one --classes FILE per --new-head, in the same order (or none)")
    t0 = time.time()
    base = base_from_args(a)
    heads = []
    for i, path in enumerate(a.new_head or []):
        h = load_head(path, classes[i] if classes else None, backbone=base.name)
        h.check_fits(base.name, base.feature_dim, base.digest, force=a.force)
        h.check_identity(base.identity())
        if recorded is not None and h.digest() != recorded["heads"][i + 1]["digest"]:
            raise ExtendserveError(f"{path} changed since {a.from_manifest} was built (its digest differs); "
                                   "restore that head file, or build afresh with --new-head")
        heads.append(h)
    real = demo_pixels(base.preprocess)
    manifest = build_model(base, heads, a.output, real_inputs=real,
                           settings={"backbone": a.backbone, "new_head": [absolute(p) for p in a.new_head or []],
                                     "classes": [absolute(p) for p in classes], "force": a.force,
                                     **weights_settings(a)})
    v = manifest["verification"]
    k = len(base.labels)
    print(f"built {a.output}: {len(manifest['labels'])} classes "
          f"({k} of base {base.name} + {len(manifest['labels']) - k} new) in {time.time() - t0:.1f}s")
    same = "identical" if v["base_identical"] else f"max |diff| {v['base_max_abs_diff']:.1e}"
    torch_line = (f"; against the original torch model {v['imagenet_max_rel_diff']:.1e} of the logits' size"
                  if "imagenet_max_rel_diff" in v else "")
    print(f"verified on {v['inputs']} inputs: base logits vs the base alone {same}{torch_line}; new logits "
          f"{v['new_max_rel_diff']:.1e} (tolerance {v['tolerance']:.0e}); top-1 and new-class decisions identical")
    for h in manifest["heads"][1:]:
        if h.get("background_taken") is None:
            print(f"head {h['name']}: share of the base's background taken not measured "
                  f"({'no background for this base' if not h.get('background') else 'fine-tuned top'})")
            continue
        held = (h.get("heldout") or {}).get("background_taken")
        print(f"head {h['name']}: names {h['background_taken']:.1%} of the base's background photos as its classes "
              + (f"(in sample; held-out estimate at train-head: {held:.1%})" if held is not None else "(in sample)"))
        warn_if_takes_world(max(h["background_taken"], held or 0.0), "the")
    if before:
        print(f"replaced {a.output}: {before} -> {describe_model(manifest)}")
    save_and_say(a, name)
    if recorded is not None:
        same = manifest["model_sha256"] == recorded.get("model_sha256")
        print(f"rebuilt from {a.from_manifest}: model.onnx is "
              + ("byte-identical to the recorded one" if same else "NOT identical to the recorded one"))
        if not same:
            return 1
    return 0


def describe_model(manifest: dict[str, Any]) -> str:
    heads = ", ".join(f"{h['name']} ({h['count']})" for h in manifest["heads"])
    return f"heads {heads}, sha256 {manifest['model_sha256'][:12]}"


def previous_model(out: str) -> str | None:
    """What a build into ``out`` replaces, in a few words (None: nothing)."""
    try:
        return describe_model(json.loads((Path(out) / "manifest.json").read_text("utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def settings_from_manifest(a: argparse.Namespace) -> dict[str, Any]:
    """Fill ``a`` from a manifest's recorded settings (for ``build --from``); returns the manifest."""
    path = Path(a.from_manifest)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        m = json.loads(path.read_text("utf-8"))
        st = m["settings"]
        a.backbone, a.new_head, a.classes, a.force = st["backbone"], st["new_head"], st["classes"], st["force"]
        a.weights, a.restore, a.exclude = st.get("weights"), st.get("restore", "all"), st.get("exclude", [])
        a.base, a.preprocess, a.labels = st.get("base"), st.get("preprocess"), st.get("labels")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExtendserveError(f"{path}: not a manifest extendserve can rebuild from ({e})") from None
    if st.get("demo"):
        raise ExtendserveError(f"{path}: the demo model is rebuilt with: extendserve demo")
    if a.output is None:
        a.output = str(path.parent)
    return m


def demo_pixels(cfg: Any) -> list[Any]:
    """Real photos for the build's verification: the demo photos that ship in PyPI packages."""
    from .demo import demo_photos
    from .preprocess import prepare_file

    return [prepare_file(p, cfg) for p in demo_photos().values()]


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import build_demo
    from .export import output_dir

    output_dir(a.output)
    name = store_name_for(a)
    build_demo(a.output)
    print(f"built the demo model in {a.output}")
    save_and_say(a, name)
    return 0
