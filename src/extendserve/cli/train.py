"""``extendserve train-head``: photos -> features -> a head file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..errors import ExtendserveError
from ..names import escaped
from .common import background_line, base_from_args, err, warn_if_takes_world, weights_settings


def _negatives_and_world(a: argparse.Namespace, base: Any, fx: Any) -> tuple[Any, Any]:
    """Features of ``--negatives`` (or None) and the base's world the head is judged against."""
    from ..bases.world import background_for
    from ..photos.preprocess import list_images

    neg = None
    if a.negatives:
        nds = list_images(a.negatives) if Path(a.negatives).is_dir() else []
        if not nds:
            raise ExtendserveError(f"--negatives {a.negatives}: not a folder with photos")
        neg, _, nhits = fx.extract(nds, on_skip=lambda p, why: err(f"skipped negative {escaped(str(p))}: {escaped(why)}"))
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


def _shown(path: Any, root: str) -> str:
    """A photo as the user knows it: its path under the data folder (no machine paths in a head),
    control characters escaped (a file name is printed in WARNING lines)."""
    try:
        return escaped(str(Path(path).relative_to(root)))
    except ValueError:
        return escaped(Path(path).name)


def photo_digests(files: list[Any]) -> list[str]:
    """What a head was trained on, by content, not path: eval tells its own training photos apart."""
    from ..evaluation.evaluate import photo_digest

    return sorted({photo_digest(f) for f in files})


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _print_checks(report: Any) -> None:
    """What the head will do, before it ships: suspicious photos, strangers, the trade it makes."""
    from ..heads.checks import STRANGERS_WARN

    for x in report.suspicious:
        far = (f"{x['score']:.2f} deviations below its class's typical likeness, flagged past {x['limit']:g}"
               if "copy" not in x["why"] else f"likeness {x['score']:.3f}, a copy from {x['limit']:.3f}")
        err(f"WARNING: {x['file']}: {x['why']} ({far}; the {_ordinal(x['rank'])} most out of place of "
            f"{sum(report.counts.values()) + report.left_out} photos); " + ("left out of training (--keep-suspicious keeps it)"
                                            if report.left_out else "kept in training"))
    c = report.checks
    if "strangers_named" in c:
        score = f", with a mean score of {c['strangers_score']:.2f}" if c.get("strangers_score") is not None else ""
        print(f"strangers: photos of something like your classes but not one of them (a stranger's face) will be named "
              f"as one of them about {c['strangers_named']:.0%} of the time{score} (each of {c['classes_left_out']} "
              "classes left out in turn)")
        if c["strangers_named"] > STRANGERS_WARN:
            err(f"WARNING: {c['strangers_named']:.0%} of a left-out class's photos were named as one of the others: the "
                "base's features do not tell these classes from things like them. What helps: a class of 'others' "
                "(photos of things like yours that are none of them), more varied photos, --negatives DIR, a base "
                "whose features separate them (--backbone, --base), or a min_score when serving")
    if c.get("trade"):
        print("the trade (held-out): new-class accuracy against the share of background photos taken:")
        for t in c["trade"]:
            print(f"  at most {t['max_taken']:5.1%} taken: accuracy {t['accuracy']:.3f}")


def _print_report(report: Any, classes: int, seed: int) -> None:
    from ..training.train import per_class

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    print(f"classes ({len(report.counts)}): photos used, held-out photos named right, photos named one of the others "
          "when the class was left out (strangers), held-out background photos named as it (-: not measured)")
    print(f"  {'photos':>6}  {'held-out':>8}  {'strangers':>9}  {'background':>10}  class")
    for c, f in per_class(report).items():
        print(f"  {f['photos']:6d}  {pct(f['heldout_accuracy']):>8}  {pct(f['strangers_named']):>9}  "
              f"{pct(f['background_taken']):>10}  {escaped(c)}")
    if report.heldout:
        h = report.heldout
        print(f"held-out accuracy: {h['accuracy']:.3f} on {h['photos']} photos "
              f"(top-1 among all {classes} classes; seed {seed})")
        if "background_taken" in h:
            print(background_line("this head names", h["background_taken"], h["background_photos"],
                                  "as one of its classes: held out (the head of this check was fitted on the other half)"))
    else:
        print("held-out accuracy: not measured (needs a class with at least 5 photos)")
    warn_if_takes_world(report.heldout.get("background_taken") if report.heldout else None, "held-out")
    for w in report.warnings:
        err(f"WARNING: {w}")


