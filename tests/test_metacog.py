"""metacog.py: the head's measures against float64 references, its inputs (hidden states, the predicted
distribution's statistics, both), the stop-gradient contract, the auxiliary loss in the train step
(gradient accumulation, FlyLoRA fine-tuning), the trained head's calibration, confidences read while
decoding, and its safetensors export (SPEC §9, §11)."""

import itertools

import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from conftest import base_run_config, short_run_config, tiny_model_config
from vesper_jax import config as base_config
from vesper_jax import export, losses, metacog, optim, sharding, train
from vesper_jax.model import ModelConfig, VesperLM, init_params
from vesper_jax.pytree import flatten


# ------------------------------------------------------------------------------------------ measures

def _ece_reference(confidence, correct, bins=15):
  """The textbook loop: for each bin [b/n, (b+1)/n) (the last one closed), |acc − conf| weighted by size."""
  total = 0.0
  for b in range(bins):
    lo, hi = b / bins, (b + 1) / bins
    inside = [(c, y) for c, y in zip(confidence, correct) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
    if inside:
      total += len(inside) / len(confidence) * abs(np.mean([y for _, y in inside]) -
                                                   np.mean([c for c, _ in inside]))
  return total


def _aurc_reference(confidence, correct):
  """Risk at every coverage k/n of the most-confident-first order, averaged; ties: the mean over every
  order of the tied tokens (brute force over permutations)."""
  confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
  values = sorted(set(confidence.tolist()), reverse=True)
  groups = [[i for i in range(len(confidence)) if confidence[i] == v] for v in values]
  orders = [sum(choice, []) for choice in itertools.product(*[list(map(list, itertools.permutations(g)))
                                                              for g in groups])]
  areas = []
  for order in orders:
    wrong = 1.0 - correct[order]
    areas.append(np.mean([wrong[:k].sum() / k for k in range(1, len(order) + 1)]))
  return float(np.mean(areas))


def _auroc_reference(score, label):
  """P(score of a positive > score of a negative) + ½·P(equal), over every pair."""
  pos = [s for s, y in zip(score, label) if y]
  neg = [s for s, y in zip(score, label) if not y]
  wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
  return wins / (len(pos) * len(neg))


@pytest.fixture
def fixed_inputs():
  rng = np.random.default_rng(0)
  confidence = rng.random(300)
  correct = (rng.random(300) < confidence).astype(np.float64)
  # Ties: a block of equal confidences on both sides, and values on bin edges and at 0 and 1.
  confidence[:40] = 0.6
  confidence[40:45] = [0.0, 1.0, 1 / 15, 2 / 15, 14 / 15]
  nll = rng.gamma(2.0, 1.5, 300)
  predicted = nll + rng.normal(0, 1.0, 300)
  predicted[:30] = 2.0  # tied predictions
  return confidence.astype(np.float32), correct, nll, predicted


def test_ece_auroc_and_correlations_equal_float64_references(fixed_inputs):
  confidence, correct, nll, predicted = fixed_inputs
  c64 = confidence.astype(np.float64)
  assert metacog.expected_calibration_error(confidence, correct) == pytest.approx(
      _ece_reference(c64, correct), abs=1e-12)
  assert metacog.auroc(confidence, correct) == pytest.approx(_auroc_reference(c64, correct), abs=1e-12)
  assert metacog.pearson(predicted, nll) == pytest.approx(np.corrcoef(predicted, nll)[0, 1], abs=1e-12)
  assert metacog.spearman(predicted, nll) == pytest.approx(scipy.stats.spearmanr(predicted, nll)[0],
                                                           abs=1e-12)
  assert metacog.brier(confidence, correct) == pytest.approx(
      sum((c - y) ** 2 for c, y in zip(c64, correct)) / len(correct), abs=1e-12)
  rc = metacog.risk_coverage(confidence, correct)
  assert rc['coverage'][-1] == 1.0 and rc['risk'][-1] == pytest.approx(1.0 - correct.mean(), abs=1e-12)
  # A perfectly calibrated predictor: every bin's accuracy equals its confidence.
  assert metacog.expected_calibration_error([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0]) == 0.0


def test_aurc_spreads_ties_over_their_orders_and_ranks_perfect_confidence_best():
  confidence = np.array([0.9, 0.7, 0.7, 0.7, 0.4, 0.4, 0.1])
  correct = np.array([1, 0, 1, 1, 0, 1, 0], np.float64)
  assert metacog.aurc(confidence, correct) == pytest.approx(_aurc_reference(confidence, correct), abs=1e-12)
  rng = np.random.default_rng(3)
  c, y = rng.random(7), (rng.random(7) < 0.5).astype(np.float64)
  assert metacog.aurc(c, y) == pytest.approx(_aurc_reference(c, y), abs=1e-12)
  rc = metacog.risk_coverage(confidence, correct, points=7)
  assert rc['coverage'] == pytest.approx([k / 7 for k in range(1, 8)])
  # Confidence that ranks every right answer first gives the lowest area; the reverse, the highest.
  y = np.array([1, 1, 1, 0, 0], np.float64)
  best, worst = metacog.aurc(np.array([5., 4, 3, 2, 1]), y), metacog.aurc(np.array([1., 2, 3, 4, 5]), y)
  assert best == pytest.approx(np.mean([0, 0, 0, 1 / 4, 2 / 5])) and worst > best
  assert np.isnan(metacog.aurc([], [])) and np.isnan(metacog.brier([], []))


def test_auroc_of_an_all_correct_batch_is_nan_with_a_warning():
  with pytest.warns(RuntimeWarning, match='AUROC is undefined'):
    assert np.isnan(metacog.auroc([0.9, 0.8, 0.7], [1, 1, 1]))
  with pytest.warns(RuntimeWarning):
    result = metacog.calibration(np.array([0.9, 0.8]), np.array([1.0, 1.0]), np.ones(2), np.array([0.1, 0.2]),
                                 np.array([0.5, 0.6]), np.array([1.0, 1.0]))
  assert np.isnan(result['metacog']['auroc']) and np.isnan(result['baselines']['max_prob']['auroc'])
  assert np.isnan(result['baselines']['entropy']['pearson'])  # constant entropy: undefined, not a crash
  assert result['metacog']['aurc'] == 0.0 and result['baselines']['max_prob']['brier'] == pytest.approx(0.205)
  assert result['metacog']['accuracy'] == 1.0 and result['metacog']['mean_confidence'] == pytest.approx(0.85)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert metacog.auroc([0.1, 0.9, 0.9], [0, 1, 0]) == 0.75  # a tie between classes counts one half


def test_token_stats_and_the_fused_per_token_outputs_agree_with_numpy(monkeypatch):
  monkeypatch.setattr(losses, 'HEAD_CHUNK_TOKENS', 6)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 8, 16)).astype(np.float32)
  kernel = rng.normal(size=(16, 40)).astype(np.float32)
  targets = rng.integers(0, 40, size=(3, 8))
  logits = x @ kernel
  targets[0, :4] = logits[0, :4].argmax(-1)  # some right answers
  stats = jax.jit(losses.token_stats)(logits, targets)
  z = logits.astype(np.float64)
  logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  p = np.exp(logp)
  np.testing.assert_allclose(stats['nll'], -np.take_along_axis(logp, targets[..., None], -1)[..., 0], rtol=1e-5)
  np.testing.assert_array_equal(stats['correct'], (z.argmax(-1) == targets).astype(np.float32))
  np.testing.assert_allclose(stats['max_prob'], p.max(-1), rtol=1e-5)
  np.testing.assert_allclose(stats['entropy'], -(p * logp).sum(-1), rtol=1e-4)
  top2 = np.sort(z, -1)[..., -2:]
  np.testing.assert_allclose(stats['margin'], top2[..., 1] - top2[..., 0], rtol=1e-5, atol=1e-5)
  for key, value in jax.jit(losses.distribution_stats)(logits).items():
    np.testing.assert_array_equal(value, stats[key], err_msg=key)
  # The fused head's per-token outputs: in the forward alone, and in the forward that the train step's
  # gradient runs (its custom_vjp's), through XLA and through the C++ kernel (forced on, as
  # test_cpu_kernels does: its results do not depend on the device count).
  from vesper_jax.kernels import cpu_kernels
  for per_token, kernel_on in itertools.product((True, 'stats'), (False, True)):
    monkeypatch.setattr(cpu_kernels, 'usable', lambda *a, on=kernel_on: on)
    fused = functools.partial(losses.head_cross_entropy_and_entropy, targets_BT=targets, per_token=per_token,
                              kernel=True)
    forward = jax.jit(lambda x_, k_: fused(x_, k_, None))(x, kernel)
    with_grads, _ = jax.vjp(lambda x_, k_: fused(x_, k_, None), x, kernel)
    for loss, _, got in (forward, with_grads):
      assert set(got) == {'nll', 'correct'} | (set(losses.DISTRIBUTION_STATS) if per_token == 'stats' else set())
      for key, value in got.items():
        np.testing.assert_allclose(value, stats[key], rtol=1e-5, atol=1e-6, err_msg=f'{key} {kernel_on}')
      assert float(loss) == pytest.approx(float(np.mean(stats['nll'])), rel=1e-5)


