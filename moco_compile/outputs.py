"""The user's files: where moco may write, and writing there without losing anything.

moco never deletes or overwrites anything it did not create.  Rules, checked
before the long work starts and again just before the write:

1. An output directory is never the current directory, the home directory or
   one of their ancestors (``/`` included), nor a directory holding an input
   file (equal to or an ancestor of the input's directory), even with ``force``.
2. A missing or empty output directory is used as is.  A non-empty one is
   replaced only when it holds a previous moco output (a :data:`MANIFEST` that
   lists the files moco wrote there, by paths relative to it: ``model.onnx``,
   ``1/model.onnx``), ``force`` is given and it holds no file the manifest does
   not list.
3. An output file is never an input.  An existing one is replaced only when moco
   wrote it (:func:`written_by_moco`: the mark its kind of file carries names moco) and
   ``force`` is given.
4. Writes go to a staging sibling that is renamed into place: a directory by
   moving the old output aside, renaming the new one in, and only then removing
   the old one's listed files; a file by ``os.replace``.  What moco creates
   follows the umask.

Every refusal and every ``OSError`` while writing is an :class:`OutputError`
that says what to do.
"""
from __future__ import annotations

import html
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath

from moco_compile.errors import NotACompileOutputError, OutputError

BUILD_MODEL = "model.onnx"  # the compiled graph in a build directory
MANIFEST = "moco-manifest.json"  # in every output directory moco writes: the files it wrote there
HOW_TO_COMPILE = ("give the directory `moco compile MODEL.onnx --calib CALIB.npz --out DIR` "
                  "(or `moco_compile.compile(model, calibration, out_dir=DIR)`) wrote")


def _generator() -> str:
    try:
        return f"moco {version('moco-compile')}"
    except PackageNotFoundError:  # a source checkout that was not pip-installed
        return "moco"


GENERATOR = _generator()  # marks the files moco writes (manifest, frame metadata, HTML <meta>)
FRAME_MARK_KEY = b"moco.generator"  # schema metadata of every frame (Arrow IPC) file moco writes: GENERATOR
PAGE_MARK = f'<meta name="generator" content="{html.escape(GENERATOR)}">'  # in the <head> of every page moco writes
_PAGE_MARK = re.compile(rb'<meta name="generator" content="([^"]*)"')
_PAGE_HEAD_BYTES = 1024  # a page's mark is looked for this far in


def _frame_mark(path: Path) -> str:
    import pyarrow as pa  # the frame format's library, needed only to read a frame's mark

    try:
        with pa.memory_map(str(path), "r") as source:
            metadata = pa.ipc.open_file(source).schema.metadata or {}
    except pa.ArrowException:  # not an Arrow IPC file
        return ""
    return metadata.get(FRAME_MARK_KEY, b"").decode("utf-8", "replace")


def _page_mark(path: Path) -> str:
    with open(path, "rb") as stream:
        found = _PAGE_MARK.search(stream.read(_PAGE_HEAD_BYTES))
    return found.group(1).decode("utf-8", "replace") if found else ""


def _json_mark(path: Path) -> str:
    return _generator_of(json.loads(path.read_text(encoding="utf-8")))


def _names_moco(generator: str) -> bool:
    """The one rule for every kind of file: its mark names moco (any version)."""
    return generator.startswith("moco")


def _generator_of(data: object) -> str:
    """The ``generator`` of a parsed JSON file (a manifest, an evaluation): "" unless it is an object."""
    return str(data.get("generator", "")) if isinstance(data, dict) else ""


# How each kind of file moco writes carries its mark: a reader of the generator it names.
MARKS: dict[str, Callable[[Path], str]] = {
    "frame": _frame_mark,  # Arrow IPC: schema metadata FRAME_MARK_KEY
    "page": _page_mark,  # HTML: PAGE_MARK, a generator <meta> near the top
    "json": _json_mark,  # a JSON object with a "generator" key (evaluations; the manifest too)
}


def written_by_moco(path: str | os.PathLike, kind: str) -> bool:
    """Whether the ``kind`` file (a key of :data:`MARKS`) at ``path`` is one moco wrote: its mark
    names moco.  A file that cannot be read or parsed as that kind is not."""
    reader = MARKS[kind]
    try:
        return _names_moco(reader(Path(path)))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: not a file moco wrote
        return False


def check_output_dir(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                     force: bool = False) -> None:
    """Raise :class:`OutputError` unless ``out_dir`` may receive a moco output (rules 1 and 2)."""
    _previous_output(Path(out_dir), inputs, force)


