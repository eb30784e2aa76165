"""A synthetic self-correction task that a tiny model learns on a CPU in minutes.

Problems are sums of single digits, "3+9+4+7". A solution states its answer FIRST and then
works it out, adding the first two terms at each step:

    #### 23
    12+4+7 16+7 23

(the first line is the final answer in GSM8K's `####` form, so rewards go through the same
`rewards.math.check` path as MATH and GSM8K). Blurting the sum of up to `max_terms` digits in
one go is hard for a small model; each step of the working is easy. So a first attempt is often
wrong while its own working is right, and a second attempt that reads the first can fix it:
correction is genuinely learnable.

The SFT transcripts that make the base model (`sft_transcript`) show the two-turn format with
imperfect behaviour, like a pretrained model's: the first answer is the true sum only with
probability `p_first_right`, and on sums of `misconception_terms` terms or more it usually
forgets the last term (a systematic error that greedy decoding keeps); the working is always
right. The second attempt repeats the first
(`p_copy`), states the sum of the working (`p_fix`) or guesses again (the rest). Greedy decoding
of such a model repeats its first answer: before RL, attempt 2 does not help (Delta ~ 0).
"""

import dataclasses
import functools
import zlib
from typing import Optional, Sequence

import gin
import numpy as np

from score_jax.data import tasks
from score_jax.models import chat
from score_jax.models import transformer as model_lib
from score_jax.models import vocab as vocab_lib

ALPHABET = "0123456789+# \nchek:"
INSTRUCTION = "check:"


def solution(digits: Sequence[int], answer: int) -> str:
  """The answer line, then the working: each step adds the first two terms of the last."""
  terms, steps = [int(d) for d in digits], []
  while len(terms) > 1:
    terms = [terms[0] + terms[1]] + terms[2:]
    steps.append("+".join(str(t) for t in terms))
  return f"#### {answer}\n" + " ".join(steps)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ToyArithmetic(tasks.Task):
  """Digit sums with `min_terms`..`max_terms` terms; 1 problem in `test_every` is held out."""
  min_terms: int = 3
  max_terms: int = 6
  num_train: int = 50_000
  num_test: int = 2_000
  test_every: int = 5
  seed: int = 0
  p_first_right: float = 0.6
  misconception_terms: Optional[int] = 6
  p_copy: float = 0.8
  p_fix: float = 0.15

  name = "toy_arithmetic"
  splits = ("train", "test")
  self_correction_instruction = INSTRUCTION

  def __post_init__(self):
    if not 2 <= self.min_terms <= self.max_terms:
      raise ValueError("need 2 <= min_terms <= max_terms")
    if self.p_copy + self.p_fix > 1:
      raise ValueError("p_copy + p_fix must be <= 1")

  @functools.cached_property
  def vocab(self) -> vocab_lib.CharVocab:
    return vocab_lib.CharVocab(ALPHABET)

  def _is_test(self, problem: str) -> bool:
    return zlib.crc32(problem.encode()) % self.test_every == 0

  @functools.lru_cache(maxsize=4)
  def examples(self, split: str) -> Sequence[tasks.Example]:
    self._check_split(split)
    want = self.num_train if split == "train" else self.num_test
    rng = np.random.default_rng([self.seed, split == "test"])
    out, seen = [], set()
    while len(out) < want:
      digits = rng.integers(0, 10, rng.integers(self.min_terms, self.max_terms + 1))
      problem = "+".join(str(d) for d in digits)
      if problem in seen or self._is_test(problem) != (split == "test"):
        continue
      seen.add(problem)
      out.append(tasks.Example(id=f"{split}-{len(out)}", prompt=problem,
                               reference=str(int(digits.sum()))))
    return tuple(out)

  def reward_call(self, response: str, example: tasks.Example) -> tasks.RewardCall:
    return tasks.math_reward, (response, example.reference)

  def final_answer(self, response: str) -> Optional[str]:
    return tasks.math_answer(response)

  def reference_solution(self, example: tasks.Example) -> str:
    digits = [int(d) for d in example.prompt.split("+")]
    return solution(digits, sum(digits))

  def sft_transcript(self, example: tasks.Example,
                     rng: np.random.Generator) -> tuple[str, str]:
    """Two attempts (texts) of an imperfect base model for the SFT data."""
    digits = [int(d) for d in example.prompt.split("+")]
    total = sum(digits)

    def guess():
      if self.misconception_terms and len(digits) >= self.misconception_terms:
        # A systematic error on long sums: the last term is forgotten, more often than not.
        return total if rng.random() > self.p_first_right else total - digits[-1]
      if rng.random() < self.p_first_right:
        return total
      return max(0, total + int(rng.choice([-3, -2, -1, 1, 2, 3])))

    first = guess()
    u = rng.random()
    second = first if u < self.p_copy else total if u < self.p_copy + self.p_fix else guess()
    return solution(digits, first), solution(digits, second)


@gin.configurable
def model_config(vocab_size: int, num_layers: int = 2, embed_dim: int = 128,
                 mlp_dim: int = 256, num_heads: int = 4, num_kv_heads: int = 2,
                 head_dim: int = 32, sliding_window: int = 32) -> model_lib.ModelConfig:
  """The demo's model: Gemma-3-shaped (local/global layers, qk-norm, GeGLU), a few 100k params."""
  return model_lib.tiny_config(vocab_size=vocab_size, num_layers=num_layers,
                               embed_dim=embed_dim, mlp_dim=mlp_dim, num_heads=num_heads,
                               num_kv_heads=num_kv_heads, head_dim=head_dim,
                               sliding_window=sliding_window)


# The toy's plain conversation: problem line, answer, instruction line, answer; each answer
# ends with the vocabulary's EOS.
FORMAT = chat.ChatFormat(name="toy", user_turn="{text}\n", after_answer="", stop_token=None)
