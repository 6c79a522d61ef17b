"""The base configuration every file in configs/ starts from.

`get_config()` returns the full ConfigDict that `python -m vesper_jax.train` reads. Each key is read by
the code (no `.get(key, default)` anywhere): override on the command line with `--config.a.b=value`.
Size variants (configs/tiny.py ... large.py) call this and override the `model` section and the budget.
`validate(config)` checks a whole config before any data work or compilation, naming the bad key.
"""

import importlib.util
import pathlib

import ml_collections
from ml_collections import config_dict

# configs/ beside the package in a source checkout (configs are files the user edits, not package data).
CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'


def load_config_file(name_or_path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """get_config() of a config file, given its path or a name under configs/ ('tiny', 'medium', ...)."""
  path = pathlib.Path(name_or_path)
  if path.suffix != '.py':
    path = CONFIGS_DIR / f'{name_or_path}.py'
  if not path.is_file():
    raise FileNotFoundError(f'{path}: config file not found')
  spec = importlib.util.spec_from_file_location(f'vesper_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def short_run(config: ml_collections.ConfigDict, num_steps: int, *,
              evaluations: int = 8) -> ml_collections.ConfigDict:
  """Overrides `config` (in place, and returns it) for a short run that is read afterwards, not watched.

  Used by the experiments and the tests: `num_steps` steps with a warmup of at most a tenth of them,
  about `evaluations` evaluations (0 = only at the start and the end), ~40 log lines, one checkpoint at
  the end written synchronously, and no progress bar, TensorBoard or text sample.
  """
  config.train.num_steps = num_steps
  config.train.eval_every = max(1, num_steps // evaluations) if evaluations else num_steps
  config.train.sample_prompt = ''
  config.opt.warmup_steps = max(1, min(config.opt.warmup_steps, num_steps // 10))
  config.logging.every_steps = max(1, num_steps // 40)
  config.logging.tensorboard = False
  config.logging.progress_bar = False
  config.checkpoint.every_steps = num_steps
  config.checkpoint.async_save = False
  return config


# Long on purpose: one key per line with its comment, section by section, so the whole configuration
# reads in one place (the nanodo / Flax-examples convention); splitting it would scatter the keys.
def get_config() -> ml_collections.ConfigDict:
  """The shared base: the tiny model on the built-in corpus, AdamW, a short CPU-sized run."""
  config = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- model (→ model.ModelConfig)
  config.model = ml_collections.ConfigDict()
  config.model.vocab_size = 4096        # model vocabulary; a trained BPE gets exactly this many tokens
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.num_kv_heads = config_dict.placeholder(int)  # None = num_heads; fewer = grouped-query
  config.model.d_model = 128
  config.model.d_ff = 384
  config.model.max_seq_len = 256        # longest context (training windows and generation)
  config.model.norm = 'layernorm'       # 'layernorm' | 'rmsnorm'
  config.model.norm_eps = 1e-6
  config.model.activation = 'era'       # 'era' | 'silu' | 'gelu'
  config.model.era_temperature = 1.0    # ERA's T
  config.model.era_entropy_weight = 0.1  # ERA's λ (0 with T=1 is SiLU)
  config.model.era_detach_entropy = False  # stop the gradient through ERA's entropy term
  config.model.use_bias = False         # biases in projections and norms
  config.model.tie_embeddings = False   # share the embedding matrix with the output head
  config.model.rope_theta = 10000.0
  config.model.dtype = 'float32'        # compute dtype ('bfloat16' on GPU); parameters stay float32
  config.model.remat = False            # rematerialise blocks in the backward pass (saves memory)
  config.model.attention_impl = config_dict.placeholder(str)  # None = auto, 'xla' or 'cudnn'
  # FlyLoRA adapters (SPEC §5, flylora.py); configs/flylora_finetune.py turns them on.
  config.model.lora_targets = ''        # comma-separated among q,k,v,o,gate,up,down; '' = no adapters
  config.model.lora_mode = 'flylora'    # 'flylora' (frozen sparse routed A) | 'lora' (dense trainable A)
  config.model.lora_rank = 32           # r
  config.model.lora_k = 8               # ranks active per token (FlyLoRA's top-k)
  config.model.lora_rho = config_dict.placeholder(float)    # A's column density; None = lora_k/lora_rank
  config.model.lora_alpha = config_dict.placeholder(float)  # adapter scale alpha/r; None = 2·r
  config.model.lora_bias_rate = 1e-3    # u in the expert-bias rule d_i += u·sign(mean(c) − c_i)
  config.model.lora_seed = 0            # A is generated from this seed and each layer's path
  # Metacognition head (SPEC §9, metacog.py): per-token confidence and predicted loss; off = no parameters.
  config.model.metacog = False          # add the head (trained with weight train.metacog_weight)
  config.model.metacog_hidden = 256     # the head's hidden width: d_model → metacog_hidden → 2
  config.model.metacog_trunk_gradient = False  # let the head's loss reach the trunk (default: stop-gradient)
  config.model.metacog_inputs = 'both'  # what the head reads: 'hidden' (final hidden states), 'stats' (max
                                        # probability, entropy, top-1/top-2 margin) or 'both'; README says why

  # ---------------------------------------------------------------- data (→ data.py, tokenizer.py)
  config.data = ml_collections.ConfigDict()
  config.data.sources = 'builtin:pydoc'  # comma-separated files, globs, dirs, builtin:pydoc, download:NAME,
                                         # hf://datasets/OWNER/NAME[@REV]/GLOB (Hub files, HF_TOKEN if gated)
  config.data.tokenizer = ''            # a tokenizer.json path or hf://OWNER/NAME[@REV]/tokenizer.json;
                                        # '' trains a byte-level BPE on the corpus
  config.data.eos_token = ''            # the tokenizer's end-of-text token; '' = found from its specials
  config.data.seq_len = 128             # tokens per training window (each window reads seq_len + 1)
  config.data.doc_separator = '<|endoftext|>'  # splits plain-text files into documents ('\n\n': blank
                                               # lines, one dialogue per block as in Claire; '' = whole file)
  config.data.on_error = 'skip'         # bad records: 'skip' (counted and reported) or 'fail'
  config.data.val_fraction = 0.05       # fraction of documents held out for validation
  config.data.cache_dir = ''            # '' = $XDG_CACHE_HOME/vesper_jax (or ~/.cache/vesper_jax)
  config.data.text_keys = 'text,content'  # JSONL fields (Parquet columns) holding a document's text,
                                          # first present wins
  config.data.squad_template = 'Question: {question}\nAnswer: {answer}'  # SQuAD JSON: one block per question
  config.data.download_base_url = ''    # '' = public sources; else a mirror (http(s):// or file://) laid
                                        # out as <cache_dir>/downloads: <url>/<file name>. Only for the
                                        # downloads not on the Hub (tinyshakespeare, piaf); Hub: HF_ENDPOINT
  config.data.bpe_sample_bytes = 100_000_000  # a trained BPE learns from the corpus's first this many
                                              # bytes of documents (0 = all of it)

  # ---------------------------------------------------------------- optimizer
  config.opt = ml_collections.ConfigDict()
  config.opt.name = 'adamw'             # 'adamw' | 'velvet'
  config.opt.learning_rate = 3e-3       # peak learning rate
  config.opt.warmup_steps = 50          # linear warmup from 0
  config.opt.min_lr_ratio = 0.1         # cosine decays to learning_rate * min_lr_ratio
  config.opt.b1 = 0.9
  config.opt.b2 = 0.95
  config.opt.eps = 1e-8
  config.opt.weight_decay = 0.1         # decoupled; never on norms and biases
  config.opt.decay_embeddings = False   # also decay the embedding matrix and the output head
  config.opt.grad_clip_norm = 1.0       # global-norm clipping; 0 disables
  # Velvet (SPEC §8, velvet.py): read when name='velvet'. Ĥ = predictive entropy / ln V.
  config.opt.entropy_adaptive = True    # scale the step by s_E = clip(Ĥ / entropy_target)
  config.opt.perplexity_guided = True   # scale β1 by s_P = clip(perplexity_pivot / perplexity)
  config.opt.entropy_target = 0.5       # H_target: the normalised entropy at which s_E = 1
  config.opt.perplexity_pivot = 40.0    # P_pivot: the perplexity at which s_P = 1
  config.opt.scale_min = 0.5            # lower clip of s_E and s_P
  config.opt.scale_max = 2.0            # upper clip of s_E and s_P
  config.opt.beta1_min = 0.5            # lower clip of β1_t = b1·s_P
  config.opt.beta1_max = 0.999          # upper clip of β1_t
  config.opt.max_log_perplexity = 20.0  # the loss is capped here before exp() (perplexity ≤ e^20)
  # Velvet's update path: 'auto' (= 'xla' for now: README, Velvet) | 'xla' (optax, the parameter tree) |
  # 'xla_flat' | 'pallas' | 'triton' (in place over flat buffers the train state holds; 'triton' is GPU-only
  # and needs the `triton` extra; no adapters). AdamW ignores it.
  config.opt.kernel = 'auto'

  # ---------------------------------------------------------------- training
  config.train = ml_collections.ConfigDict()
  config.train.seed = 0
  config.train.num_steps = 400
  config.train.batch_size = 16          # global batch, in sequences, per optimizer step
  # Micro-batches per step (batch_size must divide evenly); 0 = auto: 1 on a GPU/TPU, on CPU about
  # CPU_MICRO_BATCH_TOKENS tokens per device per micro-batch (faster there: README, CPU train step).
  config.train.grad_accum_steps = 0
  config.train.mesh_data = -1           # device mesh axis sizes; -1 fills the remaining devices
  config.train.mesh_fsdp = 1
  config.train.eval_every = 100         # evaluate on the validation split every N steps (and at the end)
  config.train.eval_tokens = 1_000_000  # targets scored per evaluation: the whole split up to this; 0 = all
  config.train.max_nonfinite_steps = 10  # this many skipped (non-finite) updates in a row stop the run
  config.train.auto_scale = False       # pick num_steps from the cached token count (Chinchilla)
  config.train.sample_prompt = 'The '   # sampled from the trained model at the end ('' = no sample)
  config.train.sample_tokens = 48
  config.train.distributed = False      # call jax.distributed.initialize() (multi-host)
  config.train.init_from = ''           # fine-tune from a training workdir or a .safetensors export ('' = scratch)
  config.train.metacog_weight = 0.1     # λ_meta: weight of the metacognition head's loss (model.metacog)

  # ---------------------------------------------------------------- checkpointing
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 200   # also saved at the end and on SIGTERM/SIGINT
  config.checkpoint.keep = 3            # keep the last K checkpoints
  config.checkpoint.async_save = True   # write in the background while training continues

  # ---------------------------------------------------------------- logging
  config.logging = ml_collections.ConfigDict()
  config.logging.every_steps = 10       # metrics.jsonl / TensorBoard / progress-bar cadence
  config.logging.tensorboard = True
  config.logging.progress_bar = True
  config.logging.compilation_cache_dir = ''  # '' = <cache_dir>/jax_compilation_cache

  return config


# ------------------------------------------------------------------------------------------ validation

OPTIMIZERS = ('adamw', 'velvet')
ON_ERROR = ('skip', 'fail')
# Counts and cadences: 0 would divide by zero or never fire mid-run.
_AT_LEAST_ONE = ('train.batch_size', 'train.eval_every',
                 'train.max_nonfinite_steps', 'checkpoint.every_steps', 'checkpoint.keep',
                 'logging.every_steps')


# Keys whose base default changed after runs were saved without them: such a run meant the old value.
_OLDER_MEANINGS = {('model', 'metacog_inputs'): 'hidden'}  # before the head could read the statistics


def older_meanings(config: ml_collections.ConfigDict, saved: dict) -> None:
  """Sets, in a saved run's `config` (laid over get_config()), the value a key the run's file lacks
  meant when it was written (`_OLDER_MEANINGS`), instead of today's default."""
  for (section, key), value in _OLDER_MEANINGS.items():
    if key not in saved.get(section, {}):
      config[section][key] = value


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             num_processes: int | None = None, platform: str | None = None) -> None:
  """Refuses, before any data work or compilation, a config a run cannot use; the error names the key.

  Checks unknown keys, the model section (ModelConfig's own checks), data.on_error, counts and cadences,
  the optimizer's name and update kernel, and the device mesh and batch against the devices
  (default: jax.device_count() and jax.process_count(); the platform: the default devices', as
  platforms.resolve decides it for the run).
  """
  # Deferred: reading or editing a config file needs no jax; validating it does.
  import jax  # pylint: disable=g-import-not-at-top
  from vesper_jax import platforms, sharding, velvet  # pylint: disable=g-import-not-at-top
  from vesper_jax.model import ModelConfig  # pylint: disable=g-import-not-at-top

  _check_known_keys(config, get_config(), prefix='')
  model = ModelConfig(**config.model)  # its __post_init__ checks the model section by key
  t, d, o = config.train, config.data, config.opt
  if d.seq_len < 1 or d.seq_len > model.max_seq_len:
    raise ValueError(f'data.seq_len={d.seq_len} must be in [1, model.max_seq_len={model.max_seq_len}]')
  if d.on_error not in ON_ERROR:
    raise ValueError(f'data.on_error={d.on_error!r}: expected one of {ON_ERROR}')
  for key in _AT_LEAST_ONE:
    section, name = key.split('.')
    if config[section][name] < 1:
      raise ValueError(f'{key}={config[section][name]} must be at least 1')
  if t.eval_tokens < 0:
    raise ValueError(f'train.eval_tokens={t.eval_tokens} must be >= 0 (0 = the whole split)')
  if d.bpe_sample_bytes < 0:
    raise ValueError(f'data.bpe_sample_bytes={d.bpe_sample_bytes} must be >= 0 (0 = the whole corpus)')
  if t.num_steps < 1 and not t.auto_scale:
    raise ValueError(f'train.num_steps={t.num_steps} must be at least 1')
  if t.grad_accum_steps < 0:
    raise ValueError(f'train.grad_accum_steps={t.grad_accum_steps} must be >= 0 (0 = auto)')
  if t.grad_accum_steps and t.batch_size % t.grad_accum_steps:
    raise ValueError(f'train.batch_size={t.batch_size} is not divisible by '
                     f'train.grad_accum_steps={t.grad_accum_steps}')
  if o.name not in OPTIMIZERS:
    raise ValueError(f'opt.name={o.name!r}: expected one of {OPTIMIZERS}')
  if o.kernel not in velvet.KERNELS:
    raise ValueError(f'opt.kernel={o.kernel!r}: expected one of {velvet.KERNELS}')
  if o.name == 'velvet' and o.kernel in velvet.IN_PLACE_KERNELS and model.lora_targets:
    raise ValueError(f'opt.kernel={o.kernel!r} (in place over flat buffers) cannot freeze a base for '
                     "adapters (model.lora_targets); use opt.kernel='xla'")
  if o.name == 'velvet' and o.kernel == 'triton':
    _check_triton()
  if t.metacog_weight < 0:
    raise ValueError(f'train.metacog_weight={t.metacog_weight} must be >= 0')
  if not o.learning_rate > 0:
    raise ValueError(f'opt.learning_rate={o.learning_rate} must be positive')
  num_devices = jax.device_count() if num_devices is None else num_devices
  num_processes = jax.process_count() if num_processes is None else num_processes
  mesh_data, mesh_fsdp = sharding.mesh_shape(t.mesh_data, t.mesh_fsdp, num_devices)
  micro = t.batch_size // grad_accum_steps(config, mesh_data * mesh_fsdp, platforms.resolve(platform))
  if micro % (mesh_data * mesh_fsdp):
    raise ValueError(f'the micro-batch of {micro} sequences (train.batch_size / train.grad_accum_steps) '
                     f'does not split over the {mesh_data * mesh_fsdp} devices of the mesh '
                     f'(train.mesh_data={t.mesh_data}, train.mesh_fsdp={t.mesh_fsdp})')
  if t.batch_size % num_processes:
    raise ValueError(f'train.batch_size={t.batch_size} does not split over {num_processes} processes')


# Tokens per device in one micro-batch that train.grad_accum_steps = 0 aims for on CPU. XLA:CPU's matrix
# products slow down as their row count grows past this (166-177 GFLOP/s with 8,192 rows against
# 192-202 with 2,048 on the 2-core AVX-512 machine), and the activations of a smaller micro-batch stay in
# cache between ops: `small` at 32 x 256 steps in 1,248 ms per 8 sequences as 4 x 8, 1,321 as 2 x 16,
# 1,444 as one batch, and 1,232-1,285 as 8 x 4 (README, CPU train step).
CPU_MICRO_BATCH_TOKENS = 2048


def grad_accum_steps(config: ml_collections.ConfigDict, num_devices: int, platform: str) -> int:
  """Micro-batches per step: train.grad_accum_steps, or for 0 (auto) the choice for `platform`.

  Auto is 1 off CPU (one big batch keeps an accelerator busy). On CPU it is the most micro-batches that
  each still hold at least CPU_MICRO_BATCH_TOKENS tokens per device and split evenly over the
  `num_devices` the batch is sharded over; 1 when even the whole batch holds fewer.
  """
  t = config.train
  if t.grad_accum_steps or platform != 'cpu':
    return t.grad_accum_steps or 1
  best = 1
  for steps in range(1, t.batch_size + 1):
    micro = t.batch_size // steps
    if t.batch_size % steps or micro % num_devices:
      continue
    if micro * config.data.seq_len // num_devices < CPU_MICRO_BATCH_TOKENS:
      break
    best = steps
  return best


def _check_triton() -> None:
  """opt.kernel='triton' needs jax-triton (the `triton` extra) and a CUDA GPU: one line if either is missing."""
  from vesper_jax.kernels import velvet_triton  # pylint: disable=g-import-not-at-top
  reason = velvet_triton.unavailable_reason()
  if reason:
    raise ValueError(f"opt.kernel='triton' {reason}; use opt.kernel='pallas' or 'xla'")


def _check_known_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                      prefix: str) -> None:
  for key, value in config.items():
    name = f'{prefix}{key}'
    if key not in reference:
      raise ValueError(f'unknown config key {name!r} (not in vesper_jax/config.py)')
    if isinstance(value, ml_collections.ConfigDict):
      _check_known_keys(value, reference[key], prefix=name + '.')
