"""The pure train step: `(state, batch) -> (state, metrics)`.

One forward over the whole multi-turn conversation gives the log-probs of every attempt's
tokens; the frozen reference model runs the same forward without gradients (a separate pure
function, `reference_logprobs`, that the trainer overlaps with the host rewards); the objective
(objectives.py) turns them and the host rewards into a loss; optax applies the update.
The same function trains the SFT base model with a cross-entropy loss.

Batch (numpy or jax arrays, leading dim B):
  tokens   int32   [B, T]  conversation, as `SampleOutput.tokens` (pad after the end).
  attempt  int32   [B, T]  0 context, k for attempt k (as `SampleOutput.attempt`).
  rewards  float32 [B, K]  (policy losses only) host reward of each attempt.
  ref_logp float32 [B, T-1] (policy losses only) `reference_logprobs` of the tokens.
"""

import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from score_jax.decoding import sampling
from score_jax.models import transformer as model_lib
from score_jax.rl import logprobs
from score_jax.rl import objectives

Array = jax.Array
Batch = dict[str, Array]
LossFn = Callable[[Any, Any, Batch], tuple[Array, dict[str, Array]]]


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  ref_params: Any  # The frozen KL reference (the base model), never updated; None for SFT.


def init_state(params: Any, optimizer: optax.GradientTransformation,
               ref_params: Any = None) -> TrainState:
  """A fresh state; `ref_params` None for losses without a reference (SFT)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), ref_params=ref_params)


def _shifted_logprobs(model_cfg, params, tokens, log_probs_fn=None, chunk_len=None):
  """(logp, entropy, top1), each float32 [B, T-1], of tokens[:, 1:] under the causal forward.

  Chunked over the sequence (`logprobs.token_logprobs`): no [B, T, V] logits are held.
  """
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  hidden, _ = model_lib.apply(model_cfg, params, tokens, positions)
  return logprobs.token_logprobs(model_cfg, params, hidden[:, :-1], tokens[:, 1:],
                                 log_probs_fn, chunk_len)


def reference_logprobs(ref_params: Any, tokens: Array, *, model_cfg: model_lib.ModelConfig,
                       method: sampling.Method, chunk_len: Optional[int] = None,
                       num_micro_batches: int = 1) -> Array:
  """Log-probs [B, T-1] of tokens[:, 1:] under the frozen reference, without gradients.

  Under `method.log_probs`, the distribution the rollouts were sampled from. Kept out of the
  train step so that the trainer can dispatch it right after sampling and let the device
  compute it while the host checks the rewards. Micro-batched like the train step (one
  micro-batch's activations live at a time).
  """
  ref_params = jax.lax.stop_gradient(ref_params)

  def one(toks):
    return _shifted_logprobs(model_cfg, ref_params, toks, method.log_probs, chunk_len)[0]

  if num_micro_batches == 1:
    return jax.lax.stop_gradient(one(tokens))
  _, logp = jax.lax.scan(lambda _, toks: (None, one(toks)), None,
                         split_micro_batches(tokens, num_micro_batches))
  return jax.lax.stop_gradient(merge_micro_batches(logp))


def policy_loss(params: Any, ref_params: Any, batch: Batch, *,
                model_cfg: model_lib.ModelConfig, objective: objectives.ObjectiveConfig,
                method: sampling.Method, chunk_len: Optional[int] = None
                ) -> tuple[Array, dict[str, Array]]:
  """SCoRe / RL loss of one batch (which carries `ref_logp` from `reference_logprobs`).

  Log-probs under `method.log_probs` (the sampling distribution: temperature, truncation),
  in float32.
  """
  del ref_params  # Already used: batch["ref_logp"].
  logp, entropy, _ = _shifted_logprobs(model_cfg, params, batch["tokens"], method.log_probs,
                                       chunk_len)
  return objectives.loss_fn(objective, logp, batch["ref_logp"], batch["attempt"][:, 1:],
                            batch["rewards"], entropy)


def sft_loss(params: Any, ref_params: Any, batch: Batch, *,
             model_cfg: model_lib.ModelConfig, chunk_len: Optional[int] = None
             ) -> tuple[Array, dict[str, Array]]:
  """Mean next-token cross-entropy over attempt tokens (the SFT base model and baselines)."""
  del ref_params
  mask = (batch["attempt"][:, 1:] > 0).astype(jnp.float32)
  logp, _, top1 = _shifted_logprobs(model_cfg, params, batch["tokens"], chunk_len=chunk_len)
  n = jnp.maximum(mask.sum(), 1.0)
  loss = -jnp.sum(logp * mask) / n
  accuracy = jnp.sum(top1 * mask) / n
  return loss, {"loss": loss, "token_accuracy": accuracy}


def split_micro_batches(tree: Any, num_micro_batches: int, group_size: int = 1) -> Any:
  """Leaves [B, ...] -> [M, B / M, ...] for M = `num_micro_batches`.

  Micro-batch m takes the groups m, m + M, m + 2M, ... of `group_size` consecutive rows: each
  micro-batch holds whole sample groups (the n samples of a prompt, as RLOO needs), and with the
  batch sharded in contiguous row blocks over devices, every micro-batch takes the same number
  of rows from every device (when each device's rows hold a multiple of M groups), so all
  devices work on every micro-batch.
  """
  def split(x):
    rows = x.shape[0]
    if rows % (num_micro_batches * group_size):
      raise ValueError(f"batch of {rows} rows does not split into {num_micro_batches} "
                       f"micro-batches of whole groups of {group_size}")
    x = x.reshape((rows // (num_micro_batches * group_size), num_micro_batches, group_size)
                  + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((num_micro_batches, rows // num_micro_batches)
                                         + x.shape[3:])
  return jax.tree.map(split, tree)


def merge_micro_batches(tree: Any, group_size: int = 1) -> Any:
  """The inverse of `split_micro_batches`: leaves [M, B / M, ...] -> [B, ...]."""
  def merge(x):
    m, per = x.shape[:2]
    x = x.reshape((m, per // group_size, group_size) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape((m * per,) + x.shape[3:])
  return jax.tree.map(merge, tree)


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation, num_micro_batches: int = 1,
               group_size: int = 1) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer update. Pure; jit it with `loss_fn` and `optimizer` bound (partial).

  With `num_micro_batches` > 1 the batch is split along B (`split_micro_batches`, whole groups
  of `group_size` rows, e.g. the samples of a prompt, in each micro-batch) and the gradients
  and metrics of the micro-batches are averaged.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro(params, mb):
    (_, metrics), grads = grad_fn(params, state.ref_params, mb)
    return grads, metrics

  if num_micro_batches == 1:
    grads, metrics = micro(state.params, batch)
  else:
    def body(acc, mb):
      grads, metrics = micro(state.params, mb)
      return jax.tree.map(jnp.add, acc, (grads, metrics)), None

    micro_batches = split_micro_batches(batch, num_micro_batches, group_size)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(micro, state.params, first))
    total, _ = jax.lax.scan(body, zeros, micro_batches)
    grads, metrics = jax.tree.map(lambda x: x / num_micro_batches, total)

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.global_norm(grads))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    num_micro_batches: int = 1, group_size: int = 1):
  """`train_step` with its static parts bound: a function (state, batch) -> (state, metrics)."""
  return functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer,
                           num_micro_batches=num_micro_batches, group_size=group_size)