@contextmanager
def staged_output_dir(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                      force: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; on success, list its files in a manifest and swap it
    into place at ``out_dir`` (rule 4), after checking ``out_dir`` again."""
    out_dir = Path(out_dir)
    inputs = list(inputs)
    _previous_output(out_dir, inputs, force)
    target = out_dir.resolve()
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        _write_manifest(staging, _files_under(staging))
        previous = _previous_output(out_dir, inputs, force)
        if previous is None:
            os.replace(staging, target)  # a missing or empty directory
        else:
            _swap(staging, target, previous)
    except OSError as error:
        raise OutputError(f"could not write {out_dir}: {error}; nothing there was changed. "
                          "Check the disk and permissions and run again") from error
    finally:
        if staging is not None and staging.exists():
            _remove_listed(staging, _files_under(staging))


def check_output_file(path: str | os.PathLike, what: str, kind: str,
                      inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> None:
    """Raise :class:`OutputError` unless the ``what`` (e.g. "frame") may be written at ``path`` (rule 3).

    ``kind`` (a key of :data:`MARKS`) says how a file there would carry moco's mark.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give the path of the {what} file to write")
    if any(path.resolve() == Path(source).resolve() for source in inputs):
        raise OutputError(f"{path} is an input of this command; give another path for the {what}")
    if path.exists():
        if not written_by_moco(path, kind):
            raise OutputError(f"{path} exists and was not written by moco, which never overwrites such a "
                              f"file; give another path for the {what} or move the file away")
        if not force:
            raise OutputError(f"{path} holds a {what} moco wrote earlier; pass --force (force=True) to "
                              "replace it, or give another path")
    _check_creatable(path)


@contextmanager
def staged_output_file(path: str | os.PathLike, what: str, kind: str,
                       inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success, check ``path`` again and
    ``os.replace`` the temporary file onto it (rule 4)."""
    path = Path(path)
    inputs = list(inputs)
    check_output_file(path, what, kind, inputs, force)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(handle)
        temporary = Path(name)
        yield temporary
        check_output_file(path, what, kind, inputs, force)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except OSError as error:
        raise OutputError(f"could not write {path}: {error}; nothing there was changed. "
                          "Check the disk and permissions and run again") from error
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)


def listed_files(directory: str | os.PathLike) -> list[str] | None:
    """The files the moco manifest in ``directory`` lists (paths relative to it), or None when
    ``directory`` holds no moco output."""
    return _read_manifest(Path(directory))


def build_model(build_dir: str | os.PathLike) -> Path:
    """The compiled graph of the moco build in ``build_dir`` (its manifest lists ``model.onnx``);
    :class:`~moco_compile.errors.NotACompileOutputError` if ``build_dir`` is no such build.  What
    the runtime reads of a build; :class:`moco_compile.build.Build` reads the rest."""
    return build_files(build_dir, [BUILD_MODEL])[0]


def build_files(build_dir: str | os.PathLike, names: Iterable[str], *, manifest: bool = True) -> list[Path]:
    """The paths of ``names`` in the moco build ``build_dir``, each a file there and, with
    ``manifest``, listed in its manifest; :class:`~moco_compile.errors.NotACompileOutputError`
    saying what is missing and what to do otherwise."""
    build_dir, names = Path(build_dir), list(names)
    if not build_dir.exists():
        raise NotACompileOutputError(f"{build_dir} does not exist; {HOW_TO_COMPILE}")
    if not build_dir.is_dir():
        raise NotACompileOutputError(f"{build_dir} is not a directory; {HOW_TO_COMPILE}")
    if manifest:
        listed = listed_files(build_dir)
        if listed is None:
            raise NotACompileOutputError(f"{build_dir} is not a moco build: it has no {MANIFEST} listing the files "
                                         f"moco wrote there; {HOW_TO_COMPILE}")
        unlisted = [name for name in names if name not in listed]
        if unlisted:
            raise NotACompileOutputError(f"{build_dir} is not a moco build: its {MANIFEST} does not list "
                                         f"{', '.join(unlisted)} (another moco command's output?); {HOW_TO_COMPILE}")
    absent = [name for name in names if not (build_dir / name).is_file()]
    if absent and manifest:
        raise NotACompileOutputError(f"{build_dir} is a damaged moco build: it lacks {', '.join(absent)}, listed in "
                                     f"its {MANIFEST}; compile again")
    if absent:
        raise NotACompileOutputError(f"{build_dir} is not a moco compile output: it has no {' or '.join(absent)}; "
                                     f"{HOW_TO_COMPILE}")
    return [build_dir / name for name in names]


def add_to_manifest(path: str | os.PathLike) -> None:
    """List the file ``path`` in its directory's manifest, when that directory is a moco output."""
    path = Path(path)
    listed = _read_manifest(path.parent)
    if listed is not None and path.name not in listed:
        try:
            _write_manifest(path.parent, sorted([*listed, path.name]))
        except OSError as error:
            raise OutputError(f"wrote {path} but could not list it in {path.parent / MANIFEST}: {error}; "
                              f"`moco compile --force` will refuse to replace {path.parent} until you "
                              f"remove {path.name}") from error


def _previous_output(out_dir: Path, inputs: Iterable[str | os.PathLike], force: bool) -> list[str] | None:
    """Check ``out_dir`` (rules 1 and 2); the files a previous output there lists, or None if there is none."""
    target = out_dir.resolve()
    for place, name in ((Path.cwd(), "the current directory"), (Path.home(), "your home directory")):
        if _within(place.resolve(), target):
            which = "is" if place.resolve() == target else "contains"
            raise OutputError(f"refusing to write the output into {out_dir}: it {which} {name}, and moco "
                              "replaces its output directory as a whole. Give a new directory, e.g. --out build")
    for source in inputs:
        if _within(Path(source).resolve().parent, target):
            raise OutputError(f"refusing to write the output into {out_dir}: it holds the input {source}. "
                              "Give a new directory for the output")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{out_dir} exists and is not a directory; choose another output directory")
    if not target.exists():
        _check_creatable(target)
        return None
    if not os.access(target, os.W_OK) or not os.access(target.parent, os.W_OK):
        raise OutputError(f"cannot write to {out_dir}: it or its parent is not writable; "
                          "choose an output directory you can write to")
    if not any(target.iterdir()):
        return None
    listed = _read_manifest(target)
    if listed is None:
        raise OutputError(f"{out_dir} is not empty and is not a moco output (it has no {MANIFEST}); moco "
                          "never deletes files it did not write. Choose a new or empty directory")
    if not force:
        raise OutputError(f"{out_dir} holds a previous moco output; pass --force (force=True) to replace "
                          "it, or choose another directory")
    foreign = _unlisted(target, [*listed, MANIFEST])
    if foreign:
        raise OutputError(f"{out_dir} holds a previous moco output but also files moco did not write: "
                          f"{', '.join(foreign)}; move them away (moco never deletes them) or choose "
                          "another directory")
    return listed


def _unlisted(directory: Path, listed: list[str]) -> list[str]:
    """What under ``directory`` the ``listed`` paths do not account for: files not listed, and
    directories (shown with a trailing ``/``) that hold no listed file, relative to ``directory``."""
    folders = {str(parent) for name in listed for parent in PurePosixPath(name).parents}
    unlisted = []
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if entry.is_dir() and not entry.is_symlink() and name in folders:
            unlisted += [f"{name}/{inner}" for inner in _unlisted(entry, _inside(name, listed))]
        elif entry.is_dir() and not entry.is_symlink():
            unlisted.append(name + "/")
        elif name not in listed:
            unlisted.append(name)
    return unlisted


def _inside(folder: str, listed: list[str]) -> list[str]:
    """The ``listed`` paths under ``folder``, relative to it."""
    return [name[len(folder) + 1:] for name in listed if name.startswith(folder + "/")]


def _files_under(directory: Path) -> list[str]:
    """Every file under ``directory``, as sorted relative POSIX paths."""
    return sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*") if not path.is_dir())


def _within(place: Path, target: Path) -> bool:
    """Whether ``target`` is ``place`` or one of its ancestors."""
    return target == place or target in place.parents


def _check_creatable(path: Path) -> None:
    """``path`` does not exist yet: its nearest existing ancestor must be a writable directory."""
    ancestor = path.resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write to {path}: {ancestor} is a file, not a directory; "
                          "choose another path")
    if not os.access(ancestor, os.W_OK):
        raise OutputError(f"cannot write to {path}: {ancestor} is not writable; "
                          "choose a path you can write to")


def _read_manifest(directory: Path) -> list[str] | None:
    """The file names a moco manifest in ``directory`` lists, or None when there is no valid one."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return None
    if not _names_moco(_generator_of(manifest)):
        return None
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(name, str) and _relative(name) for name in files):
        return None  # moco lists plain relative paths only; anything else is not its manifest
    return files


def _relative(name: str) -> bool:
    """Whether ``name`` is a normalised relative POSIX path that stays inside its directory."""
    path = PurePosixPath(name)
    return bool(path.parts) and not path.is_absolute() and str(path) == name and ".." not in path.parts


def _write_manifest(directory: Path, names: list[str]) -> None:
    text = json.dumps({"generator": GENERATOR, "files": names}, indent=1) + "\n"
    handle, name = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".partial", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(name, 0o666 & ~_umask())
        os.replace(name, directory / MANIFEST)
    finally:
        Path(name).unlink(missing_ok=True)


def _swap(staging: Path, target: Path, previous: list[str]) -> None:
    """Move the previous output aside, rename ``staging`` into place, then remove the previous one."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous-", dir=target.parent))
    os.replace(target, aside)  # onto the empty directory mkdtemp reserved
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(aside, target)
        raise
    _remove_listed(aside, [*previous, MANIFEST])


def _remove_listed(directory: Path, names: list[str]) -> None:
    """Remove the listed files of ``directory``, then their folders and the directory, each only
    if nothing else is left in it."""
    for name in names:
        (directory / name).unlink(missing_ok=True)
    folders = {parent for name in names for parent in PurePosixPath(name).parents if str(parent) != "."}
    for folder in [*sorted(folders, key=lambda f: len(f.parts), reverse=True), PurePosixPath(".")]:
        try:
            (directory / folder).rmdir()
        except OSError:  # missing, or something moco did not write appeared meanwhile: leave it
            pass


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
