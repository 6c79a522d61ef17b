"""Preemption of a multi-host run: a SIGTERM that reaches the processes at different moments (or only
one of them) makes every process save the same step and exit 0 (train._stop_agreed)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from vesper_jax import checkpoint


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_two(workdir, cache_dir):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  procs = []
  for pid in range(2):
    args = [sys.executable, '-m', 'vesper_jax.train', '--config=configs/tiny.py', f'--workdir={workdir}',
            '--config.model.vocab_size=512', '--config.data.seq_len=32', f'--config.data.cache_dir={cache_dir}',
            '--config.train.batch_size=8', '--config.train.num_steps=5000', '--config.train.eval_every=100000',
            '--config.train.eval_tokens=256', '--config.train.sample_prompt=',
            '--config.logging.every_steps=1', '--config.logging.progress_bar=False',
            '--config.logging.tensorboard=False', '--config.checkpoint.every_steps=100000',
            f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={pid}']
    procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  return procs


def _wait_for_steps(workdir, procs, steps=3, timeout=300):
  deadline = time.time() + timeout
  metrics = workdir / 'metrics.jsonl'
  while time.time() < deadline:
    if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= steps:
      return
    for p in procs:
      if p.poll() is not None:
        raise AssertionError(f'process exited early ({p.returncode}): {p.stderr.read()[-3000:]}')
    time.sleep(0.05)
  raise AssertionError('the run did not start training in time')


@pytest.mark.slow
@pytest.mark.parametrize('who,gap', [('both', 0.2), ('process 0', 0.0)])
def test_sigterm_at_different_moments_saves_one_step_everywhere(who, gap, tmp_path):
  workdir = tmp_path / 'run'
  procs = _start_two(workdir, tmp_path / 'cache')
  try:
    _wait_for_steps(workdir, procs)
    procs[0].send_signal(signal.SIGTERM)
    if who == 'both':
      time.sleep(gap)
      procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=180) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  summary = json.loads(outputs[0][0][outputs[0][0].index('{'):])
  assert summary['stopped_by_signal'] and summary['step'] < 5000
  assert checkpoint.load_params(workdir)[0] == summary['step']
