"""extendserve: teach a pretrained image classifier new classes without forgetting the old ones,
and serve the result.

  extendserve train-head PHOTOS/ -o head.pt      a head for the classes in PHOTOS/<class>/
  extendserve build --new-head head.pt -o DIR     base + heads -> one verified ONNX model
  extendserve predict --model DIR photo.jpg       classify photos (onnxruntime, no torch)
"""

# Heavy imports (torch) happen inside the commands that need them, so predict stays torch-free
# and every command starts fast.

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ExtendserveError

DEFAULT_MODEL_DIR = os.environ.get("EXTENDSERVE_MODEL_DIR", "models/default")


def err(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- train-head


def _negatives_and_world(a: argparse.Namespace, base: Any, fx: Any) -> tuple[Any, Any]:
    """Features of ``--negatives`` (or None) and the base's world the head is judged against."""
    from .preprocess import list_images
    from .world import background_for

    neg = None
    if a.negatives:
        nds = list_images(a.negatives) if Path(a.negatives).is_dir() else []
        if not nds:
            raise ExtendserveError(f"--negatives {a.negatives}: not a folder with photos")
        neg, _, nhits = fx.extract(nds, on_skip=lambda p, why: err(f"skipped negative {p}: {why}"))
        err(f"negatives: {len(neg)} photos ({nhits} cached)")
    world = background_for(base, None if neg is None else neg[:, 0])  # judged against it, whatever the method
    if a.method == "calibrated":
        if world is None:
            err("WARNING: no background for this base: the head cannot be judged against anything the base "
                "knows, so its gate comes from the new photos alone and it may take photos of other kinds. "
                "Give photos of everyday things that are none of the new classes with --negatives DIR")
        else:
            err(f"background: {world.source} ({len(world)} photos)")
    return neg, world


def _print_report(report: Any, classes: int, seed: int) -> None:
    print(f"classes ({len(report.counts)}), photos used per class:")
    for c, n in report.counts.items():
        print(f"  {n:5d}  {c}")
    if report.heldout:
        h = report.heldout
        print(f"held-out accuracy: {h['accuracy']:.3f} on {h['photos']} photos "
              f"(top-1 among all {classes} classes; seed {seed})")
        if "background_taken" in h:
            print(f"background taken: {h['background_taken']:.1%} of {h['background_photos']} held-out background "
                  "photos named as a new class (the head of this check was fitted on the other half)")
    else:
        print("held-out accuracy: not measured (needs at least 5 photos in every class)")
    warn_if_takes_world(report.heldout.get("background_taken") if report.heldout else None, "held-out")


def cmd_train_head(a: argparse.Namespace) -> int:
    import numpy as np

    from .features import FeatureExtractor, scan_folder
    from .train import TrainSettings, train_head

    out = Path(a.output)
    if out.is_dir():
        raise ExtendserveError(f"-o {out} is a folder; give a file name such as {out / 'head.pt'}")
    check_gate_options(a)
    if a.method is None:  # a fine-tuned top copy is trained with the gated head (not yet the calibrated one)
        a.method = "gated" if a.unfreeze_top else "calibrated"
    t0 = time.time()
    ds = scan_folder(a.data)
    from .names import check_class_names

    where = f"{a.data} (class folder names)"
    if not a.base:  # the built-in labels are known before any weights load
        from .registry import get_spec

        check_class_names(ds.classes, where, taken=get_spec(a.backbone).labels, taken_by=f"backbone {a.backbone}")
    base = base_from_args(a)
    if a.base:  # a foreign base's labels are known once its file is read
        check_class_names(ds.classes, where, taken=base.labels, taken_by=f"base {base.name}")
    check_unfreeze_options(a, base.backbone.num_blocks if base.backbone is not None else 0)
    skipped = list(ds.skipped)
    fx = FeatureExtractor(base)
    feats, ok, hits = fx.extract(ds.files, on_skip=lambda p, why: skipped.append((p, why)))
    t_feat = time.time() - t0
    for p, why in skipped:
        err(f"skipped {p}: {why}")
    labels = np.array([ds.labels[i] for i in ok], dtype=np.int64)
    neg, world = _negatives_and_world(a, base, fx)
    settings = TrainSettings(method=a.method, epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay, seed=a.seed,
                             holdout=a.holdout,
                             augment=not a.no_augment, gate=a.gate, gate_quantile=a.gate_quantile,
                             gate_scale=a.gate_scale, gate_shrinkage=a.gate_shrinkage)
    if a.unfreeze_top:
        from .finetune import train_unfrozen

        head, report = train_unfrozen(base, [ds.files[i] for i in ok], feats, labels, ds.classes, settings,
                                      a.unfreeze_top, a.freeze or ())
    else:
        head, report = train_head(base, feats, labels, ds.classes, settings, negatives=neg, background=world)
    head.name = a.name or out.stem
    head.settings.update({"data": str(a.data), "photos": int(len(labels)), "skipped": len(skipped),
                          "negatives": None if neg is None else int(len(neg)), **weights_settings(a),
                          "base_model": base.describe() | base.identity(),
                          "heldout": report.heldout})
    head.save(out)
    _print_report(report, len(base.labels) + len(ds.classes), a.seed)
    print(f"features: {t_feat:.1f}s ({hits}/{len(ok)} cached); training: {report.seconds:.1f}s")
    print(f"wrote {out} (head {head.name!r}, method {head.method}, base {head.backbone})")
    return 0


TAKEN_LIMIT = 0.01  # above this share of background photos taken, a head is reported as taking the world


def warn_if_takes_world(taken: float | None, what: str) -> None:
    if taken is not None and taken > TAKEN_LIMIT:
        err(f"WARNING: this head names {taken:.1%} of {what} background photos (none of its classes) as one of "
            f"its classes, over the {TAKEN_LIMIT:.0%} it should; narrow the classes (one kind of thing each), add "
            "more photos per class, or give photos it must not take with --negatives DIR")


def check_gate_options(a: argparse.Namespace) -> None:
    """Before the backbone is loaded: the gate's numbers are in range."""
    if not 0 <= a.gate_quantile < 1:
        raise ExtendserveError(f"--gate-quantile is a share of photos: give a value from 0 up to (not) 1, not {a.gate_quantile}")
    if not 0 < a.gate_shrinkage <= 1:
        raise ExtendserveError(f"--gate-shrinkage must be above 0 and at most 1, not {a.gate_shrinkage}")


def check_unfreeze_options(a: argparse.Namespace, blocks: int) -> None:
    """Before any photo is read: the --unfreeze-top / --freeze combination makes sense."""
    if a.unfreeze_top and not blocks:
        raise ExtendserveError("--unfreeze-top fine-tunes a built-in backbone's top blocks; drop --base, or "
                               "drop --unfreeze-top")
    if not 0 <= a.unfreeze_top <= blocks:
        raise ExtendserveError(f"--unfreeze-top must be between 0 and {blocks} for {a.backbone}, not {a.unfreeze_top}")
    if a.freeze and not a.unfreeze_top:
        raise ExtendserveError("--freeze narrows what --unfreeze-top K fine-tunes; give --unfreeze-top too")
    if a.unfreeze_top and (a.negatives or a.method != "gated"):
        raise ExtendserveError("--unfreeze-top trains the gated head without --negatives (for now); "
                               "give --method gated and drop --negatives")


# --------------------------------------------------------------------------- build


def base_from_args(a: argparse.Namespace) -> Any:
    """The base the options name: ``--base FILE.onnx``, or ``--backbone`` with ``--weights``
    restored over the registry's when given (report printed)."""
    from .base import resolve_base
    from .pretrained import restore_summary

    if not a.weights and (a.exclude or a.restore != "all"):
        raise ExtendserveError("--restore and --exclude apply to --weights CKPT; give the checkpoint too")
    base = resolve_base(a.backbone, a.weights, a.restore, a.exclude or (), a.base, a.preprocess, a.labels)
    if base.restore_report:
        err(restore_summary(base.restore_report))
    return base


def weights_settings(a: argparse.Namespace) -> dict[str, Any]:
    return {"weights": absolute(a.weights) if a.weights else None, "restore": a.restore, "exclude": a.exclude or [],
            "base": absolute(a.base) if a.base else None, "preprocess": absolute(a.preprocess) if a.preprocess else None,
            "labels": absolute(a.labels) if a.labels else None}


def absolute(path: str) -> str:
    """Recorded paths are absolute, so ``build --from`` works from any directory."""
    return str(Path(path).absolute())


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


def store_name_for(a: argparse.Namespace) -> str | None:
    """The store name ``--name`` gives (default: the output folder's name), checked before any work."""
    if a.no_store:
        return None
    from .store import store_name

    name = a.name or Path(a.output).absolute().name.lower()
    store_name(name)
    return name


def save_and_say(a: argparse.Namespace, name: str | None) -> None:
    if name is None:
        return
    from .store import save_to_store

    tag = save_to_store(a.output, name)
    print(f"saved to the BentoML model store as {tag} (bentoml models list; serve it with "
          f"EXTENDSERVE_MODEL={tag} bentoml serve)")


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


# --------------------------------------------------------------------------- predict


def cmd_predict(a: argparse.Namespace) -> int:
    import stat

    from .runtime import Model

    for path in a.images:  # before the model loads: a device is never read, a FIFO never waited on
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise ExtendserveError(f"{path}: cannot read it ({e.strerror}); give photo files") from None
        if not stat.S_ISREG(mode):
            raise ExtendserveError(f"{path}: not a regular file (a folder, device, FIFO or socket); give photo files")
    if a.top_k < 1:
        raise ExtendserveError(f"--top-k must be at least 1, not {a.top_k}")
    model = Model(a.model, device=os.environ.get("EXTENDSERVE_DEVICE", "cpu"))
    results = model.predict_files(a.images, a.top_k)
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["image"])
            if "error" in r:
                print(f"  error: {r['error']}")
                continue
            for p in r["predictions"]:
                print(f"  {p['score']:7.2%}  {p['label']:<40} [{p['head']}]")
    return 1 if any("error" in r for r in results) else 0


