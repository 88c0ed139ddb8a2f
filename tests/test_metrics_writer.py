import json
import struct

from mmret import metrics_writer


def test_crc32c_known_vector():
  assert metrics_writer.crc32c(b"123456789") == 0xE3069283


def _parse_scalars(event: bytes):
  """Minimal protobuf reader for Event{step=2, summary=5{value=1{tag=1, simple_value=2}}}."""

  def fields(buf):
    i = 0
    while i < len(buf):
      key, i = _varint(buf, i)
      number, wire = key >> 3, key & 7
      if wire == 0:
        value, i = _varint(buf, i)
      elif wire == 1:
        value, i = buf[i : i + 8], i + 8
      elif wire == 5:
        value, i = buf[i : i + 4], i + 4
      else:
        length, i = _varint(buf, i)
        value, i = buf[i : i + length], i + length
      yield number, value

  def _varint(buf, i):
    shift = result = 0
    while True:
      b = buf[i]
      i += 1
      result |= (b & 0x7F) << shift
      shift += 7
      if not b & 0x80:
        return result, i

  step, scalars = None, {}
  for number, value in fields(event):
    if number == 2:
      step = value
    if number == 5:
      for _, v in fields(value):
        parts = dict(fields(v))
        scalars[parts[1].decode()] = struct.unpack("<f", parts[2])[0]
  return step, scalars


def test_writer_round_trip(tmp_path):
  writer = metrics_writer.MetricWriter(str(tmp_path))
  writer.write(3, {"loss": 1.5, "lr": 0.25})
  writer.write(4, {"loss": 1.25})
  writer.close()
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert [(x["step"], x["loss"]) for x in lines] == [(3, 1.5), (4, 1.25)]
  records = list(metrics_writer.read_tfrecords(writer.events_path))
  assert len(records) == 3  # file_version header + two summaries
  assert b"brain.Event:2" in records[0]
  assert _parse_scalars(records[1]) == (3, {"loss": 1.5, "lr": 0.25})
  assert _parse_scalars(records[2]) == (4, {"loss": 1.25})


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metrics_writer.MetricWriter(str(tmp_path / "w"), enabled=False)
  writer.write(1, {"loss": 1.0})
  assert not (tmp_path / "w").exists()
