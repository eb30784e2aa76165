"""Final-answer reward for math: extract a response's answer and compare it with a reference.

    check(response, reference) -> bool     e.g. check("... so $\\boxed{\\dfrac12}$.", "0.5")

The answer of a response is, in order of priority: the last complete `\\boxed{...}` (nested
braces allowed; also `\\fbox{...}` and `\\boxed 5`); the last final-answer phrase "The final
answer is $X$" (or without dollars, up to the end of its line or "I hope it is correct");
the last GSM8K answer line "#### X"; else the last number in the response.

Equivalence: both sides are normalised (dollars, spaces, `\\text{}` around a whole answer,
trailing units in `\\text{}`/`\\mbox{}`, degrees and percent signs, `\\left`/`\\right`, thin
spaces, `\\dfrac`->`\\frac`, `\\frac12`->`\\frac{1}{2}`, thousands separators, a trailing
period). Equal strings match; otherwise (for answers up to `_MAX_SYMBOLIC_LEN` characters)
math-verify parses both and compares them as mathematical objects (2\\sqrt{2} = \\sqrt{8},
sets, intervals, equations, ...). Numbers without variables are compared by value instead:
exactly when both are rational, else to a relative `_RELATIVE_TOLERANCE` (0.5 = \\frac{1}{2});
math-verify would round floats to 6 decimals (0.0000672 = 0.0000673) and chop tiny values
(1/2004! = 1/2005!).

Time: math-verify bounds its work with SIGALRM, which Python allows only in the main thread.
`check` sets one timer of its own for the whole check (math-verify's are turned off) when it
runs in the main thread, as in a `pool.RewardPool` worker; elsewhere it runs without one. Work
stuck inside C code (huge integer powers) is not interruptible by signals at all: the pool's
per-check limit, which kills the worker, covers that.
"""

import contextlib
import logging
import re
import signal
import threading
from typing import Iterator, Optional

import math_verify
import sympy

_MAX_SYMBOLIC_LEN = 300   # longer answers (MATH references: <= 160) are compared as strings
_RELATIVE_TOLERANCE = 1e-6
_BOX_RE = re.compile(r"\\(?:boxed|fbox)")
_PHRASE_RE = re.compile(r"final answer is", re.IGNORECASE)
_HOPE_RE = re.compile(r"\.?\s*I hope it is correct.*", re.IGNORECASE | re.DOTALL)
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_UNITS_RE = re.compile(r"(?<=\S)\\(?:text|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?$")
_WRAPPED_TEXT_RE = re.compile(r"^\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}$")
_FRAC_SHORT_RE = re.compile(r"\\frac(\d)(\d)")
_FRAC_HALF_RE = re.compile(r"\\frac\{([^{}]*)\}(\d)")
_SQRT_SHORT_RE = re.compile(r"\\sqrt(\d)")
_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])")
_CHOICE_RE = re.compile(r"^\(([A-Z])\)$")
_DROPPED = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "^\\circ", "^{\\circ}",
            "\\circ", "\\%", "%", "\\$", "$")


class _Timeout(BaseException):
  """Raised by the check's timer (a BaseException: math-verify swallows Exceptions)."""