# --------------------------------------------------------------------------- eval, demo


def cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import evaluate, render

    res = evaluate(a.model, new=a.new, imagenet=a.imagenet)
    print(json.dumps(res, indent=2) if a.json else render(res))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import build_demo
    from .export import output_dir

    output_dir(a.output)
    name = store_name_for(a)
    build_demo(a.output)
    print(f"built the demo model in {a.output}")
    save_and_say(a, name)
    return 0


def cmd_backbones(a: argparse.Namespace) -> int:
    """The registry, with each entry's top-1 on an ImageNet sample folder when there is one."""
    from .pretrained import imagenet_top1, load_backbone
    from .registry import REGISTRY

    sample = Path(a.imagenet) if a.imagenet else None
    if sample is not None and not sample.is_dir():
        raise ExtendserveError(f"{sample}: not a folder; give --imagenet a folder of <synset>_<name>.JPEG photos")
    rows = []
    for s in REGISTRY.values():
        top1 = "-"
        if sample is not None:
            right, n = imagenet_top1(load_backbone(s.name), sample)
            top1 = f"{right}/{n} ({right / max(n, 1):.1%})"
        rows.append([s.name, f"{s.input_size}", f"{s.preprocess.resize}", f"{s.feature_dim}", ",".join(s.classifier),
                     top1, s.weights_package])
    head = ["name", "input", "resize", "features", "classifier (new heads sit beside it)", "top-1", "weights package"]
    if a.json:
        print(json.dumps([dict(zip(head, r)) for r in rows], indent=2))
        return 0
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for r in [head] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())
    if sample is None:
        print("(top-1: pass --imagenet DIR, for example ../shared/data/imagenet-sample)")
    return 0


