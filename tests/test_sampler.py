"""The KV-cache multi-attempt sampler against a slow reference that recomputes everything."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multidevice import run_with_devices
from score_jax import partitioning
from score_jax.decoding import sampler as sampler_lib
from score_jax.decoding import sampling
from score_jax.models import configs
from score_jax.models import transformer as model_lib
from score_jax.rl import logprobs

PAD = 0
INSTRUCTION = [5, 6, 7]
PROMPTS = [[3, 9, 4], [8], [10, 11, 12, 13, 14], [4, 4]]
MAX_NEW = 7


@pytest.fixture(scope="module")
def cfg_params():
  cfg = model_lib.tiny_config(vocab_size=24)  # sliding window 8 < buffer: local layers on a
  # ring of 8 slots (asserted below).
  return cfg, model_lib.init_params(cfg, jax.random.PRNGKey(1))


def naive_greedy(cfg, params, prompt, num_attempts, eot_id):
  """Slow and obviously correct: full forward over the whole text for every new token.

  The text is right-padded to a fixed width (causal attention never looks right), so the
  forward compiles once.
  """
  width = 6 + 3 * (MAX_NEW + len(INSTRUCTION))
  forward = jax.jit(model_lib.forward, static_argnums=0)
  seq, attempts = list(prompt), []
  for k in range(num_attempts):
    attempt = []
    while len(attempt) < MAX_NEW:
      tokens = jnp.asarray([seq + [PAD] * (width - len(seq))])
      logits, _ = forward(cfg, params, tokens, jnp.arange(width)[None])
      tok = int(jnp.argmax(logits[0, len(seq) - 1]))
      seq.append(tok)
      attempt.append(tok)
      if tok == eot_id:
        break
    attempts.append(attempt)
    if k < num_attempts - 1:
      seq += INSTRUCTION
  return seq, attempts


def make_sampler(cfg, eot_id, num_attempts=2, unroll_decode=False, attend_spans=None):
  return sampler_lib.Sampler(cfg, num_attempts=num_attempts, max_new_tokens=MAX_NEW,
                             max_prompt_len=6, instruction=INSTRUCTION, eot_id=eot_id,
                             pad_id=PAD, unroll_decode=unroll_decode, attend_spans=attend_spans)


def pick_eot(cfg, params):
  """An end-of-turn id that makes attempt-1 lengths uneven across the prompts."""
  firsts = [naive_greedy(cfg, params, p, 1, eot_id=-1)[1][0] for p in PROMPTS]
  for cand in range(3, cfg.vocab_size):
    lengths = {a.index(cand) if cand in a else MAX_NEW for a in firsts}
    if len(lengths) >= 2:
      return cand
  raise AssertionError("random model too degenerate for this test")


# Decoding with the layers unrolled and scanned over their stack (the default), in one loop
# per attempt attending every slot it can reach and in several attending growing spans.
@pytest.mark.parametrize("num_attempts, unroll_decode, attend_spans",
                         [(2, True, 4), (3, False, 4), (2, False, 1)])
def test_greedy_matches_naive_reference(cfg_params, num_attempts, unroll_decode, attend_spans):
  cfg, params = cfg_params
  eot = pick_eot(cfg, params)
  sampler = make_sampler(cfg, eot, num_attempts, unroll_decode, attend_spans)
  assert model_lib.init_cache(cfg, 1, sampler.total_len).ring_k is not None
  out = sampler(params, PROMPTS, jax.random.PRNGKey(0), sampling.Greedy())
  att_lengths = np.asarray(out.attempt_lengths)
  assert len(set(att_lengths[0].tolist())) >= 2, "attempt-1 lengths should be uneven"
  for b, prompt in enumerate(PROMPTS):
    seq, attempts = naive_greedy(cfg, params, prompt, num_attempts, eot)
    n = int(out.lengths[b])
    assert np.asarray(out.tokens[b, :n]).tolist() == seq
    assert (np.asarray(out.tokens[b, n:]) == PAD).all()
    for k, attempt in enumerate(attempts):
      assert att_lengths[k, b] == len(attempt)
      assert np.asarray(out.attempt_tokens[k, b, :len(attempt)]).tolist() == attempt
      # The conversation buffer marks exactly these tokens as attempt k + 1.
      assert np.asarray(out.tokens[b][np.asarray(out.attempt[b]) == k + 1]).tolist() == attempt


def _check_sharded_sampler_matches_one_device():
  cfg = model_lib.tiny_config(vocab_size=24)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(1))
  prompts, rng, method = PROMPTS * 2, jax.random.PRNGKey(3), sampling.Sampling(1.0)
  expected = make_sampler(cfg, eot_id=3)(params, prompts, rng, method)
  mesh = partitioning.make_mesh((2, 2, 2))
  rules = partitioning.DEFAULT_RULES
  params = jax.device_put(params, partitioning.model_param_shardings(cfg, mesh, rules))
  sampler = sampler_lib.Sampler(cfg, num_attempts=2, max_new_tokens=MAX_NEW, max_prompt_len=6,
                                instruction=INSTRUCTION, eot_id=3, pad_id=PAD, mesh=mesh)
  with partitioning.with_mesh_and_rules(mesh, rules):
    out = sampler(params, prompts, rng, method)
  np.testing.assert_array_equal(out.tokens, expected.tokens)
  np.testing.assert_allclose(out.logprobs, expected.logprobs, atol=1e-5)


def test_sharded_sampler_matches_one_device():
  """Rows split over 8 devices (data x fsdp), weights and KV cache (the ring included)
  sharded by the logical rules: the tokens of one device."""
  run_with_devices(8, _check_sharded_sampler_matches_one_device)


@pytest.mark.parametrize("method", [
    sampling.Sampling(0.7),
    sampling.Sampling(1.0, top_k=3),
    sampling.Sampling(1.3, top_p=0.6),
    sampling.Sampling(1.0, min_p=0.2),
    sampling.Sampling(0.9, top_k=5, top_p=0.8, min_p=0.05),
], ids=["temperature", "top_k", "top_p", "min_p", "all"])
def test_sampler_logprobs_match_training_forward(cfg_params, method):
  """The sampler reports log-probs of the distribution it sampled from; the trainer's
  (chunked) recomputation under the same method gives the same numbers."""
  cfg, params = cfg_params
  out = make_sampler(cfg, eot_id=3)(params, PROMPTS, jax.random.PRNGKey(2), method)
  tokens = out.tokens
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  hidden, _ = model_lib.apply(cfg, params, tokens, positions)
  logp, _, _ = logprobs.token_logprobs(cfg, params, hidden[:, :-1], tokens[:, 1:],
                                       method.log_probs, chunk_len=5)
  mask = np.asarray(out.attempt[:, 1:]) > 0
  assert mask.sum() > 10
  assert np.isfinite(np.asarray(out.logprobs)[:, 1:][mask]).all()
  np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(out.logprobs[:, 1:])[mask],
                             atol=1e-4)
  # Per-attempt views agree with the buffer.
  flat = np.concatenate([np.asarray(out.attempt_logprobs[k])[np.asarray(out.attempt_mask[k])]
                         for k in range(2)])
  assert np.isclose(flat.sum(), np.asarray(out.logprobs).sum(), atol=1e-4)


def test_bfloat16_cache_tracks_float32(cfg_params):
  """A bfloat16 KV cache changes the numbers only by bfloat16 rounding."""
  cfg, params = cfg_params
  method = sampling.Sampling(1.0)
  ref = make_sampler(cfg, eot_id=3)(params, PROMPTS, jax.random.PRNGKey(2), method)
  s16 = sampler_lib.Sampler(cfg, num_attempts=2, max_new_tokens=MAX_NEW, max_prompt_len=6,
                            instruction=INSTRUCTION, eot_id=3, pad_id=PAD,
                            cache_dtype=jnp.bfloat16)
  out = s16(params, PROMPTS, jax.random.PRNGKey(2), method)
  # Same first sampled token everywhere (prefill logits differ by rounding only) ...
  np.testing.assert_array_equal(out.attempt_tokens[0, :, 0], ref.attempt_tokens[0, :, 0])
  np.testing.assert_allclose(out.attempt_logprobs[0, :, 0], ref.attempt_logprobs[0, :, 0],
                             atol=0.05)


def test_sampling_is_stochastic_and_seeded(cfg_params):
  cfg, params = cfg_params
  s = make_sampler(cfg, eot_id=3)
  method = sampling.Sampling(1.0)
  a = s(params, PROMPTS, jax.random.PRNGKey(0), method).tokens
  b = s(params, PROMPTS, jax.random.PRNGKey(0), method).tokens
  c = s(params, PROMPTS, jax.random.PRNGKey(1), method).tokens
  assert (np.asarray(a) == np.asarray(b)).all()
  assert (np.asarray(a) != np.asarray(c)).any()


def test_span_ends():
  assert sampler_lib.span_ends(7, 4) == [2, 4, 6, 7]
  assert sampler_lib.span_ends(8, 4) == [2, 4, 6, 8]
  assert sampler_lib.span_ends(3, 4) == [1, 2, 3]
  assert sampler_lib.span_ends(5, 1) == [5]
  with pytest.raises(ValueError, match="attend_spans must be >= 1, got 0"):
    sampler_lib.span_ends(5, 0)  # No loop at all would decode nothing.


def test_auto_attend_spans_follows_the_cache_share_of_the_bytes():
  """Four loops where the KV cache holds at least half the weights' bytes (as stated in its
  docstring for SmolLM2-135M and the benchmark's shapes), one below."""
  cfg = configs.get("smollm2_135m")
  total = sampler_lib.buffer_length(64, 2, 128, 20)
  assert sampler_lib.auto_attend_spans(cfg, 32, total) == 4
  assert sampler_lib.auto_attend_spans(cfg, 8, total) == 1
  # A bfloat16 cache holds half the bytes: 32 rows no longer reach the share, 64 do.
  assert sampler_lib.auto_attend_spans(cfg, 32, total, jnp.bfloat16) == 1
  assert sampler_lib.auto_attend_spans(cfg, 64, total, jnp.bfloat16) == 4