class _DropTimeoutWarning(logging.Filter):
  """math-verify warns once that its own timeouts are off; `check` has its own timer."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
  logging.getLogger(_name).addFilter(_DropTimeoutWarning())


def extract_answer(response: str) -> Optional[str]:
  """The final answer written in `response` (see the module docstring), or None."""
  if not isinstance(response, str):
    return None
  for extract in (_last_boxed, _last_phrase, _last_gsm8k, _last_number):
    answer = extract(response)
    if answer is not None:
      return answer
  return None


def answer_of_solution(solution: str) -> str:
  """The reference answer of a MATH solution: the content of its last complete \\boxed{}."""
  answer = _last_boxed(solution)
  if answer is None:
    raise ValueError(f"MATH solution has no complete \\boxed{{}} answer: {solution[-80:]!r}")
  return answer


def normalize(answer: str) -> str:
  """A canonical string for an answer (see the module docstring)."""
  text = answer.strip()
  text = re.sub(r"\\[dt]frac", r"\\frac", text)
  text = _UNITS_RE.sub("", text.rstrip(" ."))
  for token in _DROPPED:
    text = text.replace(token, "")
  text = "".join(text.split())
  wrapped = _WRAPPED_TEXT_RE.match(text)
  if wrapped:
    text = wrapped.group(1)
  text = _FRAC_SHORT_RE.sub(r"\\frac{\1}{\2}", text)
  text = _FRAC_HALF_RE.sub(r"\\frac{\1}{\2}", text)
  text = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", text)
  text = _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), text)
  text = text.rstrip(".")
  choice = _CHOICE_RE.match(text)
  return choice.group(1) if choice else text


def check(response: str, reference: str, timeout_s: float = 5.0) -> bool:
  """Whether the final answer of `response` is equivalent to `reference` (a final answer,
  e.g. "\\frac{1}{2}" or "18"). Never raises on garbage; False when time runs out."""
  if not timeout_s > 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
  try:
    answer = extract_answer(response)
    if answer is None or not isinstance(reference, str):
      return False
    with _time_limit(timeout_s):
      return _equivalent(normalize(answer), normalize(reference))
  except (Exception, _Timeout):  # pylint: disable=broad-except  (garbage in, False out)
    return False


def _equivalent(answer: str, reference: str) -> bool:
  if not answer or not reference:
    return False
  if answer == reference:
    return True
  if max(len(answer), len(reference)) > _MAX_SYMBOLIC_LEN:
    return False
  gold = math_verify.parse("\\boxed{" + reference + "}", parsing_timeout=None)
  pred = math_verify.parse("\\boxed{" + answer + "}", parsing_timeout=None)
  if not gold or not pred:
    return False
  a, b = gold[0], pred[0]
  if _is_number(a) and _is_number(b):
    if a == b or a.is_Rational and b.is_Rational:  # Exact numbers: equal or not.
      return a == b
    a, b = sympy.N(a, 30), sympy.N(b, 30)
    return bool(a.is_finite and b.is_finite
                and abs(a - b) <= _RELATIVE_TOLERANCE * max(abs(a), abs(b)))
  return math_verify.verify(gold, pred, timeout_seconds=None)


def _is_number(x: object) -> bool:
  """Whether x is a sympy expression without free symbols (e.g. 1/2004!, 2*sqrt(2))."""
  return isinstance(x, sympy.Expr) and bool(x.is_number)


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
  """Raises _Timeout in the body after `seconds` (main thread only; elsewhere no limit)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def expire(signum, frame):
    raise _Timeout()

  previous = signal.signal(signal.SIGALRM, expire)
  try:
    signal.setitimer(signal.ITIMER_REAL, seconds)
    yield
  finally:
    try:
      signal.setitimer(signal.ITIMER_REAL, 0)
    finally:  # Even if the timer fires just before it is cancelled.
      signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)


# --- extraction -------------------------------------------------------------------------------


def _braced(text: str, start: int) -> Optional[tuple[str, int]]:
  """(content, end) of the brace group opening at text[start] == "{", or None if unclosed.

  Escaped braces (\\{ \\}) do not count.
  """
  depth, i = 0, start
  while i < len(text):
    c = text[i]
    if c == "\\":
      i += 2
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return text[start + 1:i], i + 1
    i += 1
  return None


def _last_boxed(text: str) -> Optional[str]:
  for match in reversed(list(_BOX_RE.finditer(text))):
    rest = match.end()
    if rest < len(text) and text[rest] == "{":
      group = _braced(text, rest)
      if group is not None:
        return group[0].strip()
    elif rest < len(text) and text[rest] == " ":
      token = text[rest:].split(None, 1)
      if token:
        return token[0].split("$", 1)[0].rstrip(".")
  return None


def _last_phrase(text: str) -> Optional[str]:
  matches = list(_PHRASE_RE.finditer(text))
  if not matches:
    return None
  rest = text[matches[-1].end():].lstrip(" \t:")
  if rest.startswith("$"):
    delimiter = "$$" if rest.startswith("$$") else "$"
    body = rest[len(delimiter):]
    end = _unescaped(body, delimiter)
    answer = body if end is None else body[:end]
  else:
    answer = rest.split("\n", 1)[0]
  answer = _HOPE_RE.sub("", answer).strip().rstrip(".").strip()
  return answer or None


def _unescaped(text: str, delimiter: str) -> Optional[int]:
  """Index of the first `delimiter` in `text` not preceded by a backslash."""
  i = text.find(delimiter)
  while i > 0 and text[i - 1] == "\\":
    i = text.find(delimiter, i + 1)
  return None if i < 0 else i


def _last_gsm8k(text: str) -> Optional[str]:
  matches = _GSM8K_RE.findall(text)
  if not matches or not matches[-1].strip():
    return None
  return matches[-1].strip().rstrip(".")


def _last_number(text: str) -> Optional[str]:
  matches = _NUMBER_RE.findall(text)
  return matches[-1] if matches else None
