"""Records, and refuses, every connection or name lookup a Python client makes to anything
but the loopback interface (tests/gcs_server.py). Clients written in C++ (tensorstore) are not
seen here; they are pointed at 127.0.0.1 by their environment variables instead."""

import os
import socket

_LOOPBACK = {"127.0.0.1", "::1", "localhost", "", None}
_installed = False


def _record(log_path: str, what: str) -> None:
  with open(log_path, "a", encoding="utf-8") as f:
    f.write(f"pid {os.getpid()}: {what}\n")


def install(log_path: str) -> None:
  global _installed
  if _installed:
    return
  _installed = True
  connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
  getaddrinfo = socket.getaddrinfo

  def checked(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK:
      _record(log_path, f"connect to {address[0]}:{address[1]}")
      raise ConnectionRefusedError(f"tests allow 127.0.0.1 only, not {address[0]}")

  def guarded_connect(sock, address):
    checked(sock, address)
    return connect(sock, address)

  def guarded_connect_ex(sock, address):
    checked(sock, address)
    return connect_ex(sock, address)

  def guarded_getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name not in _LOOPBACK:
      _record(log_path, f"name lookup of {name}")
      raise socket.gaierror(socket.EAI_NONAME, f"tests allow 127.0.0.1 only, not {name}")
    return getaddrinfo(host, *args, **kwargs)

  socket.socket.connect = guarded_connect
  socket.socket.connect_ex = guarded_connect_ex
  socket.getaddrinfo = guarded_getaddrinfo
