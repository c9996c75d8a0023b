"""Built models in BentoML's model store, as BentoML users expect: ``extendserve-NAME:VERSION``,
listed by ``bentoml models list``, packed into bentos by reference, moved with ``bentoml models
export`` / ``import``. The files are the same bytes as in the ``-o`` folder. No torch here."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

from ..errors import ExtendserveError
from .manifest import HEADS_DIR, MODEL_FILES, Manifest

PREFIX = "extendserve-"
DEFAULT_TAG = f"{PREFIX}default:latest"
SAVING_S = 120  # a version whose files changed this recently may still be being saved: left alone
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")


def store_name(name: str) -> str:
    """``NAME`` -> the store's model name, checked the way BentoML checks tags."""
    if not _NAME.match(name) or len(PREFIX + name) > 63:
        raise ExtendserveError(f"--name {name!r}: a model name is lowercase letters, digits, '-', '_' and '.', "
                               "starting and ending with a letter or digit (for example --name celebs-v2)")
    return PREFIX + name


def _versions_root(name: str) -> Path:
    """The store's folder of model ``name``, for a name that is a valid tag name and only then: a
    name is joined onto the store's path, so ``x/../../victim`` must never get here."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    if not _NAME.match(name) or len(name) > 63:
        raise ExtendserveError(f"{name[:80]!r} is not a model store name (lowercase letters, digits, '-', '_' and '.')")
    models = (Path(BentoMLContainer.bentoml_home.get()) / "models").resolve()
    root = (models / name).resolve()
    if root.parent != models:
        raise ExtendserveError(f"{name!r}: the store's folder for it is outside the model store ({root})")
    return root


def check_tag(tag: str, source: str) -> str:
    """``tag`` checked by BentoML's own tag rules before any file is touched (``source``: where it came
    from, named in the error: ``--model``, ``EXTENDSERVE_MODEL=``)."""
    from bentoml._internal.tag import Tag
    from bentoml.exceptions import BentoMLException

    try:
        Tag.from_taglike(tag)
    except (BentoMLException, ValueError):
        raise ExtendserveError(f"{source}{tag!r} is not a model store tag: NAME:VERSION (or NAME:latest), lowercase "
                               f"letters, digits, '-', '_' and '.', such as {DEFAULT_TAG}; see bentoml models list") from None
    if not _NAME.match(tag.split(":")[0].lower()):
        raise ExtendserveError(f"{source}{tag!r} is not a model store tag such as {DEFAULT_TAG}")
    return tag


def drop_broken_versions(name: str) -> list[str]:
    """Remove versions of ``name`` whose files do not match their manifest (a save killed half-way:
    BentoML copies a version into place file by file) and point ``latest`` at a whole one; the
    versions removed. Run before every save and when a service resolves a tag."""
    from .manifest import read_model_dir

    if not name.startswith(PREFIX):
        return []
    root, dropped = _versions_root(name), []
    if not root.is_dir() or root.is_symlink():
        return dropped
    for version in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        files = [f for f in version.rglob("*") if f.is_file()]
        if files and time.time() - max(f.stat().st_mtime for f in files) < SAVING_S:
            continue  # written a moment ago: maybe a save in progress in another process
        try:
            if not (version / "model.yaml").is_file():
                raise ExtendserveError("no model.yaml")
            read_model_dir(version)
        except ExtendserveError as e:
            shutil.rmtree(version, ignore_errors=True)
            dropped.append(f"{name}:{version.name}")
            print(f"removed {name}:{version.name} from the model store: a half-saved version ({str(e)[:120]})",
                  file=sys.stderr)
    latest = root / "latest"
    if dropped and latest.is_file() and not (root / latest.read_text().strip()).is_dir():
        whole = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: (p / "model.yaml").stat().st_mtime)
        if whole:
            latest.write_text(whole[-1].name)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return dropped


def save_to_store(model_dir: str | os.PathLike[str], name: str, manifest: Manifest | None = None) -> tuple[str, bool]:
    """Save a built, verified model folder as a new version of ``extendserve-NAME``: (its tag,
    True), or (the latest version's tag, False) when that one is the same model already (same
    ``model.onnx`` and CPU precision), so rebuilding changes nothing in the store.
    ``manifest``: the folder's, when the caller holds it (publishing), so it is not read back."""


    model_dir = Path(model_dir)
    files = {f: (model_dir / f).read_bytes() for f in MODEL_FILES}
    if (model_dir / HEADS_DIR).is_dir():
        files |= {f"{HEADS_DIR}/{p.name}": p.read_bytes() for p in sorted((model_dir / HEADS_DIR).iterdir()) if p.is_file()}
    return save_files_to_store(files, name, manifest or Manifest.from_bytes(files["manifest.json"], model_dir))