def test_head_loss_is_bce_plus_mse_over_real_targets():
  z = jnp.array([[0.3, -1.0, 2.0]])
  out = metacog.Outputs(z, jnp.array([[1.0, 2.0, 3.0]]))
  loss, terms = metacog.head_loss(out, jnp.array([[1.0, 0.0, 1.0]]), jnp.array([[1.5, 2.0, 0.0]]),
                                  jnp.array([[1.0, 1.0, 0.0]]))
  c = 1 / (1 + np.exp(-np.array([0.3, -1.0])))
  bce = np.mean([-np.log(c[0]), -np.log(1 - c[1])])
  mse = np.mean([0.25, 0.0])
  assert float(terms['meta_bce']) == pytest.approx(bce, rel=1e-6)
  assert float(terms['meta_mse']) == pytest.approx(mse, rel=1e-6)
  assert float(loss) == pytest.approx(bce + mse, rel=1e-6)


# ------------------------------------------------------------------------------------------ the head in the model

def test_no_parameters_without_the_head_and_its_shapes_with_it():
  plain = init_params(tiny_model_config(vocab_size=512), jax.random.key(0))
  assert metacog.NAME not in plain
  cfg = tiny_model_config(vocab_size=512, metacog=True, metacog_hidden=64, metacog_inputs='hidden')
  head = init_params(cfg, jax.random.key(0))[metacog.NAME]
  assert jax.tree.map(lambda x: x.shape, head) == {'fc1': {'kernel': (128, 64), 'bias': (64,)},
                                                    'fc2': {'kernel': (64, 2), 'bias': (2,)}}
  with pytest.raises(ValueError, match='model.metacog_hidden'):
    tiny_model_config(metacog=True, metacog_hidden=0)
  with pytest.raises(ValueError, match='model.metacog=True'):
    VesperLM(tiny_model_config(vocab_size=512)).apply({'params': plain}, jnp.zeros((1, 4), jnp.int32),
                                                      with_metacog=True)