# --------------------------------------------------------------------------- parser


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (not where there is none); the description's lines
    kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def weight_options(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("any ImageNet-style classifier in ONNX as the base (instead of --backbone)")
    o.add_argument("--base", metavar="FILE.onnx", help="the classifier whose final linear layer new classes sit beside")
    o.add_argument("--preprocess", metavar="FILE.json", help="with --base: keys resize, crop, interpolation, mean, "
                   "std (mean and std in 0-1 units, as torchvision writes them); default torchvision's ImageNet values")
    o.add_argument("--labels", metavar="FILE", help="with --base: its class names, one a line (default: the ONNX "
                   "metadata 'labels', else class_0, class_1, ...)")
    g = p.add_argument_group("backbone weights")
    g.add_argument("--weights", metavar="CKPT", help="a state dict for --backbone (fine-tuned elsewhere) restored "
                                                     "over the registry's ImageNet weights")
    g.add_argument("--restore", default="all", choices=["all", "backbone"],
                   help="all: every matching tensor; backbone: keep the registry's original classifier")
    g.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="never restore parameters matching this shell-style pattern (repeatable), e.g. '_blocks.15.*'")


def store_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("BentoML model store")
    g.add_argument("--name", help="also save the model as extendserve-NAME, a new version, in the BentoML model "
                                  "store (default: the output folder's name)")
    g.add_argument("--no-store", action="store_true", help="write the -o folder only")


