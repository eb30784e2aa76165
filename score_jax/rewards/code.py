"""Unit-test reward for code: run a program and its tests in a sandbox.

`check(program, tests)` runs `program`, then `tests` (statements such as asserts) in the same
namespace (a module named "solution"), in a fresh Python process that sees the standard
library only (`python -I -S`), and says whether the tests ran to their end.

The program is untrusted model output. The run is contained in layers, each used where the
machine allows it (`Result.isolation` names the layers a run got; Linux 5.3 or later):

* Always: its own session and process group; a fresh temporary directory as cwd (removed
  afterwards); an empty environment; stdin from /dev/null; stdout and stderr read up to
  `_OUTPUT_LIMIT` bytes, after which the pipe is closed; limits on CPU seconds, address
  space, file size, open files and core files; PR_SET_NO_NEW_PRIVS; a wall-clock timeout
  after which every process of the run is killed; a Python audit hook (below).
* "seccomp" (x86_64, aarch64): the kernel refuses signal handlers and exec to the run.
* Started as root (CI and our machines): the run drops to a uid of its own ("uid":
  `_UID_BASE` + the launcher's pid, no groups), so RLIMIT_NPROC binds, root-only files stay
  closed and nothing of ours can be signalled; and new namespaces: network ("net": no
  interface is up, so no connection to anything, localhost included), PID ("pid": the
  program is PID 1 of its namespace; when it ends or is killed, the kernel kills all it
  started), mount ("mnt"; "tmp": private tmpfs, `_TMPFS_OPTIONS`, over the run's directory,
  /tmp, /var/tmp and /dev/shm; "proc": a /proc that shows only the run) and IPC ("ipc").
* Started as another user: the same namespaces inside a new user namespace ("user") where
  the kernel allows unprivileged ones (no uid change; capabilities dropped after set-up).
  Where neither uid nor namespaces are available, the audit hook also refuses sockets and
  fork: network use and fork bombs are then stopped inside Python only, files in
  world-writable directories (/tmp) stay reachable, and the run's directory is bounded only
  by the file-size limit per file.

Passing. The host sends the run a random nonce through stdin, which the run reads and
replaces by /dev/null before any program code runs. Every status line the harness writes (to
a pipe the program can write to but not read) starts with the nonce, so the program cannot
forge one; the "pass" line is written only after the tests' code has returned normally, and
only by the harness's own process (not by a fork of it, which could otherwise pursue
whichever branch passes). So `sys.exit(0)` or `os._exit(0)` before or during the tests, a
killed or crashed process, an atexit handler, or forged output all fail. The harness keeps
its own references to what it needs (`exec`, `os.write`, ...; `assert` raises the real
AssertionError whatever the builtins say). The nonce is a local variable of the harness;
the ways to its frame or memory are closed: the audit hook (which Python lets no one
remove) refuses `sys._getframe`, traceback and generator frames, tracing and profiling,
`gc` object walks, ctypes, /proc/*/mem and links, and exec; seccomp refuses signal
handlers (which receive the running frame) and exec. The hook also refuses audit hooks of
the program's, which would be handed the tests' code (and so their expected values).

Tests the program cannot make vacuous. The tests are trusted; all the program makes is not.
Before the program runs, the harness compiles the tests (`_prepare_tests`) and prepares the
namespace they will run in (`_make_test_environment`), binding all it uses then:

* Values from the program are plain data. Each callable the program defines reaches the
  tests wrapped: its result must be made of exact builtin types (None, bool, int, float,
  complex, str, bytes, bytearray, range, builtin classes; list, tuple, set, frozenset, dict,
  nested), so no object with the program's `__eq__`, `__ne__`, `__bool__`, `__sub__`,
  `__class__`, ... (nor a subclass of int, str, ... with them) reaches the tests, at any
  depth; and the tests get a deep copy of it, which the program cannot change afterwards
  (say from a gc callback that runs between the check and the comparison). An exact
  Counter, OrderedDict or defaultdict becomes a dict with the same items (MBPP compares them
  with dicts). A record class (class attributes that are atoms, no special methods but
  `__init__`, `__repr__`, `__str__`) may return its instances: MBPP's tests build
  `Pair(5, 24)` and `Node(1)` trees with the program's classes and pass them back to it.
* Asserts are strict: the tests' asserts are rewritten (`ast`) so that every operand of a
  comparison other than `is`, and every value tested for truth, is replaced by such a plain
  copy (or fails); then `==`, `<`, `in` and truth are the interpreter's own. Numbers
  compare by value as Python does (5 == 5.0, True == 1): canonical solutions return 2.0
  where the tests write 2.
* The tests' names are their own. They run in a namespace separate from the program's (a
  program that writes its globals, or `check` in its module, changes nothing they see), with
  the builtins as they were before the program ran, and modules copied then: the tests'
  `import math`, or the program's `math` that MBPP's tests use, gives that copy, so the
  program's `math.isclose = ...` or fake `sys.modules["math"]` does not reach them. A program
  name that shadows a builtin or a module (`abs = ...`, `math = ...`) is hidden from the
  tests, unless they use it only as the function under test (`assert sum(10, 15) == 6`).
* No thread of the program may run once the tests start (checked after each call into it).
* A program that exits, raises SystemExit or KeyboardInterrupt (from `__eq__` or elsewhere),
  or exits from a finalizer fails, by the status design above.

Not covered: standard-library code written in Python still reads state shared with the
program (the real builtins, module globals, class attributes), so tests that themselves use
e.g. `copy.deepcopy`, `random.Random` or `Counter.__eq__` can be misled (MBPP and HumanEval
tests use such code only to make inputs); tests that hand their own functions or objects to
the program expose their namespace; arithmetic in the tests on attributes of record
instances is not checked (only comparisons are); HumanEval's tests call helpers of the
prompt (`poly`, `encode_cyclic`), which the program may redefine. Plain data excludes
Fraction, Decimal, namedtuples, generators, ...: a program returning one fails, and the tests
get copies (`f(x) is x` does not hold).
"""