@pytest.mark.parametrize('inputs, width', [('hidden', 128), ('stats', metacog.NUM_STATS),
                                           ('both', 128 + metacog.NUM_STATS)])
def test_the_heads_inputs_are_one_flag(inputs, width):
  cfg = tiny_model_config(vocab_size=512, metacog=True, metacog_hidden=16, metacog_inputs=inputs)
  params = init_params(cfg, jax.random.key(0))
  assert params[metacog.NAME]['fc1']['kernel'].shape == (width, 16)
  # The head the model applies (on its own logits' statistics) is the one metacog.apply gives for the
  # hidden states and the statistics a caller computed: the train step's and evaluation's way.
  params = _random_head(params)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 512)
  model = VesperLM(cfg)
  logits, meta = model.apply({'params': params}, tokens, with_metacog=True)
  again, x = model.apply({'params': params}, tokens, with_hidden=True)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))
  other = metacog.apply(cfg, params, x, losses.token_stats(logits, tokens))
  np.testing.assert_allclose(other.confidence_BT, meta.confidence_BT, rtol=1e-6)
  np.testing.assert_allclose(other.predicted_loss_BT, meta.predicted_loss_BT, rtol=1e-6)
  if inputs != 'hidden':  # the statistics matter: other logits, other confidences
    shifted = metacog.apply(cfg, params, x, losses.token_stats(2.0 * logits, tokens))
    assert not np.allclose(shifted.confidence_BT, meta.confidence_BT)
    with pytest.raises(ValueError, match='metacog_inputs'):
      metacog.apply(cfg, params, x, None)
    # With the statistics the outputs are corrections: a head whose last layer is zero answers the max
    # probability and the entropy.
    zero = {**params, metacog.NAME: {**params[metacog.NAME],
                                     'fc2': jax.tree.map(jnp.zeros_like, params[metacog.NAME]['fc2'])}}
    stats = losses.token_stats(logits, tokens)
    plain = metacog.apply(cfg, zero, x, stats)
    np.testing.assert_allclose(plain.confidence_BT, stats['max_prob'], rtol=1e-5)
    np.testing.assert_allclose(plain.predicted_loss_BT, stats['entropy'], rtol=1e-6)
  with pytest.raises(ValueError, match='model.metacog_inputs'):
    tiny_model_config(metacog=True, metacog_inputs='logits')


