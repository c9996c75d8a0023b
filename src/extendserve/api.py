"""The Python API, for notebooks and scripts: the same commands as the command line, raising
:class:`~extendserve.errors.ExtendserveError` with the command's message instead of exiting.

    from extendserve.api import train_head, build
    from extendserve.serving.runtime import Model

    train_head("celebs/", "celebs.pt")
    build("models/celebs", new_heads=["celebs.pt"])          # also saved as extendserve-celebs
    Model("models/celebs").predict([pil_image, array, "photo.jpg"], k=3)

Options are the command line's, as keywords: ``epochs=50`` is ``--epochs 50``, ``no_store=True``
is ``--no-store``, a list repeats an option.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ExtendserveError


def _argv(options: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            for v in value:
                out += [flag, os.fspath(v) if isinstance(v, os.PathLike) else str(v)]
        else:
            out += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return out


def run(command: str, *args: str | os.PathLike[str], **options: Any) -> Any:
    """Any ``extendserve`` command (``"train-head"``, ``"build"``, ``"eval"`` ...), positional
    arguments as on the command line (``run("predict", "a.jpg", "b.jpg", model="models/celebs")``),
    options as keywords. Returns what the command measured where it measures something (``eval``,
    ``train-head``: the figures as a dict; ``predict``: one result a photo; ``review``: the samples),
    else its exit code (0; 1: done, with something to report, as a rebuild that is not identical)."""
    import contextlib
    import io

    from .cli.parser import parse

    argv = [command, *map(os.fspath, args), *_argv(options)]
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # argparse's usage text goes into the exception, not the notebook
            parsed = parse(argv)
    except SystemExit:
        why = said.getvalue().strip().splitlines()[-1:] or ["not valid options"]
        raise ExtendserveError(f"extendserve {' '.join(argv)}: {why[0]} (extendserve {command} --help)") from None
    code = int(parsed.func(parsed))
    return getattr(parsed, "result", code)


class TrainedHead(dict):  # type: ignore[type-arg]
    """What ``train_head`` measured (``["classes"]``: each class's photos used, held-out accuracy,
    strangers named and background taken, by name; ``["heldout"]``, ``["checks"]``, ``["warnings"]``),
    and the head file: ``.path``; it is also path-like, so ``build(out, [train_head(...)])`` works."""

    @property
    def path(self) -> Path:
        return Path(self["path"])

    def __fspath__(self) -> str:
        return self["path"]


def train_head(data: str | os.PathLike[str], output: str | os.PathLike[str], **options: Any) -> TrainedHead:
    """``extendserve train-head DATA -o OUTPUT``: a head for the class folders in ``data``, and its figures."""
    return TrainedHead(run("train-head", data, output=output, **options))


def build(output: str | os.PathLike[str], new_heads: Sequence[str | os.PathLike[str]] = (), **options: Any) -> Path:
    """``extendserve build --new-head ... -o OUTPUT``: the merged, verified model folder (and,
    unless ``no_store=True``, a version in BentoML's model store). ``from_model="extendserve-NAME:latest"``
    adds ``new_heads`` to a built model; ``drop_head=["NAME"]`` removes one."""
    if "from_model" in options:
        options["from"] = options.pop("from_model")
    run("build", output=output, new_head=list(new_heads), **options)
    return Path(output)
