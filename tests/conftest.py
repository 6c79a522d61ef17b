"""Shared test fixtures and helpers. Tests run on CPU; 8 host devices are simulated for the sharding tests.

Helpers (import them: `from conftest import tiny_model_config`):
  load_config(name)              configs/<name>.py's get_config()
  tiny_model_config(**changes)   the tiny config's ModelConfig, with changes
  tiny_model(**changes)          (that config, its initialised parameters), cached
  max_rel(a, b)                  largest per-leaf max|a − b| / max|b| of two trees
  random_adapters(params)        params with random adapter B (and d), so the adapters change the output
  naive_greedy(...)              greedy tokens without a KV cache (the reference for decoding)
  decode_stepwise(...)           logits of a prompt then one token per call through the KV cache
  short_run_config(cache_dir)    a seconds-long training run (config.short_run plus the tests' sizes)
  make_workdir(path)             a workdir as training leaves it (untrained), for generate/chat/export
Test data (paths into tests/data, in the repository): TINYSHAKESPEARE, TINYSTORIES, MISERABLES, PIAF,
FRENCH_TOKENIZER.
Fixtures: serve (loopback HTTP servers for download tests), inference_workdir (one make_workdir per
session), base_workdir (a briefly pretrained base for the fine-tuning tests, one per session).
"""

import functools
import http.server
import os
import pathlib
import threading

# Must be set before jax is imported anywhere: simulate 8 CPU devices so sharding tests can run.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
# Excerpts of real corpora and a small French tokenizer, part of the repository (tests/data/README.md:
# what each is cut from, and its licence; tests/data/make_fixtures.py rebuilds them).
TEST_DATA = REPO / 'tests' / 'data'
TINYSHAKESPEARE = TEST_DATA / 'tinyshakespeare_head.txt'  # English plays: one document
TINYSTORIES = TEST_DATA / 'tinystories_head.txt'          # 120 English stories separated by <|endoftext|>
MISERABLES = TEST_DATA / 'les_miserables_fr_head.txt'     # French prose
PIAF = TEST_DATA / 'piaf_excerpt.json'                    # French question answering, SQuAD format
FRENCH_TOKENIZER = TEST_DATA / 'tokenizer_fr.json'        # SentencePiece-style BPE shaped like BARThez's


class ServedURL(str):
  """The base URL of a loopback HTTP server; `.requested` lists the paths asked of it so far."""
  requested: list[str]


@pytest.fixture
def serve():
  """serve(directory) -> the ServedURL of a loopback HTTP server for it (shut down after the test)."""
  servers = []

  def start(directory) -> ServedURL:
    requested = []

    class Handler(http.server.SimpleHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_GET(self):
        requested.append(self.path)
        super().do_GET()

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
    url = ServedURL(f'http://127.0.0.1:{server.server_address[1]}')
    url.requested = requested
    return url

  yield start
  for server in servers:
    server.shutdown()
    server.server_close()


def load_config(name: str):
  """configs/<name>.py's get_config(), loaded by path as the train entry point does."""
  from vesper_jax import config as base_config
  return base_config.load_config_file(REPO / 'configs' / f'{name}.py')


# ------------------------------------------------------------------------------------------ models

def tiny_model_config(**changes):
  """The ModelConfig of configs/tiny.py (2 layers, d_model 128, d_ff 384, vocab 4096), with changes."""
  from vesper_jax.model import ModelConfig
  return ModelConfig(**load_config('tiny').model).replace(**changes)


@functools.lru_cache(maxsize=None)
def tiny_model(**changes):
  """(tiny_model_config(**changes), its parameters from key 1). Cached: treat the parameters as read-only."""
  import jax
  from vesper_jax.model import init_params
  config = tiny_model_config(**changes)
  return config, init_params(config, jax.random.key(1))


def max_rel(a_tree, b_tree) -> float:
  """Largest per-leaf max|a − b| / max|b|."""
  import jax
  import jax.numpy as jnp
  errs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30)),
                      a_tree, b_tree)
  return max(jax.tree.leaves(errs))


def random_adapters(params, seed: int = 0, scale: float = 0.05):
  """params with every adapter's B (and FlyLoRA's d) drawn at random, so the adapters do something."""
  import jax
  from vesper_jax.pytree import flatten, unflatten
  flat = flatten(params)
  keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
  for k, v in flat.items():
    key = next(keys)
    if k[-1] == 'lora_b':
      flat[k] = scale * jax.random.normal(key, v.shape)
    elif k[-1] == 'expert_bias':
      flat[k] = 0.1 * jax.random.normal(key, v.shape)
  return unflatten(flat)


def naive_greedy(config, params, prompt: list[int], n: int) -> list[int]:
  """Greedy decoding without a cache: every new token recomputes the whole sequence from scratch."""
  import jax
  import numpy as np
  from vesper_jax.model import VesperLM
  forward = jax.jit(lambda p, t: VesperLM(config).apply({'params': p}, t))
  buf = np.zeros((1, len(prompt) + n), np.int32)  # one shape, one compilation
  buf[0, :len(prompt)] = prompt
  for t in range(len(prompt), len(prompt) + n):
    # Causal: the zeros after position t cannot change the logits at t - 1.
    buf[0, t] = int(np.argmax(np.asarray(forward(params, buf))[0, t - 1]))
  return buf[0, len(prompt):].tolist()