import _thread
import ast
import builtins
import collections
import dataclasses
import json
import math
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Callable, NoReturn, Optional

# Per-run uids start here (no such users exist; systemd leaves 0x70000000-0x7ffffffe unused).
_UID_BASE = 0x70000000
_OUTPUT_LIMIT = 1 << 20      # bytes of stdout+stderr a run may write before its pipe is closed
_OUTPUT_KEPT = 2000          # characters of that output kept in `Result.output`
_STATUS_LIMIT = 1 << 16      # bytes read from the status pipe
_GRACE_S = 5.0               # host-side margin over the launcher's own timeout
_MAX_PROCESSES = 32          # RLIMIT_NPROC (processes and threads) where the run has its own uid
_MAX_OPEN_FILES = 256
_MAX_FILE_BYTES = 16 << 20
_TMPFS_OPTIONS = b"size=64m,mode=1777"
_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}

# Linux constants (sched.h, mount.h, prctl.h, capability.h).
_CLONE_NEWNS, _CLONE_NEWIPC = 0x00020000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38
_CAPABILITY_VERSION_3 = 0x20080522
# seccomp: per machine, the audit arch and the syscalls refused (rt_sigaction, execve, execveat).
_SECCOMP_SYSCALLS = {"x86_64": (0xC000003E, (13, 59, 322)),
                     "aarch64": (0xC00000B7, (134, 221, 281))}
_SECCOMP_MODE_FILTER, _SECCOMP_RET_ALLOW, _SECCOMP_RET_EPERM = 2, 0x7FFF0000, 0x00050001
_BPF_LOAD_WORD, _BPF_JUMP_IF_EQUAL, _BPF_RETURN = 0x20, 0x15, 0x06

# Audit events the harness refuses once the program runs (see the module docstring). Audit
# hooks of the program's own would see the tests' code object (the "exec" event).
_FRAME_EVENTS = frozenset({
    "sys._current_frames", "sys.settrace", "sys.setprofile", "sys.addaudithook",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "os.symlink", "os.link"})
_FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
_REFUSED_PREFIXES = (
    "ctypes.", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.forkpty",
    "subprocess.Popen")
# Modules that read or run outside the hook's view: raw memory, sub-interpreters (which have
# no hook), CPython's test helpers.
_REFUSED_MODULES = ("ctypes", "_ctypes", "_xxsubinterpreters", "_xxinterpchannels", "_test")

# The tests' name of the check that a value is plain data (a dunder: never name-mangled).
_PLAIN_CHECK = "__score_jax_plain__"
# What a record class (see the module docstring) may define besides plain class attributes.
_RECORD_DUNDERS = frozenset({"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__",
                             "__slots__", "__annotations__", "__init__", "__repr__", "__str__"})


