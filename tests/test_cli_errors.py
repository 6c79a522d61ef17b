"""Every entry point turns a bad invocation into one line naming the flag, key or path — no traceback.

Exit status 2 for usage errors (a flag's type or range, an unknown flag or config key), 1 for bad input
(a config value, a missing or broken file). The cases run in subprocesses, as a person would type them.
"""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def _cases(run, tmp):
  tiny = 'configs/tiny.py'
  empty = tmp / 'empty'
  empty.mkdir(exist_ok=True)
  bad_json = tmp / 'bad.json'
  bad_json.write_text('{not json')
  broken_export = tmp / 'broken_export'  # an export whose weights file is torn
  broken_export.mkdir(exist_ok=True)
  (broken_export / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
  shutil.copyfile(run / 'tokenizer.json', broken_export / 'tokenizer.json')
  bad_tokenizer = tmp / 'bad_tokenizer'  # a workdir whose tokenizer.json is not one
  shutil.copytree(run, bad_tokenizer, dirs_exist_ok=True)
  (bad_tokenizer / 'tokenizer.json').write_text('{"version": "nope"}')
  # (entry point, arguments, exit status, text the message must contain)
  return [
      ('train', [f'--config={tiny}', '--config.train.num_steps=abc'], 2, 'config.train.num_steps'),
      ('train', [f'--config={tiny}', '--config.train.bogus_key=1'], 2, 'bogus_key'),
      ('train', [f'--config={tiny}', '--config.opt.name=sgd'], 1, 'opt.name'),
      ('train', [f'--config={tiny}', '--config.opt.kernel=cuda'], 1, 'opt.kernel'),
      ('train', [f'--config={tiny}', '--config.opt.learning_rate=-0.1'], 1, 'opt.learning_rate'),
      ('train', [f'--config={tiny}', '--config.train.max_nonfinite_steps=0'], 1, 'train.max_nonfinite_steps'),
      ('train', [f'--config={tiny}', '--config.train.mesh_fsdp=3'], 1, 'train.mesh_fsdp'),
      ('train', [f'--config={tiny}', '--config.data.on_error=ignore'], 1, 'data.on_error'),
      ('train', [f'--config={tiny}', '--config.model.activation=relu'], 1, 'model.activation'),
      ('train', [f'--config={tiny}', f'--config.train.init_from={tmp / "missing"}'], 1, 'train.init_from'),
      ('train', [f'--config={tiny}', '--config.data.sources=/nonexistent/corpus.txt',
                 f'--config.data.cache_dir={tmp / "cache"}'], 1, '/nonexistent/corpus.txt'),
      ('generate', [f'--workdir={run}', '--temperature=nan'], 2, 'temperature'),
      ('generate', [f'--workdir={run}', '--repetition_penalty=nan'], 2, 'repetition_penalty'),
      ('generate', [f'--workdir={run}', '--top_p=0'], 2, 'top_p'),
      ('generate', [f'--workdir={run}', '--max_new_tokens=0'], 2, 'max_new_tokens'),
      ('generate', [f'--workdir={run}', '--chunk_size=0'], 2, 'chunk_size'),
      ('generate', [f'--workdir={run}', '--regulate', '--candidates=0'], 2, 'candidates'),
      ('generate', [f'--workdir={run}', '--regulate', '--confidence_threshold=1.5'], 2, 'confidence_threshold'),
      ('chat', [f'--workdir={run}', '--regulate', '--flag_below=-0.1'], 2, 'flag_below'),
      ('generate', [f'--workdir={run}', '--regulate'], 1, 'model.metacog'),
      ('train', [f'--config={tiny}', '--config.model.metacog_hidden=0'], 1, 'model.metacog_hidden'),
      ('generate', [f'--workdir={tmp / "missing"}'], 1, str(tmp / 'missing')),
      ('generate', [f'--workdir={empty}'], 1, str(empty)),
      ('chat', [f'--workdir={run}', '--max_new_tokens=0'], 2, 'max_new_tokens'),
      ('chat', [f'--workdir={tmp / "missing"}'], 1, str(tmp / 'missing')),
      ('export', [f'--workdir={tmp / "missing"}', f'--out={tmp / "out"}'], 1, str(tmp / 'missing')),
      ('export', [f'--workdir={run}', f'--out={tmp / "out"}', '--format=onnx'], 2, 'format'),
      ('evaluate', [f'--workdir={run}', '--max_tokens=-1'], 2, 'max_tokens'),
      ('evaluate', [f'--workdir={tmp / "missing"}'], 1, str(tmp / 'missing')),
      ('prepare', [f'--config={tiny}', '--config.data.sources=/nonexistent/corpus.txt',
                   f'--config.data.cache_dir={tmp / "cache"}'], 1, '/nonexistent/corpus.txt'),
      ('prepare', ['--download=nope'], 2, 'download'),
      ('scale', [], 2, '--tokens'),
      ('scale', ['--tokens=abc'], 2, 'tokens'),
      ('generate', [f'--workdir={run}', 'stray'], 2, 'stray'),
      ('train', [f'--config={bad_json}'], 1, str(bad_json)),
      ('evaluate', [f'--workdir={broken_export}'], 1, str(broken_export / 'model.safetensors')),
      ('generate', [f'--workdir={bad_tokenizer}'], 1, str(bad_tokenizer / 'tokenizer.json')),
      ('export', [f'--workdir={bad_tokenizer}', f'--out={tmp / "out2"}'], 1,
       str(bad_tokenizer / 'tokenizer.json')),
      ('train', [f'--config={tiny}', f'--config.train.init_from={broken_export / "model.safetensors"}',
                 f'--config.data.tokenizer={run / "tokenizer.json"}', '--config.model.vocab_size=512',
                 f'--config.data.cache_dir={tmp / "cache"}', f'--workdir={tmp / "ft"}'], 1,
       str(broken_export / 'model.safetensors')),
  ]


NUM_CASES = 39


def test_at_least_thirty_cases(inference_workdir, tmp_path):
  assert len(_cases(inference_workdir, tmp_path)) == NUM_CASES >= 30


@pytest.mark.parametrize('index', range(NUM_CASES))
def test_bad_invocation_is_one_line(index, inference_workdir, tmp_path):
  entry, args, status, needle = _cases(inference_workdir, tmp_path)[index]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', f'vesper_jax.{entry}', *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert out.returncode == status, (entry, args, out.returncode, out.stderr[-2000:])
  assert needle in out.stderr, (entry, args, out.stderr[-2000:])
  assert f'vesper_jax.{entry}: error:' in out.stderr or 'FATAL Flags parsing error' in out.stderr