def cmd_train_head(a: argparse.Namespace) -> int:
    import numpy as np

    from ..training.features import FeatureExtractor, scan_folder
    from ..training.train import train_head

    out = Path(a.output)
    if out.is_dir():
        raise ExtendserveError(f"-o {out} is a folder; give a file name such as {out / 'head.pt'}")
    check_gate_options(a)
    if a.method is None:  # a fine-tuned top copy is trained with the gated head (not yet the calibrated one)
        a.method = "gated" if a.unfreeze_top else "calibrated"
    t0 = time.time()
    ds = scan_folder(a.data)
    _warn_one_class(ds.classes)
    from ..names import check_class_names

    where = f"{a.data} (class folder names)"
    if not a.base:  # the built-in labels are known before any weights load
        from ..bases.registry import get_spec

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
        err(f"skipped {escaped(str(p))}: {escaped(why)}")
    labels = np.array([ds.labels[i] for i in ok], dtype=np.int64)
    neg, world = _negatives_and_world(a, base, fx)
    del fx  # its onnxruntime session and arena are not needed for the fit
    settings = _settings(a)
    if a.unfreeze_top:
        from ..training.finetune import train_unfrozen

        head, report = train_unfrozen(base, [ds.files[i] for i in ok], feats, labels, ds.classes, settings,
                                      a.unfreeze_top, a.freeze or ())
    else:
        names = [_shown(ds.files[i], a.data) for i in ok]
        head, report = train_head(base, feats, labels, ds.classes, settings, negatives=neg, background=world, names=names)
    head.name = a.name or out.stem
    suspicious = [{k: v for k, v in x.items() if k != "index"} for x in report.suspicious]  # rows mean nothing later
    checks = report.checks | {"suspicious": suspicious, "left_out": report.left_out}
    head.settings.update({"data": str(a.data), "photos": int(len(labels)), "skipped": len(skipped),
                          "negatives": None if neg is None else int(len(neg)), **weights_settings(a),
                          "base_model": base.describe() | base.identity(), "heldout": report.heldout, "checks": checks,
                          "trained_on": photo_digests([ds.files[i] for i in ok])})
    head.save(out)
    a.result = _figures(out, report, checks, t_feat)
    _print_report(report, len(base.labels) + len(ds.classes), a.seed)
    _print_checks(report)
    print(f"features: {t_feat:.1f}s ({hits}/{len(ok)} cached); training: {report.seconds:.1f}s")
    print(f"wrote {out} (head {head.name!r}, method {head.method}, base {head.backbone})")
    return 0


def _warn_one_class(classes: list[str]) -> None:
    if len(classes) == 1:
        err(f"WARNING: one class ({escaped(classes[0])!r}): the head has no other new class to tell it from, so it is "
            "judged against the base's own classes only; if photos of similar things should not be named "
            f"{escaped(classes[0])!r}, add a folder for them or give them with --negatives DIR")


def _figures(out: Path, report: Any, checks: dict[str, Any], t_feat: float) -> dict[str, Any]:
    """What train-head measured, as the Python API returns it (``api.train_head``)."""
    from ..training.train import per_class

    return {"path": str(out), "classes": per_class(report), "heldout": report.heldout,
            "checks": {k: v for k, v in checks.items() if k != "per_class"}, "warnings": list(report.warnings),
            "seconds": {"features": round(t_feat, 1), "training": round(report.seconds, 1)}}


def _settings(a: argparse.Namespace) -> Any:
    """The training settings the options give (--max-taken: the share asked for; the fit aims at half
    of it, as the 99th percentile of 200 background photos is two photos and unseen ones spread wider)."""
    from ..training.train import TrainSettings

    if not 0 < a.max_taken < 1:
        raise ExtendserveError(f"--max-taken is a share of photos: give a value between 0 and 1 (0.01 is 1%), not {a.max_taken}")
    return TrainSettings(method=a.method, epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay, seed=a.seed,
                         holdout=a.holdout, max_taken=a.max_taken / 2, keep_suspicious=a.keep_suspicious,
                         augment=not a.no_augment, gate=a.gate, gate_quantile=a.gate_quantile,
                         gate_scale=a.gate_scale, gate_shrinkage=a.gate_shrinkage)


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