def _random_head(params, scale=0.3):
  """The parameters with the head's weights redrawn larger, so that its confidences differ by token."""
  keys = iter(jax.random.split(jax.random.key(11), 8))
  head = jax.tree.map(lambda w: scale * jax.random.normal(next(keys), w.shape), params[metacog.NAME])
  return {**params, metacog.NAME: head}


@pytest.mark.parametrize('inputs', ['hidden', 'both'])
def test_confidences_read_while_decoding_equal_a_full_forward_pass(inputs):
  """decode.generate(confidences=...) reads the head in the prefill and decode steps (one per new
  token, and the EOS's that ends a row); a forward pass over prompt + continuation gives the same."""
  from vesper_jax import decode, generate
  from vesper_jax.sampling import SamplingConfig
  cfg = tiny_model_config(vocab_size=512, metacog=True, metacog_hidden=32, metacog_inputs=inputs)
  params = _random_head(init_params(cfg, jax.random.key(2)))
  prompts = [[5, 9, 11, 2, 7], [3, 4]]
  sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0)
  for chunk_size, eos_id in ((1, None), (4, None), (3, 17)):
    confidences = []
    new = decode.generate(params, cfg, prompts, max_new_tokens=10, sampling=sampling, seed=4, eos_id=eos_id,
                          chunk_size=chunk_size, confidences=confidences)
    assert new == decode.generate(params, cfg, prompts, max_new_tokens=10, sampling=sampling, seed=4,
                                  eos_id=eos_id, chunk_size=chunk_size)  # the same tokens as without
    for prompt, row, conf in zip(prompts, new, confidences):
      ended = len(row) < 10  # at EOS: its confidence too
      assert len(conf) == len(row) + ended
      full = generate.token_confidences(params, cfg, prompt, row + ([eos_id] if ended else []))
      np.testing.assert_allclose(conf, full[:len(conf)], rtol=2e-5, atol=2e-6)
      assert np.std(conf) > 1e-3  # confidences that differ by token: the comparison means something
  with pytest.raises(ValueError, match='model.metacog=True'):
    decode.generate(params, tiny_model_config(vocab_size=512), prompts, max_new_tokens=2, confidences=[])


def _grads(model_config, params, tokens):
  fn = jax.jit(functools.partial(train._loss_and_grads, model=VesperLM(model_config), grad_accum_steps=1,
                                 metacog_weight=0.1))
  return fn(params, {}, tokens)


def test_stop_gradient_trunk_gradients_are_bitwise_those_without_the_head():
  # 'both': the hidden states (whose gradient metacog_trunk_gradient lets through) and the statistics.
  cfg = tiny_model_config(vocab_size=512, metacog=True, metacog_inputs='both')
  params = init_params(cfg, jax.random.key(3))
  plain_params = {k: v for k, v in params.items() if k != metacog.NAME}
  tokens = jax.random.randint(jax.random.key(4), (4, 33), 0, 512)
  loss_h, _, grads_h, _, terms = _grads(cfg, params, tokens)
  loss_p, _, grads_p, _, none = _grads(cfg.replace(metacog=False), plain_params, tokens)
  assert none == {} and float(terms['meta_loss']) > 0
  assert float(loss_h) == float(loss_p)  # the logged loss is the cross-entropy alone
  flat_h, flat_p = flatten(grads_h), flatten(grads_p)
  assert set(flat_h) - set(flat_p) == {k for k in flat_h if k[0] == metacog.NAME}
  for k, g in flat_p.items():
    np.testing.assert_array_equal(np.asarray(flat_h[k]), np.asarray(g), err_msg=str(k))
  assert all(np.any(np.asarray(flat_h[k]) != 0) for k in flat_h if k[0] == metacog.NAME)
  # With metacog_trunk_gradient the head's loss reaches the trunk.
  _, _, grads_t, _, _ = _grads(cfg.replace(metacog_trunk_gradient=True), params, tokens)
  k = ('layers_0', 'ffn', 'up_proj', 'kernel')
  assert not np.array_equal(np.asarray(flatten(grads_t)[k]), np.asarray(flat_p[k]))