@dataclasses.dataclass(frozen=True)
class Result:
  """Outcome of one run.

  `reason` is "passed", "timeout", "assertion failed", "exited before tests", "exited during
  tests", "memory", "recursion", "syntax error", "output limit", "killed", "killed by SIGxxx",
  "error: <ExceptionName>" (raised in the program or the tests), or "sandbox error" (the
  sandbox itself failed; `output` says why).
  """
  passed: bool
  reason: str
  output: str = ""      # the first `_OUTPUT_KEPT` characters of stdout+stderr
  isolation: str = ""   # the layers the run got, e.g. "net,pid,mnt,ipc,tmp,proc,uid,seccomp"


def check(program: str, tests: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> Result:
  """Runs `program` then `tests` in a sandbox; passed iff the tests' code ran to its end.

  Args:
    program: Python source (e.g. a model's completion, prompt included for HumanEval).
    tests: Python source run after it in the same namespace (e.g. asserts, or HumanEval's
      `check` definition followed by `check(entry_point)`).
    timeout_s: wall-clock limit for the run; also its CPU-seconds limit (rounded up).
    memory_mb: address-space limit of each process of the run.
  """
  if not isinstance(program, str) or not isinstance(tests, str):
    raise ValueError(f"program and tests must be str, got {type(program).__name__} and "
                     f"{type(tests).__name__}")
  if not timeout_s > 0 or not memory_mb > 0:
    raise ValueError(f"timeout_s and memory_mb must be > 0, got {timeout_s} and {memory_mb}")
  nonce = secrets.token_hex(16)
  payload = json.dumps({"nonce": nonce, "program": program, "tests": tests}).encode()
  workdir = tempfile.mkdtemp(prefix="score_jax_code_")
  status_r, status_w = os.pipe()
  config = {"timeout_s": float(timeout_s), "memory_bytes": int(memory_mb) << 20,
            "status_fd": status_w}
  try:
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        pass_fds=(status_w,), cwd=workdir, env=_ENV, start_new_session=True)
  except OSError:
    os.close(status_r)
    shutil.rmtree(workdir, ignore_errors=True)
    raise
  finally:
    os.close(status_w)
  try:
    status, output, capped, backstop = _communicate(
        proc, status_r, payload, time.monotonic() + timeout_s + _GRACE_S)
  finally:
    os.close(status_r)
    shutil.rmtree(workdir, ignore_errors=True)
  lines = status.decode("utf-8", "replace").split("\n")
  ours = [l[len(nonce) + 1:] for l in lines if l.startswith(nonce + " ")]
  isolation = next((l[len("isolation "):] for l in ours if l.startswith("isolation ")), "")
  # The launcher writes its end line after the run is dead: the last one is genuine.
  end = ([l for l in lines if l.startswith("end ")] or [""])[-1]
  text = output[:4 * _OUTPUT_KEPT].decode("utf-8", "replace")[:_OUTPUT_KEPT]
  if "pass" in ours:
    return Result(True, "passed", text, isolation)
  return Result(False, _reason(ours, end, capped, backstop), text, isolation)


