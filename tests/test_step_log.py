"""The throughput figures of the trainer's log line: step time, samples/s and MFU
(`train.step_log.StepLog`) against the measured matmul peak (`train.perf`), on a
clock the test moves."""

import json
import types

import pytest

from videoldm_jax.train import perf, step_log


class Clock:
  def __init__(self, tick: float = 0.0):
    self.now, self.tick = 0.0, tick

  def perf_counter(self) -> float:
    self.now += self.tick
    return self.now


def test_peak_is_two_n_cubed_flops_over_one_products_time(monkeypatch):
  # Each round reads the clock twice around one product: one tick per product.
  monkeypatch.setattr(perf, "time", types.SimpleNamespace(perf_counter=Clock(0.5)
                                                          .perf_counter))
  assert perf.matmul_peak_flops(n=16, repeats=3, calls=1) == 2 * 16 ** 3 / 0.5
  # Several calls per round: the round's time is shared among them.
  monkeypatch.setattr(perf, "time", types.SimpleNamespace(perf_counter=Clock(0.5)
                                                          .perf_counter))
  assert perf.matmul_peak_flops(n=16, repeats=1, calls=4) == \
      2 * 16 ** 3 / (0.5 / 4)


def test_step_time_samples_and_mfu_of_a_logged_step(tmp_path, monkeypatch):
  clock = Clock()
  monkeypatch.setattr(step_log, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
  log = step_log.StepLog(tmp_path, None, num_steps=10, samples_per_step=4, flops=100.0,
                         peak=1000.0, step=0, skipped=0)
  metrics = {"loss": 0.5, "grad_norm": 1.0, "skipped": 0}
  log.input(0.25)
  log.input(0.75)
  clock.now = 5.0  # steps 1 and 2 done 5 s after the start, 1 s of it checkpointing
  log.off_step(1.0)
  m = log.write(2, metrics)
  # (5 - 1) s / 2 steps = 2 s per step: 4 / 2 samples/s, MFU 100 / 2 / 1000.
  assert m["step_time"] == 2.0 and m["samples_per_s"] == 2.0
  assert m["mfu"] == pytest.approx(0.05) and m["input_s"] == 0.5  # (0.25 + 0.75) / 2
  clock.now = 8.0
  m = log.write(3, metrics)  # no off-step time this time, no batch made
  assert m["step_time"] == 3.0 and m["mfu"] == pytest.approx(0.1 / 3) and m["input_s"] == 0
  log.input(0.25)  # the input time of the steps since the last log only
  clock.now = 11.0
  assert log.write(4, metrics)["input_s"] == 0.25
  # Observed late (timed=False): the previous step time stands.
  clock.now = 11.5
  assert log.write(5, metrics, timed=False)["step_time"] == 3.0
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(x["step"], x["step_time"]) for x in lines] == [(2, 2.0), (3, 3.0), (4, 3.0),
                                                          (5, 3.0)]


def test_log_line_eta_input_and_skipped_warning(tmp_path, monkeypatch, capsys):
  clock = Clock()
  monkeypatch.setattr(step_log, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
  log = step_log.StepLog(tmp_path, None, num_steps=100, samples_per_step=4, flops=100.0,
                         peak=1000.0, step=0, skipped=0)
  log.input(0.5)
  clock.now = 20.0
  log.write(10, {"loss": 0.5, "grad_norm": 1.0, "skipped": 1})
  err = capsys.readouterr().err
  # 2 s per step, 90 steps to go: 180 s.
  assert "step 10: loss 0.5000" in err and "eta 0:03:00" in err
  assert "WARNING step 10: 1 step(s) since the last log" in err
  # The count does not rise: no second warning. A checkpoint step logged before its
  # next batch keeps the last input time.
  clock.now = 40.0
  m = log.write(20, {"loss": 0.5, "grad_norm": 1.0, "skipped": 1}, before_batch=True)
  err = capsys.readouterr().err
  assert "WARNING" not in err and "eta 0:02:40" in err and m["input_s"] == 0.5
  # An hour or more: h:mm:ss (2000 steps at 2 s, 1990 to go: 3980 s).
  log = step_log.StepLog(tmp_path, None, num_steps=2000, samples_per_step=4, flops=100.0,
                         peak=1000.0, step=0, skipped=0)
  clock.now += 20.0
  log.write(10, {"loss": 0.5, "grad_norm": 1.0, "skipped": 0})
  assert "eta 1:06:20" in capsys.readouterr().err


def test_last_metrics_read_back_without_their_step(tmp_path):
  # What a re-run of a finished stage reports (videoldm-train with nothing left to do).
  step_log.save_last_metrics(tmp_path, {"loss": 1.5}, 7)
  assert step_log.last_metrics(tmp_path) == {"loss": 1.5}


def test_samples_and_saves_wait_for_the_queued_steps_before_their_time_is_taken_out(
    monkeypatch):
  # The loop writes samples (and saves) right after dispatching a step. Timed with the
  # wait for that step inside, the queued steps' device time was taken out of step time:
  # the log after a sample showed half the step time (MFU 114% on CPU). The order of the
  # calls, not a timing: wait for the state, then the clock around the work alone.
  import jax

  from videoldm_jax.train import loop
  calls = []
  monkeypatch.setattr(jax, "block_until_ready", lambda x: calls.append(("wait", x)) or x)
  monkeypatch.setattr(loop.time, "perf_counter", lambda: calls.append("clock") or len(calls))
  loop.off_step(types.SimpleNamespace(off_step=lambda s: calls.append(("off", s))),
                {"w": 1}, lambda: calls.append("work"))
  assert calls == [("wait", {"w": 1}), "clock", "work", "clock", ("off", 4 - 2)]
