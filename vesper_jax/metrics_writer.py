"""Where training metrics go: metrics.jsonl, TensorBoard event files and a progress bar."""

import json
import os
import pathlib

import tqdm


class MetricsWriter:
  """Appends `{"step": s, **values}` lines to <workdir>/metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str | os.PathLike, tensorboard: bool, enabled: bool = True):
    self._enabled = enabled
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
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
