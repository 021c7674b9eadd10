"""One path type for local folders and Cloud Storage: every file genie_jax reads or writes
(workdirs, checkpoints, metrics, images, reports) goes through `etils.epath`, which Orbax
also uses, so `gs://bucket/dir` and `./dir` are handled by the same code.

Cloud Storage has no appends, renames of folders or local file handles, so the few places
that need them (an appended JSON-lines file, TensorBoard's event writer, the profiler's
trace writer) stage the files in a local folder and upload them (`LocalMirror`).

gs:// paths need `gcsfs` (installed with genie_jax). Credentials are those of the machine
(Application Default Credentials); `STORAGE_EMULATOR_HOST` points every client at a GCS
emulator instead (tests/gcs_server.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable

from etils import epath

PathLike = str | os.PathLike

# Schemes other than local paths that epath reaches.
REMOTE_PREFIXES = ("gs://",)


def is_remote(path: PathLike) -> bool:
  """True for a Cloud Storage path (gs://...)."""
  return os.fspath(path).startswith(REMOTE_PREFIXES)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path; local paths get `~` expanded and are made absolute."""
  if is_remote(p):
    return epath.Path(os.fspath(p))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p))))


def join(*parts: PathLike) -> str:
  """Joined path as a string (what logs, configs and JSON hold)."""
  return os.fspath(epath.Path(*[os.fspath(p) for p in parts]))


def check_bucket(p: PathLike, what: str) -> None:
  """For a gs:// path, raises ValueError when its bucket does not exist, so that a misspelt
  bucket stops a run before it builds data or a model rather than at its first write.

  Only Cloud Storage's "not found" counts: any other answer (no permission to read the
  bucket's metadata, a server that does not answer) is left to the first write to report.
  """
  if not is_remote(p):
    return
  bucket = os.fspath(p)[len("gs://"):].split("/", 1)[0]
  if not bucket:
    raise ValueError(f"{what}={os.fspath(p)} names no bucket (gs://BUCKET/PATH)")
  try:
    # A bounded wait: gcsfs retries a server that does not answer for about half a minute.
    _gcs().call("GET", "b/{}", bucket, json_out=True, timeout=10)
  except FileNotFoundError:
    raise ValueError(f"{what}={os.fspath(p)}: the Cloud Storage bucket gs://{bucket} does "
                     "not exist") from None
  except Exception:  # pylint: disable=broad-except
    pass


# Waits between attempts of a Cloud Storage write (a server restart, a dropped connection
# or an upload session that expired); then the error is raised, naming the object.
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0)


def _remote_write(target: epath.Path, write: Callable[[], object]) -> None:
  for delay in RETRY_DELAYS_S + (None,):
    try:
      write()
      return
    except Exception as e:  # pylint: disable=broad-except
      # Storage clients raise their own types (gcsfs: OSError or HttpError; aiohttp's).
      if delay is None:
        raise OSError(f"could not write {target} after {len(RETRY_DELAYS_S) + 1} attempts "
                      f"({type(e).__name__}: {e})") from e
      time.sleep(delay)


def write_bytes(target: PathLike, data: bytes) -> None:
  """Writes `data` so that a reader never sees half of it: locally through a temporary file
  and a rename; on Cloud Storage an object appears only once its upload is complete (failed
  uploads are retried, `RETRY_DELAYS_S`)."""
  target = path(target)
  if is_remote(target):
    _remote_write(target, lambda: target.write_bytes(data))
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / (target.name + ".tmp")
  tmp.write_bytes(data)
  os.replace(tmp, target)


def write_text(target: PathLike, text: str) -> None:
  """`write_bytes` of UTF-8 text."""
  write_bytes(target, text.encode("utf-8"))


def _gcs():
  """epath's gcsfs instance (fsspec caches one per set of arguments; these are epath's)."""
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.filesystem("gs", finalize_on_close=True)


def files_under(folder: PathLike) -> list[str]:
  """Paths relative to `folder` of every file under it, sorted."""
  folder = path(folder)
  if is_remote(folder):
    # fsspec's walk gives remote folders without their gs:// and skips a folder it fails to
    # list; find names every object under the prefix and raises on a failed listing.
    fs, prefix = _gcs(), os.fspath(folder)[len("gs://"):].rstrip("/") + "/"
    fs.invalidate_cache(prefix)  # Orbax writes through tensorstore, which gcsfs never sees.
    return sorted(name[len(prefix):] for name in fs.find(prefix))
  root = os.fspath(folder)
  return sorted(os.path.relpath(os.path.join(d, n), root)
                for d, _, names in os.walk(root) for n in names)


def copy_tree(source: PathLike, target: PathLike) -> list[str]:
  """Copies the files under `source` to `target` (either may be remote), replacing files
  of the same name; returns their paths relative to `source`."""
  source, target = path(source), path(target)
  names = files_under(source)
  for name in names:
    write_bytes(target / name, (source / name).read_bytes())
  return names


def move_tree(source: PathLike, target: PathLike) -> None:
  """Renames a folder; on Cloud Storage, which cannot rename, copies its files, checks that
  the target holds every one of them, and only then deletes the source's."""
  if not (is_remote(source) or is_remote(target)):
    os.rename(os.fspath(path(source)), os.fspath(path(target)))
    return
  copied = copy_tree(source, target)
  missing = sorted(set(copied) - set(files_under(target)))
  if missing:
    raise OSError(f"moving {source} to {target}: {len(missing)} of its {len(copied)} files "
                  f"are not in the target (e.g. {missing[0]}); the source is left as it is")
  path(source).rmtree()


class LocalMirror:
  """A local folder standing in for `target` for writers that speak only local paths.

  For a local target it is the target itself. For a remote one it is a fresh temporary
  folder whose files `sync` uploads (a file again whenever its size or modification time
  changed) and `close` uploads a last time and removes.
  """

  def __init__(self, target: PathLike):
    self.target = path(target)
    self.remote = is_remote(target)
    if self.remote:
      self.local = tempfile.mkdtemp(prefix="genie_jax_mirror_")
    else:
      self.local = os.fspath(self.target)
      os.makedirs(self.local, exist_ok=True)
    self._uploaded: dict[str, tuple[int, float]] = {}

  def sync(self) -> None:
    if not self.remote:
      return
    for root, _, files in os.walk(self.local):
      for name in files:
        local = os.path.join(root, name)
        stat = os.stat(local)
        if self._uploaded.get(local) == (stat.st_size, stat.st_mtime):
          continue
        with open(local, "rb") as f:
          write_bytes(self.target / os.path.relpath(local, self.local), f.read())
        self._uploaded[local] = (stat.st_size, stat.st_mtime)

  def close(self) -> None:
    if self.remote:
      self.sync()
      shutil.rmtree(self.local, ignore_errors=True)
