"""Installs the network guard in every Python process started with GENIE_TEST_NET_LOG set and
this folder on PYTHONPATH (tests/gcs_server.py)."""

import os

if os.environ.get("GENIE_TEST_NET_LOG"):
  import netguard_lib  # pylint: disable=g-import-not-at-top
  netguard_lib.install(os.environ["GENIE_TEST_NET_LOG"])
