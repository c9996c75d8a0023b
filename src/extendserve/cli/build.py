"""``extendserve build`` and ``demo``: a base and heads -> one verified model folder (and store version).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..building.manifest import Manifest
from ..building.store import store_name
from ..errors import ExtendserveError
from .common import (
    PREFIX,
    background_line,
    base_from_args,
    model_folder,
    say_saved,
    store_name_for,
    warn_if_takes_world,
    weights_settings,
)


def cmd_build(a: argparse.Namespace) -> int:
    from ..building.publish import build_lock, output_dir

    rebuild = model_to_rebuild(a) if a.from_model else None
    if a.drop_head and rebuild is None:
        raise ExtendserveError("--drop-head removes a head from a built model: give that model with --from DIR|TAG")
    if a.min_score is not None and not 0 <= a.min_score <= 1:
        raise ExtendserveError(f"--min-score is a score from 0 to 1 (0.5: 'unknown' below one chance in two), "
                               f"not {a.min_score}")
    if a.output is None:
        raise ExtendserveError("give the model folder to write with -o DIR (for example -o models/celebs); build "
                               "never writes a default folder, so the demo in models/default is not replaced by accident")
    out = output_dir(a.output)  # refused now, before any work, if it is not a folder a build may replace
    name = store_name_for(a)
    with build_lock(out, None if name is None else store_name(name)):  # one build at a time into a folder or name
        return _build(a, out, name, rebuild)


def _build(a: argparse.Namespace, out: Any, name: str | None, rebuild: Rebuild | None) -> int:
    from ..building.build import build_model
    from ..building.publish import publish

    before = out.previous()
    classes = a.classes or []
    if classes and len(classes) != len(a.new_head or []):
        raise ExtendserveError("give one --classes FILE per --new-head, in the same order (or none)")
    t0 = time.time()
    base = base_from_args(a)
    kept = rebuild.heads(base, a.force) if rebuild is not None else []
    heads = kept + [_load_head(path, classes[i] if classes else None, base, a.force)
                    for i, path in enumerate(a.new_head or [])]
    built = build_model(base, heads, real_inputs=demo_pixels(base.preprocess),
                        settings={"backbone": a.backbone, "force": a.force, **weights_settings(a)},
                        cpu_precision=a.cpu_precision or (rebuild.manifest.cpu_precision if rebuild else "f32"),
                        min_score=a.min_score if a.min_score is not None else (rebuild.manifest.min_score if rebuild else None))
    saved = publish(built, out, name)
    manifest = built.manifest
    k = manifest.base_count
    print(f"built {a.output}: {len(manifest.labels)} classes "
          f"({k} of base {base.name} + {len(manifest.labels) - k} new) in {time.time() - t0:.1f}s")
    _print_verification(manifest)
    if before:
        print(f"replaced {a.output}: {before.describe()} -> {manifest.describe()}")
    say_saved(saved)
    if rebuild is not None:
        return rebuild.report(manifest, [h.name for h in kept], [h.name for h in heads[len(kept):]], a.drop_head or [])
    return 0


def _load_head(path: str, classes: str | None, base: Any, force: bool) -> Any:
    """A head file, checked against the base it is built on."""
    from ..heads.head import load_head

    return _fits(load_head(path, classes, backbone=base.name), base, force)


def _fits(h: Any, base: Any, force: bool) -> Any:
    """``h``, checked against the base it is built on: features, weights, preprocessing, labels."""
    h.check_fits(base.name, base.feature_dim, base.digest, force=force)
    h.check_identity(base.identity())
    return h


@dataclass
class Rebuild:
    """A built model to rebuild from (``build --from``): its manifest, its folder (its heads live in
    ``heads/``), and the heads to leave out."""

    given: str
    folder: Path
    manifest: Manifest
    drop: list[str]

    def heads(self, base: Any, force: bool) -> list[Any]:
        """Its new heads but the dropped ones, read from the model itself (or, for a model built
        before heads travelled inside it, from the files its settings recorded), each checked
        against the digest recorded at build time."""
        from ..heads.head import load_head

        recorded = self.manifest.settings
        kept = []
        for i, entry in enumerate(self.manifest.new_heads):
            if entry.name in self.drop:
                continue
            if entry.file:
                path = self._inside(Path(entry.file), entry.name)
                if not path.is_file():
                    raise ExtendserveError(f"{self.given}: the model's head file {entry.file} is missing; restore the "
                                           "model folder, or give the head files again with --new-head")
                h = load_head(path, backbone=base.name)
            else:  # built before heads travelled inside models: only a recorded file inside the model is read
                try:
                    path, cls = Path(recorded["new_head"][i]), (recorded.get("classes") or [None] * (i + 1))[i]
                except (KeyError, IndexError, TypeError):
                    raise ExtendserveError(f"{self.given}: head {entry.name!r} has no file inside the model and none "
                                           "recorded; give it again with --new-head") from None
                path = self._inside(path, entry.name)
                cls = None if cls is None else self._inside(Path(str(cls)), entry.name)
                h = load_head(path, cls, backbone=base.name)
            if entry.digest not in (h.digest(), h.legacy_digest()):
                raise ExtendserveError(f"{path} changed since {self.given} was built (its digest differs); restore "
                                       "that head file, or build afresh with --new-head")
            h.source, h.name = entry.source, entry.name  # as recorded, so an unchanged rebuild is byte-identical
            kept.append(_fits(h, base, force))
        return kept

    def _inside(self, path: Path, head: str) -> Path:
        """``path`` (relative to the model folder) if it lies inside the model: a manifest is
        untrusted and may name any file on the machine; nothing outside the model is read."""
        resolved = (self.folder / path).resolve()
        if self.folder.resolve() not in resolved.parents:
            raise ExtendserveError(f"{self.given}: head {head!r} names a file outside the model folder ({path.name}), "
                                   "which is not read; give that head again with --new-head FILE")
        return resolved

    def report(self, built: Manifest, kept: list[str], added: list[str], dropped: list[str]) -> int:
        """What the rebuild changed; an unchanged rebuild must be byte-identical (exit 1 if not)."""
        if added or dropped:
            print(f"rebuilt from {self.given}: kept {', '.join(kept) or 'no head'}"
                  + (f"; added {', '.join(added)}" if added else "") + (f"; dropped {', '.join(dropped)}" if dropped else ""))
            return 0
        same = built.model_sha256 == self.manifest.model_sha256
        print(f"rebuilt from {self.given}: model.onnx is "
              + ("byte-identical to the recorded one" if same else "NOT identical to the recorded one"))
        return 0 if same else 1


def model_to_rebuild(a: argparse.Namespace) -> Rebuild:
    """Fill ``a`` from the settings recorded in the model ``--from`` names (a folder, its
    manifest.json, or a store tag); other options add (--new-head) or remove (--drop-head) heads."""
    folder, tag = model_folder(a.from_model, "--from")
    m = Manifest.read(folder / "manifest.json")
    st = m.settings
    names = [h.name for h in m.new_heads]
    unknown = [d for d in a.drop_head or [] if d not in names]
    if unknown:
        raise ExtendserveError(f"--drop-head {unknown[0]}: {a.from_model} has no head of that name; its heads are "
                               f"{', '.join(names)}")
    if st.get("demo") and not (a.new_head or a.drop_head):
        raise ExtendserveError(f"{a.from_model}: the demo model is rebuilt with: extendserve demo")
    try:
        a.backbone = st.get("backbone") or m.backbone["name"]
        a.force = bool(st.get("force", a.force))
        a.weights, a.restore, a.exclude = st.get("weights"), st.get("restore", "all"), st.get("exclude", [])
        a.base, a.preprocess, a.labels = st.get("base"), st.get("preprocess"), st.get("labels")
    except (KeyError, TypeError) as e:
        raise ExtendserveError(f"{folder}: not a model extendserve can rebuild from ({e})") from None
    if a.output is None:
        if tag is not None:
            raise ExtendserveError(f"--from {a.from_model}: give the folder to write with -o, for example: "
                                   f"extendserve build --from {a.from_model} -o models/{tag.split(':')[0].removeprefix(PREFIX)}")
        a.output = str(folder)
    if tag is not None and not a.name:
        a.name = tag.split(":")[0].removeprefix(PREFIX)  # a new version of the same store model
    return Rebuild(a.from_model, folder, m, list(a.drop_head or []))


def _print_verification(manifest: Manifest) -> None:
    v = manifest.verification
    same = "identical" if v["base_identical"] else f"max |diff| {v['base_max_abs_diff']:.1e}"
    torch_line = (f"; against the original torch model {v['imagenet_max_rel_diff']:.1e} of the logits' size"
                  if "imagenet_max_rel_diff" in v else "")
    print(f"verified on {v['inputs']} inputs: base logits vs the base alone {same}{torch_line}; new logits "
          f"{v['new_max_rel_diff']:.1e} (tolerance {v['tolerance']:.0e}); top-1 and new-class decisions identical")
    together = v.get("background_taken_together")
    for h in manifest.new_heads:
        held = (h.heldout or {}).get("background_taken")
        if held is not None:  # the figure train-head printed, measured the same way
            print(f"head {h.name}: " + background_line("it names", held, h.heldout.get("background_photos", 0),
                                                       "as one of its classes: held out, measured at train-head"))
            warn_if_takes_world(held, "the held-out", f"head {h.name}")
        elif h.background_taken is None:
            print(f"head {h.name}: share of the base's background taken not measured "
                  f"({'no background for this base' if not h.background else 'fine-tuned top'})")
        else:
            print(f"head {h.name}: " + background_line("it names", h.background_taken, together["photos"] if together else 0,
                                                       "as one of its classes: in sample (trained before held-out figures)"))
    if together is not None and len(manifest.new_heads) > 1:
        print(background_line("the heads together name", together["taken"], together["photos"],
                              "as one of their classes: in sample (each head was fitted against them)"))
        warn_if_takes_world(together["taken"], "the", "this model's heads together")
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


def demo_pixels(cfg: Any) -> list[Any]:
    """Real photos for the build's verification: the demo photos that ship in PyPI packages."""
    from ..building.demo import demo_photos
    from ..photos.preprocess import prepare_file

    return [prepare_file(p, cfg) for p in demo_photos().values()]


def cmd_demo(a: argparse.Namespace) -> int:
    from ..building.demo import build_demo
    from ..building.publish import build_lock, output_dir, publish

    out = output_dir(a.output)
    name = store_name_for(a)
    with build_lock(out, None if name is None else store_name(name)):
        tag = publish(build_demo(), out, name)
    print(f"built the demo model in {a.output}")
    say_saved(tag)
    return 0
