"""SIGTERM (what schedulers send before killing a job) -> save a checkpoint at the next step and stop."""

from __future__ import annotations

import signal
import threading


class Preempted(Exception):
  """Raised after the checkpoint of a preempted stage has been written."""


_requested = threading.Event()


def install_handler() -> None:
  if threading.current_thread() is not threading.main_thread():
    return

  def handler(signum, frame):  # noqa: ARG001
    _requested.set()

  signal.signal(signal.SIGTERM, handler)


def requested() -> bool:
  return _requested.is_set()


def clear() -> None:
  _requested.clear()
