"""Causal softmax attention for training on CPU: blocks of queries, score recomputed in the backward pass.

The model's choice on CPU when `ModelConfig.attention_impl` is None (model.Attention). It computes what
`jax.nn.dot_product_attention(q, k, v, is_causal=True)` computes (output and gradients, to float32
rounding). In float32 on one device it runs the C++ kernel of kernels/attention_cpu.cc (through
kernels/attention_cpu_ffi.py; built on first use by kernels/cpu_kernels.py): alone 2.4x faster than the
JAX version below on small's attention (forward + backward), 3% on the whole step, and one op to compile
instead of ~100 per layer. Otherwise (bfloat16, a mesh, no compiler, `VESPER_CPU_KERNELS=0`) it runs
that JAX version, which differs from XLA's own for three reasons measured on the 2-core CPU (README,
"CPU train step"):

1. Causal blocks. The queries are cut into blocks of `BLOCK_TOKENS` positions; block i only meets the
   keys up to its own last position. At 256 positions and blocks of 64 that is 10/16 of the score and
   weighted-sum work of the full [T, S] square, of which XLA computes all and then masks half.
2. Parallel groups. XLA:CPU runs a batched dot (these per-head [T, H] products) in YNNPACK on one
   thread (measured: as fast on one core as on two). The sequences are split into `_parallel_groups`
   groups whose dots are independent, and XLA's executor runs independent dots on different threads.
3. A small working set. XLA's version keeps the [B, N, T, S] probabilities (and copies of them in other
   layouts) alive from the forward to the backward pass of every layer; this one keeps q, k, v, the
   output and one log-sum-exp per query, and recomputes the scores in the backward pass (FlashAttention's
   backward): one more score product per block, a much smaller set of step temporaries (see losses.py).

Shape key as in model.py, plus: Z blocks of L query positions, G query heads per key/value head
(N = K·G), and Q = G·L the query rows of one key/value head in a block (the G heads that share a
key/value head are stacked into one axis, so that every product contracts a single axis: XLA:CPU copied
an operand into a transposed layout for a dot contracting two). The queries are held block-major,
[Z, B, K, Q, H], so that a block is one contiguous array: sliced out of [B, K, T, H], each block's rows
were a copy (the step ~1% slower, 24 more kernels to compile). A query row with no visible key (every key
padding) gets a uniform average of the keys up to its block's end where XLA's gets one over all keys:
either is garbage that the loss weights out.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from vesper_jax.kernels import attention_cpu_ffi

BLOCK_TOKENS = 64  # query positions per block: 64 and 32 ran small's step alike, 128 4% and 256 7% slower
_MASKED = float(jnp.finfo(jnp.float32).min)  # finite, as in dot_product_attention: no NaN on empty rows


def causal_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                     attention_mask_BT: jax.Array | None = None, *,
                     block_tokens: int = BLOCK_TOKENS, kernel: bool | None = None) -> jax.Array:
  """Causal (grouped-query) attention, as `jax.nn.dot_product_attention(..., is_causal=True)`.

  Args:
    q_BTNH, k_BTKH, v_BTKH: queries, keys and values (RoPE already applied); N a multiple of K.
    attention_mask_BT: 1 for real tokens, 0 for padding (a padded key is never attended to).
    block_tokens: query positions per block of the JAX version (T is padded to a multiple: the padded
      positions are never attended to, and their outputs are dropped).
    kernel: the C++ kernel (True), the JAX version (False), or the kernel where it applies (None).
  Returns:
    [B, T, N, H], in v's dtype; the softmax runs in float32 whatever the compute dtype.
  """
  if kernel is None:
    kernel = attention_cpu_ffi.supports(q_BTNH, k_BTKH, v_BTKH)
  if kernel:
    return attention_cpu_ffi.causal_attention(q_BTNH, k_BTKH, v_BTKH, attention_mask_BT)
  groups = _parallel_groups(q_BTNH.shape[0])
  if groups > 1:  # independent groups of sequences, each with its own dots (see the module docstring)
    masks = [None] * groups if attention_mask_BT is None else jnp.split(attention_mask_BT, groups)
    return jnp.concatenate([_causal_attention(q, k, v, m, block_tokens) for q, k, v, m in zip(
        jnp.split(q_BTNH, groups), jnp.split(k_BTKH, groups), jnp.split(v_BTKH, groups), masks)])
  return _causal_attention(q_BTNH, k_BTKH, v_BTKH, attention_mask_BT, block_tokens)


def _causal_attention(q_BTNH, k_BTKH, v_BTKH, attention_mask_BT, block_tokens):
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  G = N // K
  L = min(block_tokens, T)
  Z = -(-T // L)
  key_ok_BS = (jnp.ones((1, T), jnp.bool_) if attention_mask_BT is None
               else attention_mask_BT.astype(jnp.bool_))
  if Z * L != T:  # the last block padded: its extra queries are dropped, its extra keys never seen
    pad = ((0, 0), (0, Z * L - T), (0, 0), (0, 0))
    q_BTNH, k_BTKH, v_BTKH = (jnp.pad(a, pad) for a in (q_BTNH, k_BTKH, v_BTKH))
    key_ok_BS = jnp.pad(jnp.broadcast_to(key_ok_BS, (key_ok_BS.shape[0], T)), ((0, 0), (0, Z * L - T)))
  # Block-major queries: block i's rows are one contiguous [B, K, Q, H] array (no copy per block).
  q_ZBKQH = ((q_BTNH * H ** -0.5).reshape(B, Z, L, K, G, H).transpose(1, 0, 3, 4, 2, 5)
             .reshape(Z, B, K, G * L, H))
  k_BKSH, v_BKSH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
  out_ZBKQH = _blocked_core(q_ZBKQH, k_BKSH, v_BKSH, key_ok_BS, L)
  out_BTNH = (out_ZBKQH.reshape(Z, B, K, G, L, H).transpose(1, 0, 4, 2, 3, 5)
              .reshape(B, Z * L, N, H))
  return out_BTNH[:, :T]


def _parallel_groups(B: int) -> int:
  """How many independent groups the B sequences are split into: one per core, up to 4, dividing B.

  More groups than cores gain nothing, and each group adds its own dots to compile (first step time).
  The split is along the batch, contiguous in memory: split along the heads, each group's operands were
  strided copies, and the step ran 3% slower.
  """
  cores = min(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1, 4)
  return max(g for g in range(1, cores + 1) if B % g == 0)


def _visible(key_ok_BS: jax.Array, G: int, a: int, b: int) -> jax.Array:
  """[B|1, 1, Q, b]: row g·L + t of the block at [a, b) (position a + t) sees the real keys s ≤ a + t."""
  causal_LS = np.arange(b)[None, :] <= (a + np.arange(b - a))[:, None]
  return jnp.asarray(np.tile(causal_LS, (G, 1)))[None, None] & key_ok_BS[:, None, None, :b]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_core(q_ZBKQH, k_BKSH, v_BKSH, key_ok_BS, L):
  return _blocked_core_fwd(q_ZBKQH, k_BKSH, v_BKSH, key_ok_BS, L)[0]


def _blocked_core_fwd(q_ZBKQH, k_BKSH, v_BKSH, key_ok_BS, L):
  Z, _, _, Q, _ = q_ZBKQH.shape
  G = Q // L
  outs, lses = [], []
  for i in range(Z):
    a, b = i * L, (i + 1) * L
    s_BKQS = jnp.einsum('bkqh,bksh->bkqs', q_ZBKQH[i], k_BKSH[:, :, :b],
                        preferred_element_type=jnp.float32)
    s_BKQS = jnp.where(_visible(key_ok_BS, G, a, b), s_BKQS, _MASKED)
    m_BKQ1 = jnp.max(s_BKQS, axis=-1, keepdims=True)
    e_BKQS = jnp.exp(s_BKQS - m_BKQ1)
    l_BKQ1 = jnp.sum(e_BKQS, axis=-1, keepdims=True)
    # Normalising the [Q, H] output rather than the [Q, S] weights: fewer divisions, same result.
    out_BKQH = jnp.einsum('bkqs,bksh->bkqh', e_BKQS.astype(v_BKSH.dtype), v_BKSH[:, :, :b],
                          preferred_element_type=jnp.float32) / l_BKQ1
    outs.append(out_BKQH.astype(v_BKSH.dtype))
    lses.append((m_BKQ1 + jnp.log(l_BKQ1))[..., 0])
  out_ZBKQH, lse_ZBKQ = jnp.stack(outs), jnp.stack(lses)
  return out_ZBKQH, (q_ZBKQH, k_BKSH, v_BKSH, key_ok_BS, out_ZBKQH, lse_ZBKQ)


def _blocked_core_bwd(L, residuals, dout_ZBKQH):
  q_ZBKQH, k_BKSH, v_BKSH, key_ok_BS, out_ZBKQH, lse_ZBKQ = residuals
  # Tie the recomputation to the incoming gradient: otherwise XLA may schedule every layer's
  # recomputed scores right after the forward pass, and hold them all until their layer's backward.
  q_ZBKQH, k_BKSH, lse_ZBKQ, dout_ZBKQH = jax.lax.optimization_barrier(
      (q_ZBKQH, k_BKSH, lse_ZBKQ, dout_ZBKQH))
  Z, _, _, Q, _ = q_ZBKQH.shape
  G, S = Q // L, k_BKSH.shape[2]
  # softmax backward: ds = p·(dp − Σ_s p·dp), and Σ_s p·dp = Σ_h dout·out.
  delta_ZBKQ = jnp.sum(dout_ZBKQH.astype(jnp.float32) * out_ZBKQH.astype(jnp.float32), axis=-1)
  dqs, dk_BKSH, dv_BKSH = [], jnp.zeros(k_BKSH.shape, jnp.float32), jnp.zeros(v_BKSH.shape, jnp.float32)
  for i in range(Z):
    a, b = i * L, (i + 1) * L
    q_BKQH, dout_BKQH = q_ZBKQH[i], dout_ZBKQH[i]
    lse_BK1Q, delta_BK1Q = lse_ZBKQ[i][:, :, None], delta_ZBKQ[i][:, :, None]
    k_BKbH, v_BKbH = k_BKSH[:, :, :b], v_BKSH[:, :, :b]  # b: the keys up to the block's end
    # In the transposed [S, Q] orientation, so that dv and dk (sums over the queries) are plain
    # matmuls; only dq needs ds in [Q, S], one explicit transpose. XLA:CPU ran the sums over Q of the
    # [Q, S] form as slower generic dots.
    s_BKbQ = jnp.einsum('bksh,bkqh->bksq', k_BKbH, q_BKQH, preferred_element_type=jnp.float32)
    s_BKbQ = jnp.where(jnp.swapaxes(_visible(key_ok_BS, G, a, b), -1, -2), s_BKbQ, _MASKED)
    p_BKbQ = jnp.exp(s_BKbQ - lse_BK1Q)
    dv_BKbH = jnp.einsum('bksq,bkqh->bksh', p_BKbQ.astype(dout_BKQH.dtype), dout_BKQH,
                         preferred_element_type=jnp.float32)
    dp_BKbQ = jnp.einsum('bksh,bkqh->bksq', v_BKbH, dout_BKQH, preferred_element_type=jnp.float32)
    ds_BKbQ = (p_BKbQ * (dp_BKbQ - delta_BK1Q)).astype(q_BKQH.dtype)
    dk_BKbH = jnp.einsum('bksq,bkqh->bksh', ds_BKbQ, q_BKQH, preferred_element_type=jnp.float32)
    dqs.append(jnp.einsum('bkqs,bksh->bkqh', jnp.swapaxes(ds_BKbQ, -1, -2), k_BKbH))
    # Keys [0, b) only: the sums over blocks run in float32 and XLA fuses the padded adds.
    pad = ((0, 0), (0, 0), (0, S - b), (0, 0))
    dk_BKSH, dv_BKSH = dk_BKSH + jnp.pad(dk_BKbH, pad), dv_BKSH + jnp.pad(dv_BKbH, pad)
  return jnp.stack(dqs), dk_BKSH.astype(k_BKSH.dtype), dv_BKSH.astype(v_BKSH.dtype), None


_blocked_core.defvjp(_blocked_core_fwd, _blocked_core_bwd)