def _train_head_options(t: argparse.ArgumentParser) -> None:
    from .config import GATES
    from .registry import DEFAULT_BACKBONE, names

    t.add_argument("data", help="folder with one sub-folder of photos per class")
    t.add_argument("-o", "--output", required=True, help="head file to write (.pt)")
    t.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=names())
    t.add_argument("--name", help="head name shown with predictions (default: the file's stem)")
    t.add_argument("--method", default=None, choices=["calibrated", "gated", "joint", "naive"],
                   help="calibrated: one probability model with the base's classes, judged against the base's "
                        "background (default; gated with --unfreeze-top); gated: the earlier gate fitted on the new "
                        "photos alone; joint: rows "
                        "trained in the joint softmax with the base's classes; naive: an N-way head on its own")
    t.add_argument("--negatives", help="folder of photos that are none of the new classes: added to the base's "
                                       "background (a base without one, --base FILE, needs them for a safe head)")
    t.add_argument("--epochs", type=int, default=300, help="full-batch optimiser steps")
    t.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    t.add_argument("--weight-decay", type=float, default=1e-3, help="L2 penalty on the head's rows")
    t.add_argument("--seed", type=int, default=0, help="the held-out split and the optimiser's start")
    t.add_argument("--holdout", type=float, default=0.2, help="share held out to report accuracy (0: none)")
    t.add_argument("--no-augment", action="store_true", help="train on the centre crop only")
    t.add_argument("--gate", default=GATES[0], choices=GATES,
                   help="gated: how nearness to the new classes is measured: distance to the class means under "
                        "a shrunk shared covariance (default), or cosine similarity to class prototypes")
    t.add_argument("--gate-quantile", type=float, default=0.05,
                   help="gated: share of training photos (scored out of sample) the gate may reject; higher "
                        "steals fewer ImageNet photos and misses more new ones")
    t.add_argument("--gate-shrinkage", type=float, default=0.8,
                   help="mahalanobis gate: 0..1, how far the class covariance is pulled towards a sphere "
                        "(1: plain distance to the class mean)")
    t.add_argument("--gate-scale", type=float, default=40.0,
                   help="gated: logits per unit of gate margin past the threshold (score sharpness)")
    t.add_argument("--unfreeze-top", type=int, default=0, metavar="K",
                   help="fine-tune a private copy of the backbone's last K blocks (and head conv) with the new "
                        "classes; the original blocks keep serving ImageNet unchanged (default 0: all frozen)")
    t.add_argument("--freeze", action="append", metavar="PATTERN",
                   help="with --unfreeze-top: keep parameters matching this shell-style pattern at their "
                        "pretrained values (repeatable), e.g. '*_bn*' or '_blocks.15._depthwise_conv.*'")
    weight_options(t)
    t.set_defaults(func=cmd_train_head)


