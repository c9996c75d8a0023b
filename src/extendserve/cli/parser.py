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
import sys
from collections.abc import Sequence

from ..errors import ExtendserveError
from .build import cmd_build, cmd_demo
from .common import DEFAULT_MODEL_DIR, err
from .train import cmd_train_head
from .use import cmd_backbones, cmd_eval, cmd_predict, cmd_review

MODEL_HELP = ("a built model folder, or a store tag (extendserve-NAME:latest); default: models/default when "
              "there is one here, else the demo in the store (extendserve-default:latest)")


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (not where there is none); the description's lines
    kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default" in (action.help or "") or action.default is False:
            return action.help
        return super()._get_help_string(action)


def weight_options(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("any ImageNet-style classifier in ONNX as the base (instead of --backbone)")
    o.add_argument("--base", metavar="FILE.onnx", help="the classifier whose final linear layer new classes sit beside")
    o.add_argument("--preprocess", metavar="FILE.json", help="with --base: keys resize, crop, interpolation, mean, "
                   "std, units (\"0-1\", torchvision's, the default; or \"0-255\", as a model's manifest writes "
                   "them); default torchvision's ImageNet values")
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
    from ..bases.registry import DEFAULT_BACKBONE, names
    from ..config import GATES

    t.add_argument("data", help="folder with one sub-folder of photos per class")
    t.add_argument("-o", "--output", required=True, help="head file to write (.pt)")
    t.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=names(),
                   help="the built-in base (extendserve backbones lists them)")
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
    t.add_argument("--max-taken", type=float, default=0.01, metavar="SHARE",
                   help="share of the base's everyday photos (its background) the new classes may take: lower keeps "
                        "ImageNet safer, higher names more new-class photos (train-head prints the trade)")
    t.add_argument("--keep-suspicious", action="store_true",
                   help="train on photos flagged as out of place too (default: left out, each named in a WARNING)")
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
                        "classes; the original blocks keep serving ImageNet unchanged (0: all frozen)")
    t.add_argument("--freeze", action="append", metavar="PATTERN",
                   help="with --unfreeze-top: keep parameters matching this shell-style pattern at their "
                        "pretrained values (repeatable), e.g. '*_bn*' or '_blocks.15._depthwise_conv.*'")
    weight_options(t)
    t.set_defaults(func=cmd_train_head)


def _eval_options(e: argparse.ArgumentParser) -> None:
    e.add_argument("--model", default=None, help=MODEL_HELP)
    e.add_argument("--new", help="class-per-folder photos of the new classes")
    e.add_argument("--imagenet", help="photos named <synset>_<name>.JPEG")
    e.add_argument("--train", metavar="DIR", help="the folder the heads were trained on: held-out photos that are "
                                                  "near-copies of its photos are named, and the figures given without them")
    e.add_argument("--report", metavar="FILE.html", help="also write a self-contained page: accuracy per class, a "
                                                          "confusion matrix, thumbnails of the photos behind the mistakes")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)


def _review_options(v: argparse.ArgumentParser) -> None:
    v.add_argument("folder", help="the service's EXTENDSERVE_REVIEW_DIR")
    v.add_argument("-o", "--output", metavar="FILE.html", help="write a page of thumbnails with the answers")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_review)


def parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..bases.registry import DEFAULT_BACKBONE, names
    from ..building.manifest import CPU_PRECISIONS

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
    b.add_argument("-o", "--output", help="model folder to write (required; with --from DIR, default that "
                                           "folder). Rebuilding into a model folder replaces it, saying what it replaced")
    b.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=names(),
                   help="the built-in base the heads were trained on (extendserve backbones lists them)")
    b.add_argument("--force", action="store_true", help="build even if a head was trained on other weights")
    b.add_argument("--cpu-precision", choices=CPU_PRECISIONS, default=None,
                   help="bf16 lets OpenVINO serve the model in bf16 on CPUs that have it (AMX, AVX512_BF16): "
                        "faster there, but it changes some decisions; build reports how many (default f32, or "
                        "with --from the model's own)")
    store_options(b)
    b.add_argument("--from", dest="from_model", metavar="DIR|TAG",
                   help="rebuild a built model (its folder, manifest.json, or store tag extendserve-NAME:VERSION) "
                        "with its base settings and every head it carries; --new-head adds heads, --drop-head removes")
    b.add_argument("--drop-head", action="append", metavar="NAME", help="with --from: leave this head out (repeatable)")
    b.add_argument("--min-score", type=float, default=None,
                   help="the model's default: a photo whose best score is below it is answered 'unknown' first")
    weight_options(b)
    b.set_defaults(func=cmd_build)

    r = sub.add_parser("predict", help="classify photos with a built model (onnxruntime, no torch)")
    r.add_argument("images", nargs="+")
    r.add_argument("--model", default=None, help=MODEL_HELP)
    r.add_argument("--top-k", type=int, default=5, help="predictions shown per photo")
    r.add_argument("--min-score", type=float, default=None,
                   help="below this best score, answer 'unknown' first (default: the model's, set at build)")
    r.add_argument("--json", action="store_true", help="one JSON list of results (each photo's predictions or error)")
    r.set_defaults(func=cmd_predict)

    _eval_options(sub.add_parser("eval", help="new-class accuracy, ImageNet photos stolen, ImageNet top-1"))

    _review_options(sub.add_parser("review", help="the photos a service kept for review (EXTENDSERVE_REVIEW_DIR)"))
    d = sub.add_parser("demo", help="build the demo model (ImageNet + two people from PyPI sample photos)")
    d.add_argument("-o", "--output", default=DEFAULT_MODEL_DIR)
    store_options(d)
    d.set_defaults(func=cmd_demo)

    k = sub.add_parser("backbones", help="list the backbone registry")
    k.add_argument("--imagenet", metavar="DIR", help="also measure each backbone's top-1 on a folder of ImageNet "
                   "photos named <synset>_<name>.JPEG (loads each backbone: a minute or two)")
    k.add_argument("--json", action="store_true", help="the table as a JSON list")
    k.set_defaults(func=cmd_backbones)
    return p


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, parsed; an option the command does not know is refused with that command's
    usage and the closest option it has (argparse alone shows the top-level usage)."""
    import difflib

    top = parser()
    args, extra = top.parse_known_args(argv)
    if not extra:
        return args
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    command = commands[args.command]

    def options(p: argparse.ArgumentParser) -> list[str]:
        return [o for action in p._actions for o in action.option_strings if o.startswith("--")]

    flag = ([x for x in extra if x.startswith("-")] or extra)[0].split("=")[0]
    hint = difflib.get_close_matches(flag.replace("_", "-"), options(command), n=1, cutoff=0.75)
    elsewhere = sorted(name for name, p in commands.items() if flag.replace("_", "-") in options(p))
    why = (f"; did you mean {hint[0]}?" if hint else
           f"; {flag.replace('_', '-')} is an option of {', '.join(elsewhere)}" if elsewhere else
           f" (extendserve {args.command} --help lists its options)")
    command.error(f"unrecognized arguments: {' '.join(extra)}{why}")
    raise AssertionError  # error() exits


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `extendserve predict ... | head`: the reader has gone, which is no error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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