@pytest.mark.parametrize("attend_spans, batch", [(4, 2), (None, 64)])
def test_attention_span_grows_with_the_decode_loops(cfg_params, monkeypatch, attend_spans,
                                                    batch):
  """Each decode loop attends the slots its last step can have filled, no more: the prefill
  the prompt, attempt 1's loops P + 2, 4, 6, 7 slots, the instruction P + N + L, attempt
  2's loops P + N + L + 2, ..., up to the whole buffer. 64 rows of the tiny model: a cache
  big enough against its weights for `auto_attend_spans`' 4 loops."""
  cfg, params = cfg_params
  spans = []
  apply = model_lib.apply

  def recording_apply(cfg, params, tokens, positions, cache=None, attend_len=None, layers=None):
    spans.append(attend_len)
    return apply(cfg, params, tokens, positions, cache, attend_len, layers)

  monkeypatch.setattr(sampler_lib.model_lib, "apply", recording_apply)
  prompts = jnp.zeros((batch, 6), jnp.int32)
  jax.eval_shape(lambda p: sampler_lib.sample(
      p, prompts, jnp.full((batch,), 6).at[0].set(3), jnp.array(INSTRUCTION),
      jax.random.PRNGKey(0),
      model_cfg=cfg, method=sampling.Greedy(), num_attempts=2, max_new_tokens=MAX_NEW,
      eot_id=1, pad_id=PAD, attend_spans=attend_spans), params)
  total = sampler_lib.buffer_length(6, 2, MAX_NEW, len(INSTRUCTION))
  assert spans == [6, 8, 10, 12, 13, 16, 18, 20, 22, 23] and total == 23


