"""Reading and writing the package's files, with errors that name the file and the remedy.

Every JSON the package produces goes through :func:`write_json`, which replaces a file only
once the new one is complete (an interrupted run or a full disk never leaves half a result,
nor destroys the previous one). Every JSON it reads goes through :func:`read_json`. Commands
that write call :func:`check_writable` on each output path before any work starts.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


class BadFileError(ValueError):
  """A file the package reads is corrupt, of the wrong kind, or unreadable; the message names
  the file and what to do."""


class OutputPathError(ValueError):
  """An output path cannot be written; raised before any work starts."""


def read_json(path: str | os.PathLike, what: str = "JSON file", remedy: str = "",
              fields: tuple = (), missing: str | None = None):
  """The JSON document at ``path``.

  ``what`` names the file's role and ``remedy`` what to do when it is bad (both go into the
  error). ``fields``: top-level keys the document must have. A missing file raises
  ``FileNotFoundError`` (with ``missing`` as the remedy, else ``remedy``); anything else
  wrong raises :class:`BadFileError`.
  """
  path = Path(path)
  tail = f"; {remedy}" if remedy else ""
  try:
    text = path.read_text()
  except FileNotFoundError:
    raise FileNotFoundError(f"{what} {path} does not exist" + (f"; {missing}" if missing else tail)) from None
  except UnicodeDecodeError as e:
    raise BadFileError(f"{what} {path} is not a text file ({e.reason}){tail}") from None
  except OSError as e:
    raise BadFileError(f"cannot read {what} {path}: {e.strerror or e}{tail}") from None
  try:
    doc = json.loads(text)
  except json.JSONDecodeError as e:
    cut = " (the file looks truncated: an interrupted write or a full disk?)" if e.pos >= len(text.rstrip()) else ""
    raise BadFileError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
                       f"{cut}{tail}") from None
  if fields:
    if not isinstance(doc, dict):
      raise BadFileError(f"{what} {path} holds a JSON {type(doc).__name__}, expected an object with "
                         f"{', '.join(fields)}{tail}")
    lacking = [f for f in fields if f not in doc]
    if lacking:
      raise BadFileError(f"{what} {path} lacks field(s) {', '.join(lacking)} (wrong kind of file, or "
                         f"written by another version){tail}")
  return doc


@contextlib.contextmanager
def reading(what: str, remedy: str = ""):
  """Turns a ``KeyError``/``TypeError``/``IndexError``/``AttributeError``/``ValueError`` raised
  while interpreting loaded documents (``what``: which files) into a :class:`BadFileError`
  naming them and the field."""
  try:
    yield
  except BadFileError:
    raise
  except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
    # AttributeError / ValueError: a field of the wrong JSON type (a list where an object was
    # expected, a string where a number was)
    detail = (f"field {e.args[0]!r} missing" if isinstance(e, KeyError) and e.args
              else f"a field of the wrong type: {type(e).__name__}: {e}")
    raise BadFileError(f"{what}: not the layout this version expects ({detail}; written by another version?)"
                       + (f"; {remedy}" if remedy else "")) from e


def _describe(path: Path, flag: str | None) -> str:
  return f"{flag} {path}" if flag else str(path)


def check_writable(path: str | os.PathLike, flag: str | None = None, directory: bool = False) -> Path:
  """Checks, before any work, that ``path`` can be written (a file, or with ``directory`` a
  folder to write into): its nearest existing ancestor is a writable directory and the path
  is not of the other kind. Creates missing parent folders. ``flag`` names the option the
  path came from. Raises :class:`OutputPathError`; returns the path."""
  path = Path(path)
  what = _describe(path, flag)

  def bad(why):
    raise OutputPathError(f"cannot write {what}: {why}; choose another path (nothing was run)")
  if path.exists():
    if directory and not path.is_dir():
      bad("it is a file, not a directory")
    if not directory and path.is_dir():
      bad("it is a directory; give a file name")
  folder = path if directory else path.parent
  probe = folder
  while not probe.exists():
    if probe.is_symlink():
      bad(f"{probe} is a broken link")
    probe = probe.parent
  if not probe.is_dir():
    bad(f"{probe} is a file, not a directory")
  try:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder, prefix=".mtfl_write_test"):
      pass
    if path.exists() and not directory and not os.access(path, os.W_OK):
      raise PermissionError(13, "Permission denied")
  except OSError as e:
    bad(f"{e.strerror or e} ({folder if not (path.exists() and not directory) else path})")
  return path


def write_json(path: str | os.PathLike, doc) -> Path:
  """Writes ``doc`` to ``path`` atomically. When the write fails (full disk, no permission)
  the previous file stays as it was, the document is rescued to the temp folder when
  possible, and the error names ``path`` and where the rescue went."""
  path = Path(path)
  text = json.dumps(doc, indent=1, default=float)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    tmp.replace(path)
  except OSError as e:
    with contextlib.suppress(OSError):
      tmp.unlink()
    rescue = ""
    with contextlib.suppress(OSError):
      fd, name = tempfile.mkstemp(prefix=f"mtfl_rescued_{path.stem}_", suffix=".json")
      with os.fdopen(fd, "w") as f:
        f.write(text)
      rescue = f"; the result was saved to {name} instead"
    msg = f"could not write {path}: {e.strerror or e} (any previous {path.name} is unchanged){rescue}"
    raise (type(e)(e.errno, msg) if e.errno else type(e)(msg)) from e
  return path
