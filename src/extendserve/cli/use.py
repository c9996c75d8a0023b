"""``extendserve predict``, ``eval`` and ``backbones``: using models (predict and eval without torch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import ExtendserveError
from ..names import escaped
from .common import model_folder


def cmd_predict(a: argparse.Namespace) -> int:
    import stat

    from ..serving.runtime import Model

    for path in a.images:  # before the model loads: a device is never read, a FIFO never waited on
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise ExtendserveError(f"{path}: cannot read it ({e.strerror}); give photo files") from None
        if not stat.S_ISREG(mode):
            raise ExtendserveError(f"{path}: not a regular file (a folder, device, FIFO or socket); give photo files")
    if a.top_k < 1:
        raise ExtendserveError(f"--top-k must be at least 1, not {a.top_k}")
    model = Model(model_folder(a.model)[0], device=os.environ.get("EXTENDSERVE_DEVICE", "cpu"),
                  engine=os.environ.get("EXTENDSERVE_ENGINE", "onnxruntime"))
    if a.min_score is not None and not 0 <= a.min_score <= 1:
        raise ExtendserveError(f"--min-score is a score from 0 to 1, not {a.min_score}")
    results = a.result = model.predict_files(a.images, a.top_k, a.min_score)
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(escaped(str(r["image"])))
            if "error" in r:
                print(f"  error: {escaped(str(r['error']))}")
                continue
            for p in r["predictions"]:
                print(f"  {p['score']:7.2%}  {p['label']:<40} [{p['head']}]")
    return 1 if any("error" in r for r in results) else 0


def cmd_eval(a: argparse.Namespace) -> int:
    from ..evaluation.evaluate import evaluate, render

    if a.report and Path(a.report).is_dir():
        raise ExtendserveError(f"--report {a.report} is a folder; give a file name such as {Path(a.report) / 'report.html'}")
    res = a.result = evaluate(str(model_folder(a.model)[0]), new=a.new, imagenet=a.imagenet, photos=bool(a.report),
                                  train=a.train)
    if a.report:
        from ..evaluation.report import write_report

        try:
            write_report(res, a.report)
        except OSError as e:
            raise ExtendserveError(f"--report {a.report}: cannot write it ({e.strerror}); choose another file") from None
        res.pop("photos")
    print(json.dumps(res, indent=2) if a.json else render(res))
    if a.report:
        print(f"wrote {a.report} (open it in a browser)", file=sys.stderr if a.json else sys.stdout)
    return 0


def cmd_backbones(a: argparse.Namespace) -> int:
    """The registry, with each entry's top-1 on an ImageNet sample folder when there is one."""
    from ..bases.pretrained import imagenet_top1, load_backbone
    from ..bases.registry import REGISTRY

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


def cmd_review(a: argparse.Namespace) -> int:
    """The photos a service kept for review: a line each (newest first), and a page of thumbnails."""
    from ..evaluation.review import read_samples, write_review

    samples = a.result = read_samples(a.folder)
    if a.json:
        print(json.dumps(samples, indent=2))
    else:
        for s in samples:
            best = s["answers"][0] if s["answers"] else {"label": "-", "score": 0.0}
            print(f"{escaped(Path(s['path']).name)}  {escaped(best['label'])} {best['score']:.2f}  ({escaped(s['why'])})")
        print(f"{len(samples)} photos kept for review in {escaped(a.folder)}")
    if a.output:
        write_review(samples, a.folder, a.output)
        print(f"wrote {escaped(a.output)} (open it in a browser)", file=sys.stderr if a.json else sys.stdout)
    return 0
