"""What an extension did: new-class accuracy, ImageNet photos stolen, ImageNet top-1 before/after.

Runs the built ``model.onnx`` (no torch), on labelled photos: a class-per-folder tree for the new
classes (folder names = class names) and ImageNet photos named ``<synset>_<anything>``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..bases.imagenet import synset_index
from ..errors import ExtendserveError
from ..names import escaped
from ..photos.preprocess import list_images
from ..serving.runtime import Model


def photo_digest(path: str | Path) -> str:
    """A photo by its content (16 hex digits of its sha256): what a head records of its training
    photos, so eval recognises them under any name or folder."""
    import hashlib

    from ..photos.preprocess import read_photo

    try:
        return hashlib.sha256(read_photo(path)).hexdigest()[:16]
    except ExtendserveError:
        return ""


def training_photos(model: Model, files: list[Path]) -> dict[str, int]:
    """How many of ``files`` each head of ``model`` was trained on (its recorded digests)."""
    heads = {h.name: set(h.trained_on) for h in model.manifest.heads if h.trained_on}
    if not heads or not files:
        return {}
    digests = [photo_digest(f) for f in files]
    counts = {name: sum(d in trained for d in digests) for name, trained in heads.items()}
    return {name: n for name, n in counts.items() if n}


def _logits(model: Model, files: list[Path]) -> tuple[np.ndarray, list[int]]:
    """Unreadable photos are left out (and not counted)."""
    pixels, ok, _ = model.load_files(files)
    return model.logits(pixels), ok


def _top_scores(logits: np.ndarray) -> np.ndarray:
    """The winning class's probability over all classes (the served score)."""
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    return 1.0 / np.exp(z).sum(1)


def evaluate(model_dir: str, new: str | None = None, imagenet: str | None = None,
             photos: bool = False, train: str | None = None) -> dict[str, Any]:
    """``photos``: also each photo's path, truth, answer and score (``res["photos"]``), for
    :mod:`report`'s confusion matrix and thumbnails; ``train``: the folder the heads were trained
    on, to find held-out photos that are near-copies of training photos (:mod:`copies`)."""
    if not new and not imagenet:
        raise ExtendserveError("nothing to evaluate: give --new DIR (held-out photos of the new classes, one folder "
                               "a class) and/or --imagenet DIR (photos named <synset>_<name>.JPEG)")
    model = Model(model_dir)
    out: dict[str, Any] = {"model": model_dir, "classes": len(model.labels), "base_classes": model.manifest.base_count}
    seen: list[dict[str, Any]] = []  # every photo given, with its answer (the report's thumbnails need them)
    if new:
        out["new"] = _new_classes(model, new, seen)
        if train:
            from .copies import near_copies

            out["new"]["near_copies"] = near_copies(model, [x for x in seen if x["set"] == "new"], train)
    if imagenet:
        out["imagenet"] = _imagenet(model, imagenet, seen)
    given = [Path(x["path"]) for x in seen]
    out["training_photos"] = training_photos(model, given)
    out["heads_checks"] = {h.name: h.checks for h in model.manifest.heads if h.checks}
    if photos:
        out["photos"] = seen
    return out