def _communicate(proc: subprocess.Popen, status_r: int, payload: bytes,
                 deadline: float) -> tuple[bytes, bytes, bool, bool]:
  """Feeds the payload and reads status and output until both end or `deadline` passes.

  Returns (status bytes, output bytes, whether output hit its limit, whether the host had
  to kill the launcher); the launcher has exited on return.
  """
  stdin, stdout = proc.stdin.fileno(), proc.stdout.fileno()
  os.set_blocking(stdin, False)
  buffers = {stdout: bytearray(), status_r: bytearray()}
  limits = {stdout: _OUTPUT_LIMIT, status_r: _STATUS_LIMIT}
  capped = backstop = False
  sent = 0
  with selectors.DefaultSelector() as selector:
    selector.register(stdin, selectors.EVENT_WRITE)
    selector.register(stdout, selectors.EVENT_READ)
    selector.register(status_r, selectors.EVENT_READ)
    while selector.get_map():
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        backstop = True
        _kill_group(proc.pid)
        break
      for key, _ in selector.select(remaining):
        fd = key.fd
        if fd == stdin:
          try:
            sent += os.write(stdin, payload[sent:sent + 65536])
          except BrokenPipeError:
            sent = len(payload)
          if sent >= len(payload):
            selector.unregister(stdin)
            proc.stdin.close()
          continue
        chunk = os.read(fd, 65536)
        buffers[fd] += chunk
        if not chunk or len(buffers[fd]) > limits[fd]:
          capped |= bool(chunk) and fd == stdout
          selector.unregister(fd)
          if fd == stdout:
            proc.stdout.close()
  for stream in (proc.stdin, proc.stdout):
    stream.close()
  try:
    proc.wait(max(deadline - time.monotonic(), 0.0))
  except subprocess.TimeoutExpired:
    backstop = True
    _kill_group(proc.pid)
    proc.wait()
  return bytes(buffers[status_r]), bytes(buffers[stdout]), capped, backstop


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def _reason(lines: list[str], end: str, capped: bool, backstop: bool) -> str:
  """Why a run failed, from the harness's status lines and the launcher's end line."""
  errors = [l.split()[1:] for l in lines if l.startswith("error ")]
  phases = [l.split()[1] for l in lines if l.startswith("phase ")]
  if backstop or end == "end timeout":
    return "timeout"
  if capped:
    return "output limit"
  if errors:
    where, name = errors[-1]
    named = {"AssertionError": "assertion failed", "MemoryError": "memory",
             "RecursionError": "recursion"}
    if name in named:
      return named[name]
    if name == "SystemExit":
      return "exited before tests" if where == "program" else "exited during tests"
    if name == "SyntaxError" and where == "program":
      return "syntax error"
    return f"error: {name}"
  if end.startswith("end signal "):
    number = int(end.split()[2])
    if number == signal.SIGXCPU:
      return "timeout"
    return "killed" if number == signal.SIGKILL else f"killed by {signal.Signals(number).name}"
  if phases:
    return "exited before tests" if phases[-1] == "program" else "exited during tests"
  return "sandbox error"


# ---------------------------------------------------------------------------------------------
# Inside the sandbox. This file run as a script (`python -I -S code.py CONFIG`) is the launcher:
# it enters the namespaces, forks the run's first process, enforces the wall-clock timeout
# and kills whatever is left. The forked process finishes the isolation and becomes the
# harness that runs the program and the tests.


def _launch(config: dict[str, Any]) -> NoReturn:
  """The launcher (running as the host's user, in the run's session and cwd)."""
  status_fd = config["status_fd"]
  uid = _UID_BASE + os.getpid() if os.geteuid() == 0 else None
  if uid is not None:
    os.chown(".", uid, uid)
  layers = _unshare(uid is None)
  child = os.fork()
  if child == 0:
    _run_child(config, uid, layers)
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.close(null)
  pidfd = os.pidfd_open(child)
  exited = _await_readable(pidfd, config["timeout_s"])
  os.close(pidfd)
  _kill_run(child, uid, "pid" in layers)
  _, status = os.waitpid(child, 0)
  if not exited:
    end = "timeout"
  elif os.WIFSIGNALED(status):
    end = f"signal {os.WTERMSIG(status)}"
  else:
    end = f"exit {os.waitstatus_to_exitcode(status)}"
  os.write(status_fd, f"\nend {end}\n".encode())
  os._exit(0)


def _await_readable(fd: int, timeout_s: float) -> bool:
  """Whether `fd` becomes readable within `timeout_s` (a pidfd: whether the process exits)."""
  with selectors.DefaultSelector() as selector:
    selector.register(fd, selectors.EVENT_READ)
    return bool(selector.select(timeout_s))


def _unshare(unprivileged: bool) -> list[str]:
  """Moves the launcher into new namespaces (its children into the new PID one)."""
  import ctypes  # pylint: disable=g-import-not-at-top  (only here: the harness scrubs it)
  libc = ctypes.CDLL(None, use_errno=True)
  layers = []
  if unprivileged:
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER) != 0:
      return layers
    # Map our own ids so that files keep their owners; we hold all capabilities inside.
    for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"),
                       ("gid_map", f"{gid} {gid} 1")):
      with open(f"/proc/self/{name}", "w") as f:
        f.write(text)
    layers.append("user")
  for flag, name in ((_CLONE_NEWNET, "net"), (_CLONE_NEWPID, "pid"), (_CLONE_NEWNS, "mnt"),
                     (_CLONE_NEWIPC, "ipc")):
    if libc.unshare(flag) == 0:
      layers.append(name)
  return layers


def _kill_run(child: int, uid: Optional[int], pid_namespace: bool) -> None:
  """Kills every process of the run, the harness `child` included."""
  _kill_group(child)
  if uid is None or pid_namespace:
    return  # The PID namespace dies with its first process.
  # Processes that left the group still have the run's uid: kill(-1) as that uid reaches
  # exactly them (the kernel walks the task list atomically, so a fork bomb cannot outrun it).
  killer = os.fork()
  if killer == 0:
    os.setresuid(uid, uid, uid)
    os.kill(-1, signal.SIGKILL)
    os._exit(0)
  os.waitpid(killer, 0)