def test_no_recompilation_at_fixed_shapes(cfg_params):
  cfg, params = cfg_params
  s = make_sampler(cfg, eot_id=3)
  s(params, PROMPTS, jax.random.PRNGKey(0), sampling.Sampling(1.0))
  s(params, [[1, 2], [3], [4, 5, 6], [7]], jax.random.PRNGKey(5), sampling.Sampling(1.0))
  assert s._sample._cache_size() == 1
  s(params, PROMPTS, jax.random.PRNGKey(0), sampling.Greedy())  # another method: compiles once
  s(params, PROMPTS, jax.random.PRNGKey(1), sampling.Greedy())
  assert s._sample._cache_size() == 2


def test_prompt_that_does_not_fit_is_an_error(cfg_params):
  cfg, params = cfg_params
  with pytest.raises(ValueError, match="max_prompt_len"):
    make_sampler(cfg, eot_id=3)(params, [[1] * 7], jax.random.PRNGKey(0), sampling.Greedy())
  with pytest.raises(ValueError, match="at least one token"):
    make_sampler(cfg, eot_id=3)(params, [[]], jax.random.PRNGKey(0), sampling.Greedy())
  with pytest.raises(ValueError, match="attend_spans"):
    make_sampler(cfg, eot_id=3, attend_spans=0)


def test_max_batch_runs_chunks_of_rows(cfg_params):
  """Greedy decoding does not depend on the other rows: chunks give the same tokens."""
  cfg, params = cfg_params
  whole = make_sampler(cfg, eot_id=3)(params, PROMPTS, jax.random.PRNGKey(0), sampling.Greedy())
  chunked = sampler_lib.Sampler(cfg, num_attempts=2, max_new_tokens=MAX_NEW, max_prompt_len=6,
                                instruction=INSTRUCTION, eot_id=3, pad_id=PAD, max_batch=3)
  out = chunked(params, PROMPTS, jax.random.PRNGKey(0), sampling.Greedy())
  for field in ("tokens", "attempt", "lengths", "attempt_tokens", "attempt_mask"):
    np.testing.assert_array_equal(getattr(out, field), getattr(whole, field))
  np.testing.assert_allclose(out.logprobs, whole.logprobs, atol=1e-5)