def _new_classes(model: Model, new: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out photos of the new classes, one folder a class: top-1 among all classes."""
    labels, k = model.labels, model.manifest.base_count  # the base's own classes come first
    root = Path(new)
    if not root.is_dir():
        raise ExtendserveError(f"--new {new}: not a folder of class folders")
    index = {name: i for i, name in enumerate(labels) if i >= k}
    per: dict[str, Any] = {}
    confusions: Counter[tuple[str, str]] = Counter()
    total = right = 0
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ExtendserveError(f"--new {new}: no class folders in it; put each class's held-out photos in "
                               f"{new}/<class name>/ (new classes of this model: {sorted(index)[:10]})")
    for d in folders:
        if d.name not in index:
            raise ExtendserveError(f"--new: folder {d.name!r} is not a class of this model; new classes are "
                                   f"{sorted(index)}")
        files = list_images(d, recursive=False)
        logits, ok = _logits(model, files)
        if not len(logits):
            raise ExtendserveError(f"--new: folder {d} holds no readable photos; add some or remove it")
        pred = logits.argmax(1)
        seen += [{"set": "new", "path": str(files[i]), "true": d.name, "predicted": labels[p], "score": float(sc)}
                 for i, p, sc in zip(ok, pred, _top_scores(logits))]
        hits = int((pred == index[d.name]).sum())
        per[d.name] = {"photos": len(pred), "correct": hits, "accuracy": hits / max(len(pred), 1)}
        confusions.update((d.name, labels[p]) for p in pred if p != index[d.name])
        total += len(pred)
        right += hits
    return {"photos": total, "accuracy": right / max(total, 1), "per_class": per,
            "confusions": [{"true": t, "predicted": p, "count": c} for (t, p), c in confusions.most_common(10)]}


def _imagenet(model: Model, imagenet: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """ImageNet photos named <synset>_...: the base's top-1 before and after, and the share taken."""
    labels, k = model.labels, model.manifest.base_count
    if not Path(imagenet).is_dir():
        raise ExtendserveError(f"--imagenet {imagenet}: not a folder; give a folder of photos named "
                               "<synset>_<name>.JPEG, such as ../shared/data/imagenet-sample")
    files = [p for p in list_images(imagenet, recursive=False) if p.name.startswith("n") and "_" in p.name]
    if not files:
        raise ExtendserveError(f"--imagenet {imagenet}: no photos named <synset>_<name>.JPEG")
    logits, ok = _logits(model, files)
    truth = np.array([synset_index(files[i].name.split("_")[0]) for i in ok])
    before = logits[:, :k].argmax(1)
    after = logits.argmax(1)
    stolen = after >= k
    seen += [{"set": "imagenet", "path": str(files[i]), "true": labels[t], "predicted": labels[a], "score": float(sc),
              "taken": bool(a >= k)} for i, t, a, sc in zip(ok, truth, after, _top_scores(logits))]
    return {
        "photos": int(len(truth)),
        "top1_before": float((before == truth).mean()),
        "top1_after": float((after == truth).mean()),
        "stolen": float(stolen.mean()),
        "stolen_by": dict(Counter(labels[p] for p in after[stolen]).most_common(10)),
    }


def _copies_lines(found: dict[str, Any] | None) -> list[str]:
    """Held-out photos that are near-copies of training photos, per class, and the figures without them."""
    if found is None:
        return ["  near-copies of training photos (the same shot shifted, mirrored, re-lit): not looked for; give "
                "--train DIR, the folder the heads were trained on"]
    if not found["near_copies"]:
        return [f"  no held-out photo is a near-copy of a photo in {escaped(found['training_folder'])} "
                f"(likeness limit {found['limit']:.3f})"]
    without = found["accuracy_without"]
    lines = [f"WARNING: {found['near_copies']} held-out photos are near-copies of training photos in "
             f"{escaped(found['training_folder'])} (likeness at least {found['limit']:.3f}): the figures with them are "
             f"optimistic; without them: " + (f"{without:.3f} on {found['photos_without']} photos" if without is not None
                                              else "no photo is left")]
    for c, r in found["per_class"].items():
        if r["near_copies"]:
            w = "-" if r["accuracy_without"] is None else f"{r['accuracy_without']:.3f}"
            lines.append(f"  {escaped(c)}: {r['near_copies']} of {r['photos']} near-copies; accuracy {r['accuracy']:.3f} "
                         f"with them, {w} without")
            lines += [f"    {escaped(e['held_out'])} ~ {escaped(e['training'])} ({e['likeness']:.3f})" for e in r["examples"]]
    return lines


def render(res: dict[str, Any]) -> str:
    lines = [f"model {res['model']} ({res['classes']} classes)"]
    for head, n in (res.get("training_photos") or {}).items():
        lines.append(f"WARNING: {n} of the photos given were training photos of head '{head}': figures on them are "
                     "optimistic (a head knows its own photos); evaluate on photos held out before training")
    for head, c in (res.get("heads_checks") or {}).items():
        if c.get("strangers_named") is not None:
            lines.append(f"head {head}: strangers named as one of its classes about {c['strangers_named']:.0%} of the "
                         "time (measured at train-head, each class left out in turn)")
    if "new" in res:
        n = res["new"]
        lines.append(f"\nnew classes: {n['accuracy']:.3f} top-1 among all classes ({n['photos']} photos)")
        for c, r in n["per_class"].items():
            lines.append(f"  {r['accuracy']:6.3f}  {r['correct']:3d}/{r['photos']:<3d} {c}")
        lines += _copies_lines(n.get("near_copies"))
        if n["confusions"]:
            lines.append("  most frequent confusions:")
            lines += [f"    {x['count']:3d}  {x['true']} -> {x['predicted']}" for x in n["confusions"]]
    if "imagenet" in res:
        m = res["imagenet"]
        lines.append(f"\nImageNet ({m['photos']} photos): top-1 {m['top1_before']:.3f} before, "
                     f"{m['top1_after']:.3f} after; stolen by a new class: {m['stolen']:.3f}")
        for c, k in m["stolen_by"].items():
            lines.append(f"    {k:3d}  stolen by {c}")
    return "\n".join(lines)