def _run_child(config: dict[str, Any], uid: Optional[int], layers: list[str]) -> NoReturn:
  """The run's first process: finishes the isolation, then runs the harness."""
  try:
    os.setsid()
    layers = _isolate_child(config, uid, layers)
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
      del sys.modules[name]
    _harness(config["status_fd"], layers)
  except BaseException:  # pylint: disable=broad-except  (set-up failed: say why on stderr)
    sys.__excepthook__(*sys.exc_info())
    _flush_stdio()
  finally:
    os._exit(125)


def _isolate_child(config: dict[str, Any], uid: Optional[int], layers: list[str]) -> list[str]:
  """Mounts, resource limits and the privilege drop; returns the layers in effect."""
  import ctypes  # pylint: disable=g-import-not-at-top  (see `_unshare`)
  libc = ctypes.CDLL(None, use_errno=True)
  layers = list(layers)
  if "mnt" in layers and libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) == 0:
    def tmpfs(path: str) -> bool:
      return libc.mount(b"tmpfs", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                        _TMPFS_OPTIONS) == 0

    # The run's directory gets one too, so that what the run writes is bounded and vanishes
    # with it: mounted over, then entered again (the directory underneath stays empty).
    workdir = os.getcwd()
    private = tmpfs(workdir)
    os.chdir(workdir)
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
      private &= not os.path.isdir(path) or tmpfs(path)
    if private:
      layers.append("tmp")
    if "pid" in layers and libc.mount(b"proc", b"/proc", b"proc",
                                      _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None) == 0:
      layers.append("proc")
  cpu_s = math.ceil(config["timeout_s"])
  limits = [(resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
            (resource.RLIMIT_AS, config["memory_bytes"], config["memory_bytes"]),
            (resource.RLIMIT_FSIZE, _MAX_FILE_BYTES, _MAX_FILE_BYTES),
            (resource.RLIMIT_NOFILE, _MAX_OPEN_FILES, _MAX_OPEN_FILES),
            (resource.RLIMIT_CORE, 0, 0)]
  if uid is not None or "user" in layers:  # Counted per uid (per user namespace): ours alone.
    limits.append((resource.RLIMIT_NPROC, _MAX_PROCESSES, _MAX_PROCESSES))
  for kind, soft, hard in limits:
    resource.setrlimit(kind, (soft, hard))
  if uid is not None:
    _reroute_imports()
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    # The uid change made us non-dumpable, which hides /proc/self/fd (used for imports).
    libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    layers.append("uid")
  elif "user" in layers:
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
      raise OSError(ctypes.get_errno(), "capset failed")
  libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
  libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
  if _refuse_syscalls(ctypes, libc):
    layers.append("seccomp")
  return layers


def _refuse_syscalls(ctypes: Any, libc: Any) -> bool:
  """Installs a seccomp filter refusing signal handlers and exec (EPERM); whether it could.

  A signal handler receives the running frame, from which the harness's frame is reachable
  without any audited call; exec would start code the audit hook does not watch.
  """
  if os.uname().machine not in _SECCOMP_SYSCALLS:
    return False
  arch, syscalls = _SECCOMP_SYSCALLS[os.uname().machine]

  class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]

  class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

  # Jump offsets count from the next instruction; "return EPERM" is the last one.
  refuse = 4 + len(syscalls)
  program = [(_BPF_LOAD_WORD, 0, 0, 4),                     # seccomp_data.arch
             (_BPF_JUMP_IF_EQUAL, 0, refuse - 2, arch),
             (_BPF_LOAD_WORD, 0, 0, 0)]                     # seccomp_data.nr
  program += [(_BPF_JUMP_IF_EQUAL, refuse - (4 + i), 0, nr) for i, nr in enumerate(syscalls)]
  program += [(_BPF_RETURN, 0, 0, _SECCOMP_RET_ALLOW), (_BPF_RETURN, 0, 0, _SECCOMP_RET_EPERM)]
  filters = (SockFilter * len(program))(*[SockFilter(*op) for op in program])
  fprog = SockFprog(len(program), filters)
  return libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


