"""Final-answer reward for math: extract a response's answer and compare it with a reference.

    check(response, reference) -> bool     e.g. check("... so $\\boxed{\\dfrac12}$.", "0.5")

The reward is meant for RL, where a policy searches for whatever earns it: the answer is read
only where the response states it as final, and exactly one answer is read.

Final-answer markers are `\\boxed{...}` (nested braces allowed; also `\\fbox{...}` and
`\\boxed 5`), the final-answer phrase of the prompts "The final answer is X" and the GSM8K
answer line "#### X". The LAST marker of the response decides, whatever its kind (a second
attempt may quote its first attempt's answer before stating a new one); markers inside a box
do not count. After a phrase or "####" the answer is the rest of that line, without a closing
"I hope it is correct" and trailing periods; a math group opened there (`$...$`, `$$...$$`,
`\\(...\\)`, `\\[...\\]`, or one opening the next line) may run over several lines and the
rest of the line after it stays part of the answer, so "The final answer is $3$ or $4$" reads
"3 or 4" (equal to neither). A response whose last marker is empty, unclosed (a cut-off
`\\boxed{` or `$`) or absent has no answer and earns nothing; answers written only in the
working earn nothing either. `lenient=True` (a task option for weaker base models) falls back
to the last number of the response when the last marker gives no answer.

Equivalence: both sides are normalised (dollars, spaces, `\\text{}` around a whole answer,
trailing units in `\\text{}`/`\\mbox{}`, text (`\\text{}`, `\\mathbf{}`, ...) holding a digit
read as math (math-verify drops trailing text as units, which would read "3 \\text{ (or 4)}" as
3), degrees and percent signs, `\\left`/`\\right`, thin spaces, `\\dfrac`->`\\frac`,
`\\frac12`->`\\frac{1}{2}`, thousands separators in valid groupings only ("12,345,678", not
"1,23", "1, 234" or the pair "(1,234)"; every other comma is followed by one space, so that a
list never reads as one number), a trailing period). Equal strings match; otherwise (for
answers up to `_MAX_SYMBOLIC_LEN` characters) math-verify parses both and compares them as
mathematical objects (2\\sqrt{2} = \\sqrt{8}, sets, intervals, equations, ...). Numbers
without variables are compared by value instead: exactly when both are rational, else to a
relative `_RELATIVE_TOLERANCE` (0.5 = \\frac{1}{2}); math-verify would round floats to 6
decimals (0.0000672 = 0.0000673) and chop tiny values (1/2004! = 1/2005!). A list of
candidates equals none of them ("1, 2, 3" is not 2; the tests hold a table of such tries).

Time: extraction is linear in the response's length. math-verify bounds its work with SIGALRM,
which Python allows only in the main thread. `check` sets one timer of its own for the whole
check (math-verify's are turned off) when it runs in the main thread, as in a
`pool.RewardPool` worker; elsewhere it runs without one. Work stuck inside C code (huge
integer powers) is not interruptible by signals at all: the pool's per-check limit, which
kills the worker, covers that.
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
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Every final-answer marker: a box, the prompts' final-answer phrase, GSM8K's answer line.
_MARKER_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])|(?i:final answer is)|####")
# Math groups an answer after a phrase or "####" may open with: opener -> closer.
_BOX_TOKEN_RE = re.compile(r" +([^\s$]+)")  # \boxed 5
_GROUPS = {"$$": "$$", "$": "$", "\\[": "\\]", "\\(": "\\)"}
_HOPE_RE = re.compile(r"\s*I hope it is correct.*", re.IGNORECASE | re.DOTALL)
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_UNITS_RE = re.compile(r"(?<=\S)\\(?:text|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?$")
# Text commands whose trailing groups math-verify drops as units.
_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit)(?=\{)")
_WRAPPED_TEXT_RE = re.compile(r"^\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}$")
_FRAC_SHORT_RE = re.compile(r"\\frac(\d)(\d)")
_FRAC_HALF_RE = re.compile(r"\\frac\{([^{}]*)\}(\d)")
_SQRT_SHORT_RE = re.compile(r"\\sqrt(\d)")
# A number grouped by thousands, not inside a bracket or a list (where commas separate items).
_THOUSANDS_RE = re.compile(r"(?<![\w.,(\[])(?<!\\\{)\d{1,3}(?:,\d{3})+(?![\w,)\]]|\\\})")
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


def extract_answer(response: str, lenient: bool = False) -> Optional[str]:
  """The final answer of `response`: the last final-answer marker's (see the module
  docstring); None when that marker is empty or unclosed, or there is none. `lenient`: the
  last number of the response in those cases."""
  if not isinstance(response, str):
    return None
  answer = _last_marker_answer(response)
  if answer is None and lenient:
    answer = _last_number(response)
  return answer


def answer_of_solution(solution: str) -> str:
  """The reference answer of a MATH solution: the content of its last complete \\boxed{}."""
  answer = _last_boxed(solution)
  if answer is None:
    raise ValueError(f"MATH solution has no complete \\boxed{{}} answer: {solution[-80:]!r}")
  return answer


def normalize(answer: str) -> str:
  """A canonical string for an answer (see the module docstring)."""
  text = _unwrap_digit_text(answer.strip())
  text = re.sub(r"\\[dt]frac", r"\\frac", text)
  text = _UNITS_RE.sub("", text.rstrip(" ."))
  for token in _DROPPED:
    text = text.replace(token, "")
  text = _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), text)
  text = "".join(text.split()).replace(",", ", ")
  wrapped = _WRAPPED_TEXT_RE.match(text)
  if wrapped:
    text = wrapped.group(1)
  text = _FRAC_SHORT_RE.sub(r"\\frac{\1}{\2}", text)
  text = _FRAC_HALF_RE.sub(r"\\frac{\1}{\2}", text)
  text = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", text)
  text = text.rstrip(".")
  choice = _CHOICE_RE.match(text)
  return choice.group(1) if choice else text


def _unwrap_digit_text(text: str) -> str:
  """`text` with each text group holding a digit replaced by its content."""
  while True:
    pieces, done = [], 0
    for match in _TEXT_RE.finditer(text):
      group = _braced(text, match.end()) if match.start() >= done else None
      if group is not None and any(c.isdigit() for c in group[0]):
        pieces += [text[done:match.start()], group[0]]
        done = group[1]
    if not pieces:
      return text
    text = "".join(pieces) + text[done:]


def check(response: str, reference: str, timeout_s: float = 5.0, lenient: bool = False) -> bool:
  """Whether the final answer of `response` is equivalent to `reference` (a final answer,
  e.g. "\\frac{1}{2}" or "18"). Never raises on garbage; False when time runs out.
  `lenient`: see `extract_answer`."""
  if not timeout_s > 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
  try:
    with _time_limit(timeout_s):
      answer = extract_answer(response, lenient)
      if answer is None or not isinstance(reference, str):
        return False
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


def _box(text: str, start: int) -> Optional[tuple[str, int]]:
  """(answer, end) of the box whose name ends at text[start]: the content of `\\boxed{...}`
  or the token of `\\boxed 5`, possibly empty; None when unclosed or not a box."""
  if text.startswith("{", start):
    return _braced(text, start)
  token = _BOX_TOKEN_RE.match(text, start)
  return (token.group(1).rstrip("."), token.end()) if token else None


def _last_boxed(text: str) -> Optional[str]:
  """The content of the last complete box of `text` (possibly empty), or None."""
  for match in reversed(list(_BOX_RE.finditer(text))):
    box = _box(text, match.end())
    if box is not None:
      return box[0].strip()
  return None


def _line_answer(text: str, start: int) -> Optional[str]:
  """The answer after a final-answer phrase or "####" ending at text[start] (see the module
  docstring), or None when it or its math group is empty, or the group is unclosed."""
  rest = text[start:].lstrip(" \t:")
  if rest.startswith(("\n", "\r")):  # A math group may open the next line; nothing else.
    rest = rest.lstrip()
    if not rest.startswith(tuple(_GROUPS)):
      return None
  answer = ""
  opener = next((o for o in _GROUPS if rest.startswith(o)), None)
  if opener is not None:
    body = rest[len(opener):]
    end = _unescaped(body, _GROUPS[opener])
    if end is None or not body[:end].strip():
      return None
    answer, rest = body[:end], body[end + len(_GROUPS[opener]):]
  answer += rest.split("\n", 1)[0]
  answer = _HOPE_RE.sub("", answer).strip().rstrip(" .,;").strip()
  return answer or None


def _brace_ends(text: str) -> dict[int, int]:
  """For each "{" of `text` that is closed, its index -> the index after its "}" (one pass;
  escaped braces do not count, as in `_braced`)."""
  ends, stack, i = {}, [], 0
  while i < len(text):
    c = text[i]
    if c == "\\":
      i += 1
    elif c == "{":
      stack.append(i)
    elif c == "}" and stack:
      ends[stack.pop()] = i + 1
    i += 1
  return ends


def _last_marker_answer(text: str) -> Optional[str]:
  """The answer of the last final-answer marker of `text` that is not inside a complete box;
  None when there is none or its answer is empty or unclosed. Linear in len(text)."""
  brace_ends = _brace_ends(text)
  last, boxed_until = None, 0
  for match in _MARKER_RE.finditer(text):
    if match.start() >= boxed_until:
      last = match
      if match.group(0)[0] == "\\":
        boxed_until = brace_ends.get(match.end(), 0)
  if last is None:
    return None
  if last.group(0)[0] == "\\":
    box = _box(text, last.end())
    return (box[0].strip() or None) if box else None
  return _line_answer(text, last.end())


def _unescaped(text: str, delimiter: str) -> Optional[int]:
  """Index of the first `delimiter` in `text` not preceded by a backslash."""
  i = text.find(delimiter)
  while i > 0 and text[i - 1] == "\\":
    i = text.find(delimiter, i + 1)
  return None if i < 0 else i


def _last_number(text: str) -> Optional[str]:
  matches = _NUMBER_RE.findall(text)
  return matches[-1] if matches else None
