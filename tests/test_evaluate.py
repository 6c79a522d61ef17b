"""evaluate.py: every target scored once, the logged validation loss equals the entry point's, the CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, short_run_config
from vesper_jax import config as base_config
from vesper_jax import data, evaluate, export, train


def test_eval_batches_score_every_target_exactly_once():
  tokens = np.arange(1, 102, dtype=np.uint16)  # 101 tokens: 100 targets
  for seq_len, batch_size, budget in ((8, 3, 0), (7, 4, 0), (8, 3, 37), (128, 2, 0)):
    want = 100 if budget == 0 else budget
    seen = []
    for i in range(data.num_eval_batches(tokens, seq_len=seq_len, batch_size=batch_size, max_tokens=budget)):
      tokens_BT1, weights_BT = data.eval_batch(tokens, index=i, batch_size=batch_size, seq_len=seq_len,
                                               max_tokens=budget)
      assert tokens_BT1.shape == (batch_size, seq_len + 1) and weights_BT.shape == (batch_size, seq_len)
      # A scored target is the token after its input: ids here are positions + 1.
      scored = tokens_BT1[:, 1:][weights_BT > 0]
      assert np.all(tokens_BT1[:, :-1][weights_BT > 0] + 1 == scored)
      seen += scored.tolist()
    assert sorted(seen) == list(range(2, want + 2)), (seq_len, batch_size, budget)


def test_eval_batch_rows_split_over_processes():
  tokens = np.arange(200, dtype=np.uint16)
  whole = data.eval_batch(tokens, index=1, batch_size=4, seq_len=10)
  parts = [data.eval_batch(tokens, index=1, batch_size=4, seq_len=10, process_index=p, process_count=2)
           for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole[0])
  np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole[1])


def test_score_is_the_weighted_mean_of_step_outputs():
  tokens = np.arange(50, dtype=np.uint16)
  calls = []

  def step(batch):  # a fake model: the "loss" of a target is its id, so the mean is known
    calls.append(batch)
    return float(np.sum(batch['tokens'][:, 1:] * batch['weights'])), float(np.sum(batch['weights']))

  result = evaluate.score(step, tokens, seq_len=6, batch_size=2)
  assert result['tokens'] == 49
  assert result['loss'] == pytest.approx(np.mean(np.arange(1, 50)))
  assert len(calls) == math.ceil(math.ceil(49 / 6) / 2)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A 20-step tiny run whose validation split is larger than the eval budget of one case below."""
  root = tmp_path_factory.mktemp('evaluate')
  # The base config's evaluation budget (the whole split here), not the short run's 512 targets.
  config = short_run_config(root / 'cache', **{'train.num_steps': 20,
                                                'train.eval_tokens': base_config.get_config().train.eval_tokens})
  summary = train.train_and_evaluate(config, root / 'run')
  return root, config, summary


def test_logged_validation_loss_equals_evaluate(trained):
  root, config, summary = trained
  cache = data.build_or_load_cache(config.data, config.model.vocab_size, progress=False)
  assert summary['eval_tokens'] == len(cache.val) - 1  # the whole split (under the default budget)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', 'vesper_jax.evaluate', f'--workdir={root / "run"}',
                        f'--json={root / "eval.json"}'], cwd=REPO, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads((root / 'eval.json').read_text())
  assert result['tokens'] == summary['eval_tokens']
  assert abs(result['loss'] - summary['eval_loss']) <= 1e-5
  assert 0 < result['bits_per_byte'] < result['loss'] / math.log(2)  # a token holds more than one byte
  assert '| val split |' in out.stdout


def test_bits_per_byte_by_hand(trained):
  root, config, _ = trained
  cache = data.build_or_load_cache(config.data, config.model.vocab_size, progress=False)
  text = cache.tokenizer.decode(np.asarray(cache.val[1:101]))
  assert evaluate.bits_per_byte(2.0, cache.val, 100, cache.tokenizer) == pytest.approx(
      2.0 * 100 / math.log(2) / len(text.encode('utf-8')))


def test_evaluate_an_export_on_a_new_corpus_with_a_budget(trained, tmp_path):
  root, _, _ = trained
  export.export_workdir(root / 'run', tmp_path / 'export', 'vesper')
  corpus = tmp_path / 'new.txt'
  corpus.write_text('An entirely new text, read with the same readers. ' * 40)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', 'vesper_jax.evaluate', f'--workdir={tmp_path / "export"}',
                        f'--data={corpus}', '--max_tokens=100', f'--json={tmp_path / "e.json"}'],
                       cwd=REPO, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads((tmp_path / 'e.json').read_text())
  assert result['tokens'] == 100 and math.isfinite(result['loss'])


def test_evaluate_cli_bad_workdir_is_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', 'vesper_jax.evaluate', f'--workdir={tmp_path / "nothing"}'],
                       cwd=REPO, env=env, capture_output=True, text=True)
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert f'vesper_jax.evaluate: error: {tmp_path / "nothing"}' in out.stderr