def _reroute_imports() -> None:
  """Keeps the standard library importable after the uid change.

  Python may live under a directory only root can enter (e.g. /root/.pyenv). Each import
  directory is opened now and named by its /proc/self/fd entry from then on.
  """
  moved = {}
  for entry in sys.path:
    if os.path.isdir(entry):
      moved[entry] = f"/proc/self/fd/{os.open(entry, os.O_RDONLY | os.O_DIRECTORY)}"

  def reroute(path: str) -> str:
    for old, new in moved.items():
      if path == old or path.startswith(old + os.sep):
        return new + path[len(old):]
    return path

  sys.path[:] = [reroute(p) for p in sys.path]
  for module in list(sys.modules.values()):
    if isinstance(getattr(module, "__path__", None), list):
      module.__path__[:] = [reroute(p) for p in module.__path__]
  sys.path_importer_cache.clear()


def _make_guard(contained: bool) -> Callable[[str, tuple[Any, ...]], None]:
  """The audit hook installed before the program runs (see the module docstring).

  Everything it uses is bound here, so the program cannot change it by replacing builtins or
  module attributes. `contained`: the run has its own network namespace and its own PID
  namespace or uid; otherwise sockets and fork are refused too.
  """
  frame_events, frame_attributes, refused = _FRAME_EVENTS, _FRAME_ATTRIBUTES, _REFUSED_PREFIXES
  modules = _REFUSED_MODULES
  if not contained:
    refused += ("socket.", "os.fork")
  basename, fsdecode, isinstance_ = os.path.basename, os.fsdecode, isinstance
  value_error, runtime_error = ValueError, RuntimeError

  def guard(event: str, args: tuple[Any, ...]) -> None:
    if event == "sys._getframe":  # ValueError: what the standard library expects and handles.
      raise value_error("the call stack is not available in the sandbox")
    if (event in frame_events or event.startswith(refused)
        or (event == "object.__getattr__" and args[1] in frame_attributes)
        or (event == "import" and args[0].startswith(modules))
        or (event == "open" and isinstance_(args[0], (str, bytes))
            and basename(fsdecode(args[0])) == "mem")):
      raise runtime_error(f"{event} is not allowed in the sandbox")

  return guard


def _prepare_tests(source: str) -> tuple[types.CodeType, frozenset[str], list[str]]:
  """Compiles the tests with strict asserts (see the module docstring).

  Returns the code, the names the tests use only as the subject of an assert
  (`_subject_names`) and the top-level modules the tests import.
  """
  tree = ast.parse(source, "tests.py")
  subjects = _subject_names(tree)
  modules = {alias.name.partition(".")[0] for node in ast.walk(tree)
             if isinstance(node, ast.Import) for alias in node.names}
  modules |= {node.module.partition(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and not node.level}
  tree = ast.fix_missing_locations(_StrictAsserts().visit(tree))
  return compile(tree, "tests.py", "exec", dont_inherit=True), subjects, sorted(modules)


def _subject_names(tree: ast.AST) -> frozenset[str]:
  """Names the tests use only as the callee of an assert holding no other call, and never
  bind: the function under test of MBPP's `assert sum(10, 15) == 6`. Only these names may
  take a builtin's or a module's name in the program (see `_make_test_environment`)."""
  subjects = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Assert):
      calls = [n for n in ast.walk(node.test) if isinstance(n, ast.Call)]
      if len(calls) == 1 and isinstance(calls[0].func, ast.Name):
        subjects.add(id(calls[0].func))
  as_subject, otherwise, bound = set(), set(), set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Name):
      if not isinstance(node.ctx, ast.Load):
        bound.add(node.id)
      else:
        (as_subject if id(node) in subjects else otherwise).add(node.id)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      bound.add(node.name)
    elif isinstance(node, ast.arg):
      bound.add(node.arg)
    elif isinstance(node, ast.alias):
      bound.add((node.asname or node.name).partition(".")[0])
    elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
      bound.add(node.name)
    elif isinstance(node, (ast.Global, ast.Nonlocal)):
      bound.update(node.names)
  return frozenset(as_subject - otherwise - bound)


class _StrictAsserts(ast.NodeTransformer):
  """Makes every value an assert compares or tests for truth pass the plain-data check."""

  def visit_Assert(self, node: ast.Assert) -> ast.Assert:
    node.test = self._truth(_CheckedOperands().visit(node.test))
    return node

  def _truth(self, node: ast.expr) -> ast.expr:
    if isinstance(node, ast.BoolOp):
      node.values = [self._truth(v) for v in node.values]
      return node
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
      node.operand = self._truth(node.operand)
      return node
    if isinstance(node, ast.Compare):
      return node  # Its operands are checked; it gives a bool.
    return _checked(node)


