"""Worker processes that run reward checks in parallel, returning futures.

    with RewardPool(num_workers=8, preload=["score_jax.rewards.math"]) as pool:
      future = pool.submit(math.check, [(response, reference), ...])   # returns at once
      ...                                                              # device work
      rewards = future.result()                                        # [bool, ...]

Calls may also be given one by one, `pool.submit([(fn, args), ...])`, to mix functions.
`fn` must be a module-level function (it is pickled by name) and so must its arguments.

Workers are fresh interpreters (`python -c`, never a fork of the caller: the caller may run
JAX, whose threads a fork would break), one check at a time each, in their main thread (so
math-verify's SIGALRM timeouts work). Each check has a wall-clock limit: a worker that exceeds
it, or dies, is killed and replaced, and its check returns `default` (0.0: no reward); so do
checks that raise (logged). One dispatcher thread feeds the workers; submissions are served in
order.
"""

import collections
import concurrent.futures
import dataclasses
import importlib
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from multiprocessing import connection
from typing import Any, Callable, Optional, Sequence, Union

_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
         "from score_jax.rewards import pool; "
         "pool._serve(int(sys.argv[2]), json.loads(sys.argv[3]))")
_STOP = b""
_EXIT_WAIT_S = 2.0

Call = tuple[Callable[..., Any], tuple[Any, ...]]


class _Job:
  """One submission: its future and the results gathered so far."""

  def __init__(self, size: int, default: Any):
    self.future: concurrent.futures.Future = concurrent.futures.Future()
    self.future.set_running_or_notify_cancel()
    self.results: list[Any] = [default] * size
    self.remaining = size
    self.default = default
    if size == 0:
      self.future.set_result([])

  def finish(self, index: int, value: Any) -> None:
    self.results[index] = value
    self.remaining -= 1
    if self.remaining == 0:
      self.future.set_result(self.results)


@dataclasses.dataclass
class _Task:
  job: _Job
  index: int
  blob: bytes          # pickled (fn, args)
  timeout_s: float


@dataclasses.dataclass
class _Worker:
  proc: subprocess.Popen
  conn: connection.Connection
  ready: bool = False
  task: Optional[_Task] = None
  deadline: float = float("inf")