def save_files_to_store(files: dict[str, bytes], name: str, manifest: Manifest) -> tuple[str, bool]:
    """Save a built model's files (relative path -> bytes: exactly what its build verified) as a
    new version of ``extendserve-NAME``, or return the latest version's tag when it is this model."""
    import bentoml

    from .. import __version__

    drop_broken_versions(store_name(name))
    same = _latest_if_same(store_name(name), manifest)
    if same is not None:
        return same, False
    with bentoml.models.create(store_name(name), labels={"producer": "extendserve", "extendserve": __version__},
                               metadata=manifest.summary()) as m:
        for rel, data in files.items():
            target = Path(m.path_of(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return str(m.tag), True


def _latest_if_same(name: str, manifest: Manifest) -> str | None:
    """The tag of ``name:latest`` when it is this very model (only the latest: keeping an older
    identical version would leave ``latest`` serving another model than the one just built)."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        latest = bentoml.models.get(f"{name}:latest")
        have = Manifest.read(Path(latest.path_of("manifest.json")))
    except (NotFound, ExtendserveError):
        return None
    same = have.model_sha256 == manifest.model_sha256 and have.cpu_precision == manifest.cpu_precision
    # a version saved before heads travelled inside models cannot be grown from: save this one
    same = same and (Path(latest.path_of(HEADS_DIR)).is_dir() or not manifest.new_heads)
    return str(latest.tag) if same else None


def versions(name: str) -> int:
    """How many versions of store model ``name`` there are."""
    root = _versions_root(name)
    return sum(1 for p in root.iterdir() if p.is_dir()) if root.is_dir() else 0


def resolve(tag: str, source: str = "EXTENDSERVE_MODEL=") -> tuple[str, Path]:
    """A tag (``latest`` allowed) -> the concrete ``name:version`` and its folder, from the local
    store only (no remote pull at start-up), or an error with the fix (naming ``source``, where the
    tag came from). The tag is checked before any file of the store is looked at."""
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    check_tag(tag, source)
    drop_broken_versions(tag.split(":")[0].lower())
    try:
        model = bentoml.models.get(tag)
    except NotFound:
        name = tag.split(":")[0]
        raise ExtendserveError(
            f"no model {tag} in the BentoML model store ({os.environ.get('BENTOML_HOME', '~/bentoml')})"
            + did_you_mean(name)
            + f"; build one with: extendserve build --new-head HEAD.pt -o models/{name.removeprefix(PREFIX)} "
            "(make serve builds the demo), or import one: bentoml models import FILE.bentomodel; see bentoml models list"
        ) from None
    except (BentoMLException, ValueError) as e:
        raise ExtendserveError(f"{source}{tag!r}: {e}; give a tag such as {DEFAULT_TAG}") from None
    return str(model.tag), Path(model.path_of("manifest.json")).parent


def did_you_mean(name: str) -> str:
    """``celebs`` for ``extendserve-celebs:latest``: the tag meant, when the store has it."""
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    if name.startswith(PREFIX):
        return ""
    try:
        found = bentoml.models.get(f"{PREFIX}{name}:latest")
    except (NotFound, BentoMLException, ValueError):
        return ""
    return f"; extendserve's models are named {PREFIX}NAME: did you mean {PREFIX}{name}:latest (now {found.tag})?"


def packed_tag(service_file: str | os.PathLike[str]) -> str | None:
    """Inside a bento: the extendserve model it was built with (from its ``bento.yaml``), so
    ``bentoml serve NAME:VERSION`` serves the model packed with it, from any directory."""
    import yaml

    bento_yaml = Path(service_file).resolve().parents[2] / "bento.yaml"  # BENTO/src/service/service.py
    if not bento_yaml.is_file():
        return None
    info = yaml.safe_load(bento_yaml.read_text("utf-8")) or {}
    for svc in info.get("services") or []:
        for m in svc.get("models") or []:
            if str(m.get("tag", "")).startswith(PREFIX):
                return str(m["tag"])
    return None