class _CheckedOperands(ast.NodeTransformer):
  """Checks the operands of every comparison but identity (`is`, `is not`)."""

  def visit_Compare(self, node: ast.Compare) -> ast.Compare:
    self.generic_visit(node)
    by_value = [not isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops]
    operands = [node.left] + node.comparators
    # An operand is checked when a comparison next to it (chains: `a < b is c`) is by value.
    operands = [_checked(o) if (i > 0 and by_value[i - 1]) or (i < len(by_value) and by_value[i])
                else o for i, o in enumerate(operands)]
    node.left, node.comparators = operands[0], operands[1:]
    return node


def _checked(node: ast.expr) -> ast.expr:
  return ast.copy_location(
      ast.Call(func=ast.Name(id=_PLAIN_CHECK, ctx=ast.Load()), args=[node], keywords=[]), node)


def _make_test_environment(
    modules: list[str], subjects: frozenset[str]) -> Callable[[dict[str, Any]], dict]:
  """Returns `namespace(program_namespace) -> the tests' namespace` (module docstring).

  Called before the program runs: everything the returned functions use is bound here, and
  the modules the tests import are imported and copied here, while they are pristine.
  """
  for name in modules:
    if not name.startswith(_REFUSED_MODULES):
      try:
        __import__(name)
      except BaseException:  # pylint: disable=broad-except  (the tests' own import will fail)
        pass
  copies, originals = {}, {}
  for name, module in list(sys.modules.items()):
    if isinstance(module, types.ModuleType):
      copies[name] = types.ModuleType(name)
      vars(copies[name]).update(vars(module))
      originals[id(module)] = (module, name)
  type_, id_, str_, callable_ = type, id, str, callable
  object_, assertion_error, thread_count = object, AssertionError, _thread._count
  real_import = builtins.__import__
  mro_of, vars_of = type.__dict__["__mro__"].__get__, type.__dict__["__dict__"].__get__
  name_of = type.__dict__["__name__"].__get__
  items_of, proxy_items_of = dict.items, type(type.__dict__).items
  list_, tuple_, set_, frozenset_, bytearray_ = list, tuple, set, frozenset, bytearray
  append, set_add = list.append, set.add
  record_dunders, plain_check = _RECORD_DUNDERS, _PLAIN_CHECK
  atoms = {id(t) for t in (type(None), bool, int, float, complex, str, bytes, range)}
  # Builtin classes (`type(f(x)) == int`): immutable, equal only to themselves.
  classes = {id(v) for v in vars(builtins).values() if type(v) is type}
  dicts = {id(t) for t in (dict, collections.Counter, collections.OrderedDict,
                           collections.defaultdict)}
  building = object()  # memo entry of a tuple or frozenset whose copy is not made yet

  def import_(name, globals_=None, locals_=None, fromlist=(), level=0):
    """The tests' import: the copy made before the program ran, where there is one."""
    module = real_import(name, globals_, locals_, fromlist, level)
    return copies.get(name if fromlist else name.partition(".")[0], module)

  def plain_copy(value: Any, memo: dict[int, Any]) -> Any:
    """A deep copy of `value` made of exact builtin types only (a Counter, OrderedDict or
    defaultdict becomes a dict); raises AssertionError if `value` holds anything else. The
    copy is new, so the program cannot change it afterwards (from a finalizer, say)."""
    kind = id_(type_(value))
    if kind in atoms or (type_(value) is type_ and id_(value) in classes):
      return value
    copy = memo.get(id_(value))
    if copy is building:
      raise assertion_error("plain data with a cycle through a tuple")
    if copy is not None:
      return copy
    if type_(value) is list_:
      memo[id_(value)] = copy = []
      for item in value:
        append(copy, plain_copy(item, memo))
    elif kind in dicts:
      memo[id_(value)] = copy = {}
      for key, item in items_of(value):
        copy[plain_copy(key, memo)] = plain_copy(item, memo)
    elif type_(value) is set_:
      memo[id_(value)] = copy = set_()
      for item in value:
        set_add(copy, plain_copy(item, memo))
    elif type_(value) is tuple_ or type_(value) is frozenset_:
      memo[id_(value)] = building
      copy = type_(value)([plain_copy(item, memo) for item in value])
      memo[id_(value)] = copy
    elif type_(value) is bytearray_:
      memo[id_(value)] = copy = bytearray_(value)
    else:
      raise assertion_error(f"not plain data: a {name_of(type_(value))}")
    return copy

  def record(cls: Any) -> bool:
    """Whether `cls` is a record class: class attributes that are atoms, no special methods
    but __init__, __repr__ and __str__, `type` as metaclass, no base but record classes."""
    if type_(cls) is not type_:
      return False
    for klass in mro_of(cls):
      if klass is object_:
        continue
      if type_(klass) is not type_:
        return False
      for name, value in proxy_items_of(vars_of(klass)):
        if type_(name) is not str_:
          return False
        if name not in record_dunders and (
            (name[:2] == "__" and name[-2:] == "__") or id_(type_(value)) not in atoms):
          return False
    return True

  def require(value: Any) -> Any:
    """What the tests compare or test for truth: a plain copy of `value`."""
    return plain_copy(value, {})

  def guarded(fn: Any) -> Callable[..., Any]:
    """`fn` giving plain copies of its results (a record class: its instances)."""
    is_class = type_(fn) is type_

    def call(*args, **kwargs):
      result = fn(*args, **kwargs)
      if thread_count():
        raise assertion_error("a thread of the program is running")
      if is_class and type_(result) is fn and record(fn):
        return result
      return plain_copy(result, {})

    return call

  test_builtins = dict(vars(builtins))
  test_builtins["__import__"] = import_

  def namespace(program: dict[str, Any]) -> dict[str, Any]:
    if thread_count():
      raise assertion_error("a thread of the program is running")
    tests = {"__builtins__": test_builtins, "__name__": "tests", plain_check: require}
    for name, value in list(items_of(program)):
      if type_(name) is not str_ or (name[:2] == "__" and name[-2:] == "__"):
        continue
      if name not in subjects and (name in test_builtins or name in copies):
        if name in copies:
          tests[name] = copies[name]
        continue
      original = originals.get(id_(value))
      if original is not None and original[0] is value:
        tests[name] = copies[original[1]]
      elif callable_(value):
        tests[name] = guarded(value)
      else:
        tests[name] = value
    return tests

  return namespace


