"""What every command shares: how it speaks (one line on stderr), the base its options name,
the settings it records, the store it saves to. Heavy imports stay inside the functions.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..building.store import PREFIX  # the store module imports bentoml only when it is used
from ..errors import ExtendserveError

DEFAULT_MODEL_DIR = os.environ.get("EXTENDSERVE_MODEL_DIR", "models/default")
# The project folder (its bentofile.yaml and service), when extendserve runs from a checkout: the serve
# hint names it, so the printed command works from any folder (bentoml serve DIR).
_CHECKOUT = Path(__file__).resolve().parents[3]
PROJECT = str(_CHECKOUT) if (_CHECKOUT / "bentofile.yaml").is_file() else None


def err(msg: str) -> None:
    """A message on stderr, each line's control characters escaped (names from users' files travel
    in messages: an ESC in a file name must not clear the screen)."""
    from ..names import escaped

    sys.stderr.write("\n".join(escaped(line) for line in msg.split("\n")) + "\n")
    sys.stderr.flush()


TAKEN_LIMIT = 0.01  # above this share of background photos taken, a head is reported as taking the world


def background_line(who: str, taken: float, photos: int, how: str) -> str:
    """The one way train-head and build say the background-taken figure, and what it was measured on."""
    return f"background taken: {who} {taken:.1%} of {photos} background photos (none of its classes) {how}"


def warn_if_takes_world(taken: float | None, what: str, who: str = "this head") -> None:
    if taken is not None and taken > TAKEN_LIMIT:
        err(f"WARNING: {who} names {taken:.1%} of {what} background photos (none of its classes) as one of "
            f"its classes, over the {TAKEN_LIMIT:.0%} it should; narrow the classes (one kind of thing each), add "
            "more photos per class, or give photos it must not take with --negatives DIR")


def base_from_args(a: argparse.Namespace) -> Any:
    """The base the options name: ``--base FILE.onnx``, or ``--backbone`` with ``--weights``
    restored over the registry's when given (report printed)."""
    from ..bases.base import resolve_base
    from ..bases.pretrained import restore_summary

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


def model_folder(given: str | None, option: str = "--model") -> tuple[Path, str | None]:
    """A built model's folder from what a user gives: the folder, its manifest.json, or a store tag
    (``extendserve-NAME:VERSION`` or ``:latest``); (folder, the concrete tag or None). Nothing given:
    EXTENDSERVE_MODEL_DIR, else models/default when it is here, else the demo in the store (so
    ``predict`` works from any folder once ``make serve`` has built it)."""
    if given is None:
        given = os.environ.get("EXTENDSERVE_MODEL_DIR") or ("models/default" if Path("models/default").is_dir()
                                                           else f"{PREFIX}default:latest")
    p = Path(given)
    if p.is_file() and p.name == "manifest.json":
        return p.parent, None
    if p.exists():
        return p, None
    if ":" in given or given.startswith(PREFIX):
        from ..building.store import resolve

        tag, folder = resolve(given if ":" in given else f"{given}:latest", f"{option} ")
        return folder, tag
    from ..building.store import did_you_mean

    raise ExtendserveError(f"{option} {given}: no such model folder{did_you_mean(given)}; give a folder written by "
                           f"extendserve build -o DIR, or a store tag such as {PREFIX}default:latest (bentoml models list)")


def store_name_for(a: argparse.Namespace) -> str | None:
    """The store name ``--name`` gives (default: the output folder's name), checked before any work."""
    if a.no_store:
        return None
    from ..building.store import store_name

    name = a.name or Path(a.output).absolute().name.lower()
    store_name(name)
    return name


def say_saved(saved: tuple[str, bool] | None) -> None:
    if saved is None:
        return
    tag, new = saved
    serve = f"EXTENDSERVE_MODEL={tag} bentoml serve {PROJECT}" if PROJECT else f"EXTENDSERVE_MODEL={tag} bentoml serve"
    if new:
        from ..building.store import versions

        first = versions(tag.split(":")[0]) == 1
        print(f"saved to the BentoML model store as {tag}" + (" (a new store model; --name NAME picks the name, "
              "--no-store saves none)" if first else "") + f" (bentoml models list; serve it with: {serve})")
    else:
        print(f"the model store's latest {tag} is this same model (same model.onnx): kept it, no new version saved "
              f"(serve it with: {serve})")