def decode_stepwise(config, params, tokens_BT, prompt_len: int):
  """Logits of tokens_BT computed as decoding does: the first prompt_len tokens in one call through the
  KV cache, then one token per call. Comparable with the full forward pass's logits."""
  import jax
  import jax.numpy as jnp
  from vesper_jax.model import VesperLM, init_cache
  B, T = tokens_BT.shape
  model = VesperLM(config.replace(decode=True))
  cache = init_cache(config, B, T + 4)
  positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  step = jax.jit(lambda c, tok, pos: model.apply({'params': params, 'cache': c}, tok, positions_BT=pos,
                                                 mutable=['cache']))
  logits, variables = step(cache, tokens_BT[:, :prompt_len], positions_BT[:, :prompt_len])
  outs = [logits]
  for t in range(prompt_len, T):
    logits, variables = step(variables['cache'], tokens_BT[:, t:t + 1], positions_BT[:, t:t + 1])
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


# ------------------------------------------------------------------------------------------ training

def short_run_config(cache_dir, **overrides):
  """A seconds-long tiny training run: vocab 512, 32-token windows, batch 8, 5 steps, a warmup of 2,
  a log line every step, 512 validation targets (two batches of windows) per evaluation, evaluation and
  checkpoint only at the start/end.

  Built on `config.short_run(config, 5, evaluations=0)` (what the experiments use); the cadences are
  then pinned (eval_every, checkpoint.every_steps = 1000) so a test that overrides train.num_steps still
  evaluates and checkpoints only at the end unless it asks for more.

  Args:
    cache_dir: the token cache directory (share one per module so the corpus is tokenized once).
    **overrides: 'section.key' → value, e.g. short_run_config(d, **{'train.num_steps': 20}).
  """
  from vesper_jax import config as base_config
  config = base_config.short_run(load_config('tiny'), 5, evaluations=0)
  config.model.vocab_size = 512
  config.data.seq_len = 32
  config.data.cache_dir = str(cache_dir)
  config.train.batch_size = 8
  config.train.eval_every = 1000
  config.train.eval_tokens = 2 * 8 * 32
  config.opt.warmup_steps = 2
  config.checkpoint.every_steps = 1000
  config.logging.every_steps = 1
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


# ------------------------------------------------------------------------------------------ workdirs

CORPUS = ('The quick brown fox jumps over the lazy dog. User: hello there\nAssistant: hi, how are you?\n'
          'A small language model reads the text one token at a time. ') * 30


def make_workdir(workdir: pathlib.Path, **model_overrides) -> pathlib.Path:
  """A workdir as training leaves it (config.json, tokenizer.json, an orbax checkpoint), untrained."""
  import jax
  from vesper_jax import checkpoint
  from vesper_jax.model import ModelConfig, init_params
  from vesper_jax.tokenizer import train_bpe
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer = train_bpe([CORPUS], 400, workdir / 'bpe.json')
  config = load_config('tiny')
  config.model.vocab_size = tokenizer.vocab_size
  config.model.update(model_overrides)
  checkpoint.write_workdir_metadata(workdir, config, workdir / 'bpe.json')
  params = init_params(ModelConfig(**config.model), jax.random.key(0))
  checkpointer = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
  checkpointer.save(0, {'params': params})
  checkpointer.close()
  return workdir


@pytest.fixture(scope='session')
def inference_workdir(tmp_path_factory) -> pathlib.Path:
  """One untrained workdir (make_workdir) shared by the generate, chat and export tests."""
  return make_workdir(tmp_path_factory.mktemp('run'))


def base_run_config(root: pathlib.Path, **overrides):
  """short_run_config over a 2×2 mesh (a partitioned optimizer state, sharded), caching under root/cache."""
  return short_run_config(root / 'cache', **{'train.eval_tokens': 8 * 32, 'train.mesh_data': 2,
                                             'train.mesh_fsdp': 2, 'logging.every_steps': 5,
                                             **overrides})


@pytest.fixture(scope='session')
def base_workdir(tmp_path_factory) -> pathlib.Path:
  """A root directory holding `base/`, a briefly pretrained tiny model, and `cache/`, its token cache.

  Shared by the fine-tuning tests (test_finetune.py, test_flylora.py): fine-tune with
  base_run_config(root, **{'train.init_from': str(root / 'base'), ...}).
  """
  from vesper_jax import train
  root = tmp_path_factory.mktemp('base')
  train.train_and_evaluate(base_run_config(root), root / 'base')
  return root


@pytest.fixture(scope='session')
def metacog_workdir(tmp_path_factory) -> pathlib.Path:
  """A root holding `run/`, the tiny model with the metacognition head trained 150 steps, and
  `eval.json`, `python -m vesper_jax.evaluate --json` on its validation split (shared by the metacog,
  generate and chat tests)."""
  import subprocess
  import sys
  from vesper_jax import train
  root = tmp_path_factory.mktemp('metacog')
  config = short_run_config(root / 'cache', **{'train.num_steps': 150, 'model.metacog': True,
                                                'train.eval_tokens': 0, 'logging.every_steps': 10,
                                                'train.eval_every': 150, 'data.seq_len': 64})
  train.train_and_evaluate(config, root / 'run')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', 'vesper_jax.evaluate', f'--workdir={root / "run"}',
                        f'--json={root / "eval.json"}'], cwd=REPO, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  (root / 'eval.txt').write_text(out.stdout)
  return root