def test_gradient_accumulation_with_the_head_equals_one_big_batch(tmp_path):
  config = short_run_config(tmp_path, **{'model.metacog': True})
  parts = train.build(config, sharding.make_mesh(1, 1, jax.devices()[:1]))
  step = functools.partial(train.train_step, model=parts.model, tx=parts.tx, metacog_weight=0.1,
                           schedule=optim.learning_rate_schedule(config.opt, config.train.num_steps))
  state = parts.init_fn(jax.random.key(0))
  batch = {'tokens': jax.random.randint(jax.random.key(1), (8, 17), 0, config.model.vocab_size)}
  big, m_big = jax.jit(functools.partial(step, grad_accum_steps=1))(state, batch)
  acc, m_acc = jax.jit(functools.partial(step, grad_accum_steps=4))(state, batch)
  for key in ('loss', 'meta_loss', 'meta_bce', 'meta_mse', 'grad_norm'):
    np.testing.assert_allclose(float(m_acc[key]), float(m_big[key]), rtol=2e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_config_keys_exist_and_are_checked():
  config = base_config.get_config()
  assert config.model.metacog is False and config.model.metacog_hidden == 256
  assert config.model.metacog_trunk_gradient is False and config.train.metacog_weight == 0.1
  assert config.model.metacog_inputs == 'both'  # the measured default (README, Metacognition)
  assert ModelConfig().metacog_inputs == 'hidden'  # what a model config without the key meant
  config.train.metacog_weight = -1.0
  with pytest.raises(ValueError, match='train.metacog_weight'):
    base_config.validate(config)


def test_a_run_saved_before_the_inputs_key_reads_hidden_states(tmp_path):
  """A workdir's config.json without model.metacog_inputs (an older run) meant a head on the hidden
  states: read_config gives 'hidden', not today's default; a run that names the key keeps it."""
  from vesper_jax import checkpoint
  saved = base_config.get_config().to_dict()
  del saved['model']['metacog_inputs']
  (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps(saved))
  assert checkpoint.read_config(tmp_path).model.metacog_inputs == 'hidden'
  saved['model']['metacog_inputs'] = 'stats'
  (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps(saved))
  assert checkpoint.read_config(tmp_path).model.metacog_inputs == 'stats'


# ------------------------------------------------------------------------------------------ trained

def test_a_trained_head_is_calibrated_on_held_out_text(metacog_workdir):
  """The tiny model with the head, trained briefly (conftest.metacog_workdir): on the validation split
  its mean confidence is within 0.05 of the model's top-1 accuracy, and its ECE is at most 0.05."""
  rows = [json.loads(line) for line in (metacog_workdir / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert any('meta_loss' in r and 'loss' in r for r in rows)
  evals = [r for r in rows if 'eval_ece' in r]
  assert evals and all(k in evals[-1] for k in ('eval_auroc', 'eval_loss_corr'))
  result = json.loads((metacog_workdir / 'eval.json').read_text())
  m = result['metacog']
  assert set(m) == {'ece', 'auroc', 'aurc', 'brier', 'risk_coverage', 'pearson', 'spearman',
                    'mean_confidence', 'accuracy'}
  assert set(result['baselines']) == {'max_prob', 'entropy'}
  assert set(result['baselines']['max_prob']) == {'ece', 'auroc', 'aurc', 'brier', 'risk_coverage'}
  assert set(result['baselines']['entropy']) == {'aurc', 'risk_coverage', 'pearson', 'spearman'}
  for block in (m, *result['baselines'].values()):  # the curve ends at full coverage: the error rate
    rc = block['risk_coverage']
    assert rc['coverage'][-1] == 1.0 and rc['risk'][-1] == pytest.approx(1.0 - m['accuracy'], abs=1e-9)
    assert 0.0 <= block['aurc'] <= 1.0
  assert 0.0 < m['brier'] < 0.25 and 0.0 < result['baselines']['max_prob']['brier'] < 0.25
  assert 0.05 < m['accuracy'] < 0.95  # a model that is sometimes right
  assert abs(m['mean_confidence'] - m['accuracy']) <= 0.05, m
  assert m['ece'] <= 0.05, m
  assert m['auroc'] > 0.6 and m['pearson'] > 0.2, m  # it tells right from wrong better than chance
  printed = (metacog_workdir / 'eval.txt').read_text()
  assert '| metacog head |' in printed and '| max softmax probability |' in printed and 'AURC' in printed


def test_regulated_prompts_run_as_a_batch_with_confidences_read_while_decoding(metacog_workdir, monkeypatch):
  """regulate_batch decodes every prompt's candidate i in one batch, and scores it with the confidences
  the decode steps returned: no second forward pass (token_confidences is never called), the same
  values that one would give."""
  from vesper_jax import checkpoint, generate
  from vesper_jax.sampling import SamplingConfig
  config, params, tokenizer = checkpoint.load_for_inference(metacog_workdir / 'run')
  prompts = ['def ', 'The ']
  full_pass = generate.token_confidences
  monkeypatch.setattr(generate, 'token_confidences', lambda *a, **k: pytest.fail('a second forward pass'))
  seen = []
  results = generate.regulate_batch(
      params, config, tokenizer, prompts, max_new_tokens=8, seed=5,
      sampling=SamplingConfig(temperature=1.0, top_k=0, top_p=1.0),
      regulator=generate.RegulatorConfig(candidates=2, confidence_threshold=1.0, flag_below=0.0),
      on_candidate=lambda r, i, c: seen.append((r, i)))
  assert seen == [(0, 0), (1, 0), (0, 1), (1, 1)]  # round by round, the prompts together
  for prompt, result in zip(prompts, results):
    assert len(result.candidates) == 2 and not result.stopped_early
    assert result.score == max(c.score for c in result.candidates)
    for c in result.candidates:
      if c.token_ids:
        want = full_pass(params, config, tokenizer.encode(prompt), c.token_ids)
        np.testing.assert_allclose(c.confidences, want, rtol=2e-5, atol=2e-6)


def test_flylora_finetuning_trains_the_head_with_the_adapters(base_workdir):
  root = base_workdir
  config = base_run_config(root, **{'train.init_from': str(root / 'base'), 'train.num_steps': 3,
                                    'data.tokenizer': str(root / 'base' / 'tokenizer.json'),
                                    'model.lora_targets': 'gate,up', 'model.metacog': True,
                                    'opt.learning_rate': 1e-2})
  parts = train.build(config, sharding.make_mesh(2, 2))
  trainable = flatten(parts.trainable)
  assert all(trainable[k] for k in trainable if k[0] == metacog.NAME)
  assert not trainable[('layers_0', 'ffn', 'up_proj', 'kernel')]
  summary = train.train_and_evaluate(config, root / 'ft_metacog')
  assert summary['step'] == 3
  from vesper_jax import checkpoint
  _, tuned = checkpoint.load_params(root / 'ft_metacog')
  _, base = checkpoint.load_params(root / 'base')
  flat_t, flat_b = flatten(tuned), flatten(base)
  for k, v in flat_b.items():  # the base stays frozen
    np.testing.assert_array_equal(np.asarray(flat_t[k]), np.asarray(v), err_msg=str(k))
  init = flatten(parts.init_fn(jax.random.key(config.train.seed)).params)
  assert not np.array_equal(np.asarray(flat_t[('metacog', 'fc1', 'kernel')]),
                            np.asarray(init[('metacog', 'fc1', 'kernel')]))


# ------------------------------------------------------------------------------------------ export

def test_export_round_trip_with_the_head_and_refusals_by_name(tmp_path, caplog):
  cfg = tiny_model_config(metacog=True, metacog_hidden=32, metacog_inputs='hidden')
  params = init_params(cfg, jax.random.key(5))
  path = tmp_path / 'with_head.safetensors'
  shapes = export.save_safetensors(params, cfg, path)
  assert shapes['metacog.fc1.weight'] == (32, 128) and shapes['metacog.fc2.weight'] == (2, 32)
  assert shapes['metacog.fc1.bias'] == (32,) and shapes['metacog.fc2.bias'] == (2,)
  loaded = export.load_safetensors(path)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  plain = tiny_model_config()
  with pytest.raises(ValueError, match='unexpected tensor metacog.fc1.weight'):
    export.load_safetensors(path, plain)
  plain_path = tmp_path / 'plain.safetensors'
  export.save_safetensors(init_params(plain, jax.random.key(5)), plain, plain_path)
  assert metacog.NAME not in export.load_safetensors(plain_path, plain)
  with pytest.raises(ValueError, match='missing tensor metacog.fc1.weight'):
    export.load_safetensors(plain_path, cfg)
  # The file carries what the head reads (its model config); a file written before the key existed
  # (no metacog_inputs in its config) is a head on the hidden states.
  both = cfg.replace(metacog_inputs='both')
  both_path = tmp_path / 'both.safetensors'
  assert export.save_safetensors(init_params(both, jax.random.key(5)), both, both_path)[
      'metacog.fc1.weight'] == (32, 128 + metacog.NUM_STATS)
  assert export.config_from_safetensors(both_path).metacog_inputs == 'both'
  with pytest.raises(ValueError, match='metacog.fc1.weight'):
    export.load_safetensors(both_path, cfg)  # a hidden-states head cannot take the file's weights
  metadata, tensors = export.read_safetensors(path)
  old = json.loads(metadata['model_config'])
  del old['metacog_inputs']
  export.write_safetensors(tensors, tmp_path / 'old.safetensors', {**metadata, 'model_config': json.dumps(old)})
  assert export.config_from_safetensors(tmp_path / 'old.safetensors').metacog_inputs == 'hidden'
  export.load_safetensors(tmp_path / 'old.safetensors')
  # The Hugging Face layout has no place for the head: left out, and said.
  llama = tiny_model_config(metacog=True, norm='rmsnorm', activation='silu')
  hf = export.to_hf_tensors(init_params(llama, jax.random.key(0)), llama)
  assert not any('metacog' in k for k in hf)
  assert 'leaves out the metacognition head' in caplog.text


def test_the_logits_path_gives_the_fused_paths_loss_terms_and_gradients():
  """Off CPU the train step materialises the logits (losses.token_stats) instead of the fused head's
  per-token outputs: both give the same head loss and gradients."""
  cfg = tiny_model_config(vocab_size=512, metacog=True, platform='cpu')
  params = init_params(cfg, jax.random.key(6))
  tokens = jax.random.randint(jax.random.key(7), (4, 17), 0, 512)
  fused = _grads(cfg, params, tokens)
  logits = _grads(cfg.replace(platform='gpu'), params, tokens)  # the GPU's choices, run on the CPU
  np.testing.assert_allclose(float(logits[0]), float(fused[0]), rtol=1e-6)
  for key in ('meta_loss', 'meta_bce', 'meta_mse'):
    np.testing.assert_allclose(float(logits[4][key]), float(fused[4][key]), rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(logits[2]), jax.tree.leaves(fused[2])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_a_head_is_added_in_finetuning_or_a_bases_head_left_behind(tmp_path, caplog):
  from vesper_jax import finetune
  with_head = tiny_model_config(metacog=True, metacog_hidden=16)
  assert with_head.metacog_inputs == 'both'
  plain = tiny_model_config()
  base = init_params(plain, jax.random.key(8))
  fresh = init_params(with_head, jax.random.key(9))
  grafted = flatten(finetune.graft(fresh, base))
  for k, v in flatten(base).items():  # the base's weights...
    np.testing.assert_array_equal(np.asarray(grafted[k]), np.asarray(v))
  for k, v in flatten(fresh).items():  # ...and the new model's freshly initialised head
    if k[0] == metacog.NAME:
      np.testing.assert_array_equal(np.asarray(grafted[k]), np.asarray(v))
  path = tmp_path / 'base_with_head.safetensors'
  export.save_safetensors(fresh, with_head, path)
  loaded = finetune.load_base(str(path), plain)  # fine-tuning without a head: the base's head stays behind
  assert metacog.NAME not in loaded and 'left behind' in caplog.text
  assert metacog.NAME in finetune.load_base(str(path), with_head)  # with the same head: it is kept
  caplog.clear()  # a head that reads other inputs cannot take the base's head: left behind, and said
  assert metacog.NAME not in finetune.load_base(str(path), with_head.replace(metacog_inputs='hidden'))
  assert "model.metacog_inputs='hidden'" in caplog.text
