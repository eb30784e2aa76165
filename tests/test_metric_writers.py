"""metrics.jsonl, TensorBoard events (read back with TensorBoard's own loader) and the
console progress line."""

import glob
import json
import os

from etils import epath
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from score_jax import metric_writers


def read_events(workdir) -> dict[str, list[tuple[int, float]]]:
  """(step, value) of each TensorBoard scalar tag, in file order."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        out.setdefault(value.tag, []).append(
            (event.step, float(tensor_util.make_ndarray(value.tensor))))
  return out


def test_metrics_go_to_jsonl_tensorboard_and_the_console(tmp_path, capsys):
  writer = metric_writers.MetricsWriter(str(tmp_path), total_steps=4, start_step=0)
  writer.write(1, {"loss": np.float32(0.5), "reward_t1": 0.25, "hist": np.arange(3)},
               console=False)
  writer.write(2, {"loss": np.float32(0.25), "reward_t1": 0.75, "hist": np.arange(3)},
               console=True)
  writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows == [{"step": 1, "loss": 0.5, "reward_t1": 0.25, "hist": [0, 1, 2]},
                  {"step": 2, "loss": 0.25, "reward_t1": 0.75, "hist": [0, 1, 2]}]
  events = read_events(tmp_path)
  assert events["loss"] == [(1, 0.5), (2, 0.25)]
  assert events["reward_t1"] == [(1, 0.25), (2, 0.75)]
  assert "hist" not in events  # Only scalars go to TensorBoard.
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1  # Only the step asked for.
  assert err[0].startswith("[2/4] loss=0.2500 reward_t1=0.7500 | ")
  assert "step/s, ETA " in err[0]


def test_a_resumed_run_appends(tmp_path):
  for start in (0, 1):
    writer = metric_writers.MetricsWriter(str(tmp_path), total_steps=2, start_step=start)
    writer.write(start + 1, {"loss": 1.0 + start}, console=False)
    writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
  # Two event files (one per writer); their names need not sort in the order written.
  assert sorted(read_events(tmp_path)["loss"]) == [(1, 1.0), (2, 2.0)]


def test_object_stores_get_the_file_rewritten_whole(tmp_path, monkeypatch):
  assert not metric_writers.appendable(epath.Path("gs://bucket/run/metrics.jsonl"))
  assert metric_writers.appendable(epath.Path(tmp_path) / "metrics.jsonl")
  monkeypatch.setattr(metric_writers, "appendable", lambda path: False)
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n')  # An earlier run's.
  writer = metric_writers.MetricsWriter(str(tmp_path), total_steps=3, start_step=1)
  writer.write(2, {"loss": 2.0}, console=False)  # Within REMOTE_FLUSH_S: not yet written.
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1]
  writer.flush()  # As at a checkpoint.
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]
  monkeypatch.setattr(metric_writers, "REMOTE_FLUSH_S", 0.0)
  writer.write(3, {"loss": 3.0}, console=False)
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]
  writer.close()
  assert [json.loads(l)["loss"] for l in path.read_text().splitlines()] == [1.0, 2.0, 3.0]


def test_other_processes_write_nothing(tmp_path, capsys):
  writer = metric_writers.MetricsWriter(str(tmp_path), total_steps=2, start_step=0, active=False)
  writer.write(1, {"loss": 1.0}, console=True)
  writer.close()
  assert not os.listdir(tmp_path) and not capsys.readouterr().err


@pytest.mark.parametrize("done, initial, elapsed, expected", [
    (30, 10, 10.0, "[30/100] x=1 | 2.00step/s, ETA 00:35"),  # 20 steps in 10 s; 70 left.
    (5, 0, 20.0, "[5/100] x=1 | 4.00s/step, ETA 06:20"),
])
def test_progress_line(done, initial, elapsed, expected):
  line = metric_writers.progress_line(done, 100, elapsed, initial=initial, shown="x=1")
  assert " ".join(line.split()) == expected
