"""Where metrics go (metrics_writer.py): metrics.jsonl rows (and the rows a resumed run replaces), the
TensorBoard event file read back through its TFRecord framing, and the throughput window."""

import json
import struct
import types

import pytest
from tensorboardX.proto import event_pb2

from vesper_jax import metrics_writer


def _rows(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_jsonl_holds_one_row_per_write(tmp_path):
  writer = metrics_writer.MetricsWriter(tmp_path / 'run', tensorboard=False)
  writer.write(0, {'eval_loss': 6.5})
  writer.write(1, {'loss': 6.25, 'learning_rate': 1e-3})
  writer.write(2, {'loss': 6.0, 'learning_rate': 2e-3})
  assert _rows(tmp_path / 'run') == [{'step': 0, 'eval_loss': 6.5},
                                     {'step': 1, 'loss': 6.25, 'learning_rate': 1e-3},
                                     {'step': 2, 'loss': 6.0, 'learning_rate': 2e-3}]  # line-buffered
  writer.close()
  assert not list((tmp_path / 'run').glob('events.out.tfevents.*'))
  metrics_writer.MetricsWriter(tmp_path / 'other', tensorboard=True, enabled=False).write(1, {'loss': 1.0})
  assert not (tmp_path / 'other').exists()  # processes other than the first write nothing


def test_a_resumed_run_replaces_the_rows_of_the_steps_it_runs_again(tmp_path):
  writer = metrics_writer.MetricsWriter(tmp_path, tensorboard=False)
  for step in range(5):
    writer.write(step, {'loss': 10.0 - step})
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write('{"step": 5, "lo')  # the torn last line of a killed run
  resumed = metrics_writer.MetricsWriter(tmp_path, tensorboard=False, resume_step=2)
  resumed.write(3, {'loss': 0.5})
  resumed.close()
  assert [(r['step'], r['loss']) for r in _rows(tmp_path)] == [(0, 10.0), (1, 9.0), (2, 8.0), (3, 0.5)]
  # A fresh start (step 0) replaces everything, its own step-0 evaluation included.
  metrics_writer.MetricsWriter(tmp_path, tensorboard=False).close()
  assert (tmp_path / 'metrics.jsonl').read_text() == ''


def _crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), bit by bit: independent of tensorboardX's table-driven one."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = _crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path) -> list[event_pb2.Event]:
  """TFRecord framing: uint64 length, masked CRC of the length, the data, masked CRC of the data."""
  raw, events, offset = path.read_bytes(), [], 0
  while offset < len(raw):
    header = raw[offset:offset + 8]
    (length,), (header_crc,) = struct.unpack('<Q', header), struct.unpack('<I', raw[offset + 8:offset + 12])
    data = raw[offset + 12:offset + 12 + length]
    (data_crc,) = struct.unpack('<I', raw[offset + 12 + length:offset + 16 + length])
    assert header_crc == _masked_crc(header) and data_crc == _masked_crc(data)
    event = event_pb2.Event()
    event.ParseFromString(data)
    events.append(event)
    offset += 16 + length
  assert offset == len(raw)  # no trailing partial record
  return events


def test_tensorboard_scalars_read_back_from_the_event_file(tmp_path):
  writer = metrics_writer.MetricsWriter(tmp_path, tensorboard=True)
  writer.write(1, {'loss': 2.5, 'learning_rate': 1e-3})
  writer.write(2, {'loss': 2.25})
  writer.write(10, {'eval_loss': 3.0})
  writer.close()
  files = list(tmp_path.glob('events.out.tfevents.*'))
  assert len(files) == 1
  events = _read_events(files[0])
  assert events[0].file_version.startswith('brain.Event:')
  scalars = [(v.tag, event.step, v.simple_value) for event in events for v in event.summary.value]
  assert scalars == [('loss', 1, 2.5), ('learning_rate', 1, pytest.approx(1e-3)), ('loss', 2, 2.25),
                     ('eval_loss', 10, 3.0)]
  assert len(_rows(tmp_path)) == 3  # and metrics.jsonl as well


def test_throughput_reads_tokens_per_second_and_mfu_over_its_window(monkeypatch):
  clock = types.SimpleNamespace(now=100.0)
  monkeypatch.setattr(metrics_writer, 'time', types.SimpleNamespace(perf_counter=lambda: clock.now))
  meter = metrics_writer.Throughput(tokens_per_step=256, flops_per_step=3e12, peak_per_device=1e12,
                                    num_devices=2)
  for _ in range(3):
    meter.tick()
  clock.now += 2.0
  # 3 steps × 256 tokens in 2 s; 3 × 3e12 FLOPs in 2 s over 2 devices of 1e12 FLOP/s each.
  assert meter.read() == pytest.approx({'tokens_per_s': 384.0, 'mfu': 2.25})
  meter.tick()
  clock.now += 4.0
  assert meter.read() == pytest.approx({'tokens_per_s': 64.0, 'mfu': 0.375})  # a new window
  cpu = metrics_writer.Throughput(tokens_per_step=256, flops_per_step=3e12, peak_per_device=None,
                                  num_devices=1)
  cpu.tick()
  clock.now += 1.0
  assert cpu.read() == {'tokens_per_s': 256.0}  # no peak known: no MFU
