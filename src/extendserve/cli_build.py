"""``extendserve build`` and ``demo``: a base and heads -> one verified model folder (and store version).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .cli_common import absolute, base_from_args, say_saved, store_name_for, warn_if_takes_world, weights_settings
from .errors import ExtendserveError
from .manifest import Manifest


def cmd_build(a: argparse.Namespace) -> int:
    from .build import build_model
    from .publish import output_dir, publish

    recorded = settings_from_manifest(a) if a.from_manifest else None
    if a.output is None:
        raise ExtendserveError("give the model folder to write with -o DIR (for example -o models/celebs); build "
                               "never writes a default folder, so the demo in models/default is not replaced by accident")
    out = output_dir(a.output)  # refused now, before any work, if it is not a folder a build may replace
    before = out.previous()
    name = store_name_for(a)
    classes = a.classes or []
    if classes and len(classes) != len(a.new_head or []):
        raise ExtendserveError("give one --classes FILE per --new-head, in the same order (or none)")
    t0 = time.time()
    base = base_from_args(a)
    heads = _load_heads(a, base, classes, recorded)
    built = build_model(base, heads, real_inputs=demo_pixels(base.preprocess),
                        settings={"backbone": a.backbone, "new_head": [absolute(p) for p in a.new_head or []],
                                  "classes": [absolute(p) for p in classes], "force": a.force, **weights_settings(a)},
                        cpu_precision=a.cpu_precision)
    tag = publish(built, out, name)
    manifest = built.manifest
    k = manifest.base_count
    print(f"built {a.output}: {len(manifest.labels)} classes "
          f"({k} of base {base.name} + {len(manifest.labels) - k} new) in {time.time() - t0:.1f}s")
    _print_verification(manifest)
    if before:
        print(f"replaced {a.output}: {before.describe()} -> {manifest.describe()}")
    say_saved(tag)
    if recorded is not None:
        same = manifest.model_sha256 == recorded.model_sha256
        print(f"rebuilt from {a.from_manifest}: model.onnx is "
              + ("byte-identical to the recorded one" if same else "NOT identical to the recorded one"))
        if not same:
            return 1
    return 0


def _load_heads(a: argparse.Namespace, base: Any, classes: list[str], recorded: Manifest | None) -> list[Any]:
    """The head files, each checked against the base (and with --from, against the recorded digest)."""
    from .head import load_head

    heads = []
    for i, path in enumerate(a.new_head or []):
        h = load_head(path, classes[i] if classes else None, backbone=base.name)
        h.check_fits(base.name, base.feature_dim, base.digest, force=a.force)
        h.check_identity(base.identity())
        if recorded is not None and h.digest() != recorded.heads[i + 1].digest:
            raise ExtendserveError(f"{path} changed since {a.from_manifest} was built (its digest differs); "
                                   "restore that head file, or build afresh with --new-head")
        heads.append(h)
    return heads


def _print_verification(manifest: Manifest) -> None:
    v = manifest.verification
    same = "identical" if v["base_identical"] else f"max |diff| {v['base_max_abs_diff']:.1e}"
    torch_line = (f"; against the original torch model {v['imagenet_max_rel_diff']:.1e} of the logits' size"
                  if "imagenet_max_rel_diff" in v else "")
    print(f"verified on {v['inputs']} inputs: base logits vs the base alone {same}{torch_line}; new logits "
          f"{v['new_max_rel_diff']:.1e} (tolerance {v['tolerance']:.0e}); top-1 and new-class decisions identical")
    for h in manifest.new_heads:
        if h.background_taken is None:
            print(f"head {h.name}: share of the base's background taken not measured "
                  f"({'no background for this base' if not h.background else 'fine-tuned top'})")
            continue
        held = (h.heldout or {}).get("background_taken")
        print(f"head {h.name}: names {h.background_taken:.1%} of the base's background photos as its classes "
              + (f"(in sample; held-out estimate at train-head: {held:.1%})" if held is not None else "(in sample)"))
        warn_if_takes_world(max(h.background_taken, held or 0.0), "the")
    if "bf16" in v:
        b = v["bf16"]
        if b["runs_here"] != "bf16":
            print(f"bf16: this CPU ({b['cpu']}) has no bf16 instructions, so OpenVINO runs this model in f32 here and "
                  "what bf16 changes could not be measured; a CPU with AMX or AVX512_BF16 will serve it in bf16 "
                  "(build there to see the decisions it changes)")
        else:
            print(f"bf16: OpenVINO in bf16 changes {b['top1_changed']} of {b['inputs']} top-1 decisions against f32 "
                  f"on the verification inputs (max |logit diff| {b['max_abs_diff']:.2g}); served in bf16 where "
                  "faster (build without --cpu-precision to keep f32)")


def settings_from_manifest(a: argparse.Namespace) -> Manifest:
    """Fill ``a`` from a manifest's recorded settings (for ``build --from``); returns the manifest."""
    path = Path(a.from_manifest)
    if path.is_dir():
        path = path / "manifest.json"
    m = Manifest.read(path)
    st = m.settings
    try:
        a.backbone, a.new_head, a.classes, a.force = st["backbone"], st["new_head"], st["classes"], st["force"]
        a.weights, a.restore, a.exclude = st.get("weights"), st.get("restore", "all"), st.get("exclude", [])
        a.base, a.preprocess, a.labels = st.get("base"), st.get("preprocess"), st.get("labels")
        a.cpu_precision = m.cpu_precision
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
    from .publish import output_dir, publish

    out = output_dir(a.output)
    name = store_name_for(a)
    tag = publish(build_demo(), out, name)
    print(f"built the demo model in {a.output}")
    say_saved(tag)
    return 0