class RewardPool:
  """`num_workers` worker processes running checks; see the module docstring."""

  def __init__(self, num_workers: int, timeout_s: float = 60.0, preload: Sequence[str] = ()):
    """Starts the workers (they import `preload`, module names, before taking checks).

    Args:
      num_workers: number of worker processes (>= 1).
      timeout_s: default wall-clock limit of one check (>0); `submit` may override it.
      preload: modules each worker imports at start, e.g. "score_jax.rewards.math" (importing
        math-verify takes about a second, which would otherwise count against a check).
    """
    if num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if not timeout_s > 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    self._timeout_s = float(timeout_s)
    self._preload = list(preload)
    self._lock = threading.Lock()
    self._queue: collections.deque[_Task] = collections.deque()
    self._closing = False
    self._broken: Optional[BaseException] = None
    self._wake_r, self._wake_w = connection.Pipe(duplex=False)
    self._workers = [self._start_worker() for _ in range(num_workers)]
    self._thread = threading.Thread(target=self._dispatch, name="RewardPool", daemon=True)
    self._thread.start()

  def submit(self, fn_or_calls: Union[Callable[..., Any], Sequence[Call]],
             args: Optional[Sequence[tuple[Any, ...]]] = None, *, default: Any = 0.0,
             timeout_s: Optional[float] = None) -> concurrent.futures.Future:
    """Schedules checks; the future's result lists their values in order.

    Args:
      fn_or_calls: a module-level function, called as `fn(*a)` for each `a` in `args`; or,
        with `args` None, a sequence of `(fn, args)` pairs.
      args: argument tuples for `fn`.
      default: the value of a check that raised, timed out or whose worker died.
      timeout_s: wall-clock limit of each check (default: the pool's).
    """
    calls = fn_or_calls if args is None else [(fn_or_calls, tuple(a)) for a in args]
    timeout_s = self._timeout_s if timeout_s is None else float(timeout_s)
    if not timeout_s > 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    blobs = []
    for fn, fn_args in calls:
      try:
        blobs.append(pickle.dumps((fn, tuple(fn_args))))
      except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise ValueError(f"cannot send {fn!r} and its arguments to a worker: {e}") from e
    job = _Job(len(blobs), default)
    with self._lock:
      if self._closing:
        raise RuntimeError("RewardPool is closed")
      if self._broken is not None:
        raise RuntimeError(f"RewardPool stopped: {self._broken}") from self._broken
      self._queue.extend(_Task(job, i, blob, timeout_s) for i, blob in enumerate(blobs))
      self._wake_w.send_bytes(b"")
    return job.future

  def map(self, fn_or_calls: Union[Callable[..., Any], Sequence[Call]],
          args: Optional[Sequence[tuple[Any, ...]]] = None, **kwargs: Any) -> list[Any]:
    """`submit(...).result()`: blocks until every check is done."""
    return self.submit(fn_or_calls, args, **kwargs).result()

  def close(self) -> None:
    """Finishes the submitted checks, then stops the workers. Idempotent."""
    with self._lock:
      if not self._closing:
        self._closing = True
        self._wake_w.send_bytes(b"")
    self._thread.join()
    self._wake_r.close()
    self._wake_w.close()

  def __enter__(self) -> "RewardPool":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  # --- the dispatcher thread -----------------------------------------------------------------

  def _start_worker(self) -> _Worker:
    ours, theirs = socket.socketpair()
    path = [os.path.abspath(p) for p in sys.path]
    try:
      proc = subprocess.Popen(
          [sys.executable, "-c", _BOOT, json.dumps(path), str(theirs.fileno()),
           json.dumps(self._preload)],
          pass_fds=(theirs.fileno(),), start_new_session=True)
    finally:
      theirs.close()
    return _Worker(proc, connection.Connection(ours.detach()))

  def _dispatch(self) -> None:
    try:
      self._run()
    except BaseException as e:  # pylint: disable=broad-except  (a bug here: fail the futures)
      with self._lock:
        self._broken = self._broken or e
      raise
    finally:
      with self._lock:
        self._fail_unfinished()
      self._stop_workers()

  def _run(self) -> None:
    """Feeds idle workers, collects results and enforces deadlines until closed and idle."""
    while True:
      with self._lock:
        if self._broken is not None:
          return
        if self._closing and not self._queue and not any(w.task for w in self._workers):
          return
        now = time.monotonic()
        for worker in self._workers:
          if worker.ready and worker.task is None and self._queue:
            self._send(worker, self._queue.popleft(), now)
      deadline = min(w.deadline for w in self._workers)
      timeout = None if deadline == float("inf") else max(deadline - time.monotonic(), 0.0)
      ready = connection.wait([self._wake_r] + [w.conn for w in self._workers], timeout)
      if self._wake_r in ready:
        while self._wake_r.poll():
          self._wake_r.recv_bytes()
      for i, worker in enumerate(self._workers):
        if worker.conn in ready:
          self._receive(i)
      now = time.monotonic()
      for i, worker in enumerate(self._workers):
        if worker.task is not None and now >= worker.deadline:
          logging.warning("reward check exceeded %.1f s; restarting its worker",
                          worker.task.timeout_s)
          self._replace(i)

  def _send(self, worker: _Worker, task: _Task, now: float) -> None:
    worker.task, worker.deadline = task, now + task.timeout_s
    try:
      worker.conn.send_bytes(task.blob)
    except OSError:
      pass  # The worker died; `_receive` sees EOF and replaces it.

  def _receive(self, i: int) -> None:
    worker = self._workers[i]
    try:
      status, value = pickle.loads(worker.conn.recv_bytes())
    except (EOFError, OSError):
      if not worker.ready:
        with self._lock:
          self._broken = RuntimeError(
              f"reward worker exited with {worker.proc.wait()} before it was ready "
              f"(preload {self._preload})")
        return
      logging.warning("reward worker died; restarting it")
      self._replace(i)
      return
    if status == "ready":
      worker.ready = True
      return
    task = worker.task
    worker.task, worker.deadline = None, float("inf")
    if status == "error":
      logging.warning("reward check raised %s", value)
      value = task.job.default
    task.job.finish(task.index, value)

  def _replace(self, i: int) -> None:
    """Kills worker i (its check gets the default) and starts another."""
    worker = self._workers[i]
    worker.proc.kill()
    worker.proc.wait()
    worker.conn.close()
    if worker.task is not None:
      worker.task.job.finish(worker.task.index, worker.task.job.default)
    self._workers[i] = self._start_worker()

  def _fail_unfinished(self) -> None:
    """Fails the futures of queued and running checks (lock held; none after a clean close)."""
    tasks = list(self._queue) + [w.task for w in self._workers if w.task is not None]
    self._queue.clear()
    for task in tasks:
      if not task.job.future.done():
        error = RuntimeError("RewardPool stopped before this check finished")
        error.__cause__ = self._broken
        task.job.future.set_exception(error)

  def _stop_workers(self) -> None:
    for worker in self._workers:
      try:
        worker.conn.send_bytes(_STOP)
      except OSError:
        pass
    deadline = time.monotonic() + _EXIT_WAIT_S
    for worker in self._workers:
      try:
        worker.proc.wait(max(deadline - time.monotonic(), 0.0))
      except subprocess.TimeoutExpired:
        worker.proc.kill()
        worker.proc.wait()
      worker.conn.close()


def _serve(fd: int, preload: Sequence[str]) -> None:
  """A worker's main loop: runs the checks it receives on `fd` until told to stop."""
  conn = connection.Connection(fd)
  for name in preload:
    importlib.import_module(name)
  conn.send_bytes(pickle.dumps(("ready", None)))
  while True:
    try:
      blob = conn.recv_bytes()
    except EOFError:
      return
    if blob == _STOP:
      return
    try:
      fn, args = pickle.loads(blob)
      reply = pickle.dumps(("ok", fn(*args)))
    except BaseException as e:  # pylint: disable=broad-except  (reported to the parent)
      reply = pickle.dumps(("error", f"{type(e).__name__}: {e}"))
    conn.send_bytes(reply)