def test_prompt_bucket_pads_to_the_call_not_to_max_prompt_len(cfg_params):
  """With `prompt_bucket` a call's buffer follows its longest prompt (rounded up to the bucket,
  capped at max_prompt_len); greedy decoding writes the same conversations as with prompts
  padded to max_prompt_len, and chunks of one call share one buffer length."""
  cfg, params = cfg_params
  short = [[3, 9, 4], [8], [4, 4], [2]]  # longest 3 -> padded to 4 (bucket 2), not 6
  full = make_sampler(cfg, eot_id=3)(params, short, jax.random.PRNGKey(0), sampling.Greedy())
  bucketed = sampler_lib.Sampler(cfg, num_attempts=2, max_new_tokens=MAX_NEW, max_prompt_len=6,
                                 instruction=INSTRUCTION, eot_id=3, pad_id=PAD, prompt_bucket=2,
                                 max_batch=2)
  assert bucketed.padded_len(short) == 4 and bucketed.padded_len(PROMPTS) == 6
  out = bucketed(params, short, jax.random.PRNGKey(0), sampling.Greedy())
  t = sampler_lib.buffer_length(4, 2, MAX_NEW, len(INSTRUCTION))
  assert np.shape(out.tokens) == (4, t) and t < np.shape(full.tokens)[1] == bucketed.total_len
  np.testing.assert_array_equal(out.tokens, np.asarray(full.tokens)[:, :t])
  assert (np.asarray(full.tokens)[:, t:] == PAD).all()
  for field in ("attempt", "lengths", "attempt_tokens", "attempt_mask"):
    np.testing.assert_array_equal(np.asarray(getattr(out, field))[..., :t],
                                  np.asarray(getattr(full, field))[..., :t])
  np.testing.assert_allclose(out.logprobs, np.asarray(full.logprobs)[:, :t], atol=1e-5)
  # The chunks [3, 9, 4], [8] and [4, 4], [2] (longest 3 and 2) were padded alike: one program.
  assert bucketed._sample._cache_size() == 1
  bucketed(params, PROMPTS[:2], jax.random.PRNGKey(0), sampling.Greedy())  # bucket 4 again
  assert bucketed._sample._cache_size() == 1
  bucketed(params, PROMPTS, jax.random.PRNGKey(0), sampling.Greedy())  # 5 tokens -> 6
  assert bucketed._sample._cache_size() == 2


def test_concatenate_pads_shorter_buffers():
  """Rows of outputs with buffers of 5 and 7 slots: the first padded (pad, attempt 0, log-prob
  0), per-attempt views [K, B, N] joined along B."""
  def output(tokens, attempt_tokens):
    tokens = np.asarray(tokens, np.int32)
    views = np.asarray(attempt_tokens, np.int32)
    return sampler_lib.SampleOutput(
        tokens=tokens, attempt=np.ones_like(tokens), logprobs=np.full(tokens.shape, -0.5),
        lengths=np.full(tokens.shape[0], tokens.shape[1], np.int32), attempt_tokens=views,
        attempt_logprobs=np.zeros(views.shape), attempt_mask=np.ones(views.shape, bool),
        attempt_lengths=np.ones(views.shape[:2], np.int32))

  a = output([[1, 2, 3, 4, 5]], [[[3, 4]], [[5, 9]]])
  b = output([[6, 7, 8, 9, 10, 11, 12], [13] * 7], [[[8, 9], [1, 1]], [[11, 12], [2, 2]]])
  out = sampler_lib.concatenate([a, b], PAD)
  np.testing.assert_array_equal(out.tokens, [[1, 2, 3, 4, 5, PAD, PAD],
                                             [6, 7, 8, 9, 10, 11, 12], [13] * 7])
  np.testing.assert_array_equal(out.attempt, [[1] * 5 + [0] * 2, [1] * 7, [1] * 7])
  np.testing.assert_array_equal(out.logprobs[0], [-0.5] * 5 + [0.0] * 2)
  np.testing.assert_array_equal(out.lengths, [5, 7, 7])
  np.testing.assert_array_equal(out.attempt_tokens, [[[3, 4], [8, 9], [1, 1]],
                                                     [[5, 9], [11, 12], [2, 2]]])
  assert out.attempt_mask.shape == out.attempt_logprobs.shape == (2, 3, 2)
  assert out.attempt_lengths.shape == (2, 3)