def parser() -> argparse.ArgumentParser:
    from . import __version__
    from .registry import DEFAULT_BACKBONE, names

    style = {"allow_abbrev": False, "formatter_class": Formatter}  # --epoch is not taken for --epochs
    p = argparse.ArgumentParser(prog="extendserve", description=__doc__, **style)  # type: ignore[arg-type]
    p.add_argument("--version", action="version", version=f"extendserve {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add = sub.add_parser
    sub.add_parser = lambda *args, **kw: _add(*args, **(style | kw))  # type: ignore[method-assign]

    _train_head_options(sub.add_parser("train-head", help="train a head for new classes from a class-per-folder tree"))

    b = sub.add_parser("build", help="merge heads with the backbone, export ONNX and verify it")
    b.add_argument("--new-head", action="append", help="head file (repeatable, in output order)")
    b.add_argument("--classes", action="append", help="class list for a head trained elsewhere, one per --new-head")
    b.add_argument("-o", "--output", help="model folder to write (required; with --from, default the manifest's "
                                           "own folder). Rebuilding into a model folder replaces it, saying what it replaced")
    b.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=names())
    b.add_argument("--force", action="store_true", help="build even if a head was trained on other weights")
    store_options(b)
    b.add_argument("--from", dest="from_manifest", metavar="MANIFEST",
                   help="rebuild with every setting recorded in a model's manifest.json (other options ignored)")
    weight_options(b)
    b.set_defaults(func=cmd_build)

    r = sub.add_parser("predict", help="classify photos with a built model (onnxruntime, no torch)")
    r.add_argument("images", nargs="+")
    r.add_argument("--model", default=DEFAULT_MODEL_DIR, help="a built model folder")
    r.add_argument("--top-k", type=int, default=5, help="predictions shown per photo")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_predict)

    e = sub.add_parser("eval", help="new-class accuracy, ImageNet photos stolen, ImageNet top-1")
    e.add_argument("--model", default=DEFAULT_MODEL_DIR, help="a built model folder")
    e.add_argument("--new", help="class-per-folder photos of the new classes")
    e.add_argument("--imagenet", help="photos named <synset>_<name>.JPEG")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="build the demo model (ImageNet + two people from PyPI sample photos)")
    d.add_argument("-o", "--output", default=DEFAULT_MODEL_DIR)
    store_options(d)
    d.set_defaults(func=cmd_demo)

    k = sub.add_parser("backbones", help="list the backbone registry")
    default_sample = Path("../shared/data/imagenet-sample")
    k.add_argument("--imagenet", default=str(default_sample) if default_sample.is_dir() else None,
                   help="ImageNet sample folder for the top-1 column (default: ../shared/data/imagenet-sample if present)")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_backbones)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ExtendserveError as e:
        err(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        err("interrupted; nothing was half-written")
        return 130
    except OSError as e:  # a full disk, a folder that cannot be written: said in one line, with the fix
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            err(f"error: no space left on the disk (or over the file size limit) writing {e.filename or 'a file'}; "
                "free some space, or build into another folder (-o) or cache (EXTENDSERVE_CACHE); nothing was half-written")
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            err(f"error: cannot write {e.filename or 'a file'} ({e.strerror}); choose a folder you can write "
                "(-o, EXTENDSERVE_CACHE)")
        else:
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