def _harness(status_fd: int, layers: list[str]) -> NoReturn:
  """Runs the program, then the tests; writes the nonce only if the tests' code returned."""
  write, exit_, run, base_exception, getpid = os.write, os._exit, exec, BaseException, os.getpid
  harness_pid = getpid()
  payload = json.loads(sys.stdin.buffer.read())
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.close(null)
  nonce = payload["nonce"]

  def report(line: str) -> None:
    """A status line; the nonce prefix makes it unforgeable. Only from this process: a fork
    of it could otherwise run the tests down whichever branch passes."""
    if getpid() != harness_pid:
      return
    try:
      write(status_fd, f"\n{nonce} {line}\n".encode())
    except OSError:
      pass

  report("isolation " + ",".join(layers))
  phase = "program"
  try:
    program = compile(payload["program"], "program.py", "exec", dont_inherit=True)
    phase = "tests"
    tests, subjects, modules = _prepare_tests(payload["tests"])
    tests_namespace = _make_test_environment(modules, subjects)
  except base_exception as e:  # pylint: disable=broad-except
    report(f"error {phase} {type(e).__name__}")
    exit_(1)
  del payload
  module = types.ModuleType("solution")
  sys.modules["solution"] = module
  namespace = module.__dict__
  contained = "net" in layers and ("pid" in layers or "uid" in layers)
  sys.addaudithook(_make_guard(contained))
  for phase in ("program", "tests"):
    report(f"phase {phase}")
    try:
      if phase == "program":
        run(program, namespace)
      else:
        run(tests, tests_namespace(namespace))
    except base_exception as e:  # pylint: disable=broad-except
      _flush_stdio()
      report(f"error {phase} {_exception_name(e)}")
      exit_(1)
  _flush_stdio()
  report("pass")
  exit_(0)


def _exception_name(e: BaseException) -> str:
  try:
    return str(type(e).__name__).replace(" ", "_") or "Exception"
  except BaseException:  # pylint: disable=broad-except  (a hostile metaclass)
    return "Exception"


def _flush_stdio() -> None:
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except BaseException:  # pylint: disable=broad-except  (the program may have replaced them)
      pass


if __name__ == "__main__":
  _launch(json.loads(sys.argv[1]))
