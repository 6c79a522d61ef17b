"""Where training metrics go: metrics.jsonl, TensorBoard event files, a progress bar, and the
throughput (tokens/s, MFU) measured between two log lines."""

import json
import os
import pathlib
import time

import tqdm

from vesper_jax import scaling


class MetricsWriter:
  """Appends `{"step": s, **values}` lines to <workdir>/metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str | os.PathLike, tensorboard: bool, enabled: bool = True,
               resume_step: int = 0):
    """`resume_step`: the step the run restarts from; rows logged past it by an earlier, killed run are
    dropped (those steps run again), so metrics.jsonl holds one row per step and kind."""
    self._enabled = enabled
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _drop_rows_after(workdir / 'metrics.jsonl', resume_step)
    # Line-buffered append: a killed run leaves every line it wrote, and a resumed run continues the file.
    self._jsonl = open(workdir / 'metrics.jsonl', 'a', buffering=1, encoding='utf-8')
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # deferred: only runs that log to TensorBoard pay for it
      self._tb = SummaryWriter(logdir=str(workdir))

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self._enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    if self._tb is not None:
      for key, value in values.items():
        self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if not self._enabled:
      return
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _drop_rows_after(path: pathlib.Path, step: int) -> None:
  """Keeps the rows of the steps that will not run again: before `step`, and `step` itself unless it is
  0 (a fresh start evaluates step 0 again). A torn last line of a killed run goes too."""
  if not path.is_file():
    return

  def kept(line: str) -> bool:
    try:
      row_step = json.loads(line)['step']
    except (ValueError, KeyError, TypeError):
      return False
    return row_step < step or (row_step == step and step > 0)

  lines = path.read_text(encoding='utf-8').splitlines(keepends=True)
  keep = [line for line in lines if kept(line)]
  if len(keep) < len(lines):
    tmp = path.with_suffix('.jsonl.tmp')
    tmp.write_text(''.join(keep), encoding='utf-8')
    tmp.replace(path)


class Progress:
  """A tqdm bar over optimizer steps showing loss, tokens/s, MFU (where known) and the ETA."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self._bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit='step',
                          dynamic_ncols=True, smoothing=0.1)

  def update(self, step: int, values: dict[str, float]) -> None:
    postfix = {'loss': f"{values['loss']:.4f}", 'tok/s': f"{values['tokens_per_s']:,.0f}"}
    if 'mfu' in values:
      postfix['mfu'] = f"{100 * values['mfu']:.1f}%"
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(step - self._bar.n)

  def note(self, message: str) -> None:
    if not self._bar.disable:
      self._bar.write(message)

  def close(self) -> None:
    self._bar.close()


class Throughput:
  """Tokens/s, and MFU where the peak is known, over the steps since the previous `read`.

  Steps are dispatched asynchronously, so a window's wall time covers its steps once the loop has
  reached a steady state (each read blocks on the metrics it reports).
  """

  def __init__(self, tokens_per_step: int, flops_per_step: float, peak_per_device: float | None,
               num_devices: int):
    self._tokens, self._flops = tokens_per_step, flops_per_step
    self._peak, self._devices = peak_per_device, num_devices
    self._start, self._steps = time.perf_counter(), 0

  def tick(self) -> None:
    """One more step in the current window."""
    self._steps += 1

  def read(self) -> dict[str, float]:
    """{'tokens_per_s'[, 'mfu']} of the window, then starts a new one."""
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    values = {'tokens_per_s': self._steps * self._tokens / elapsed}
    if self._peak:
      values['mfu'] = scaling.mfu(self._steps * self._flops / elapsed, self._peak, self._devices)
    self._start, self._steps = time.perf_counter(), 0
    return values
