"""The training loop's log of a step: its metrics with step time, samples/s, MFU and
input time, to the console, TensorBoard and WORKDIR/metrics.jsonl (`StepLog`)."""

import json
import sys
import time
from pathlib import Path

import jax

# Metrics printed in the fixed part of the log line (the rest are appended).
_LOGGED = {"loss", "grad_norm", "lr", "step_time", "samples_per_s", "mfu", "skipped",
           "finite", "input_s"}


def log(msg: str) -> None:
  """`msg` on stderr, from process 0 only."""
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


class StepLog:
  """Writes the metrics of logged steps with their timing.

  Step time is measured between the completions of logged steps, less the seconds the
  loop reports as not step time (`off_step`: samples written, blocked in checkpoint
  saves); input time is the host's time making batches (`input`), per batch.
  `num_steps` gives the ETA, `samples_per_step`, `flops` (model FLOPs per step and
  device) and `peak` (FLOP/s) samples/s and MFU. TensorBoard goes to `writer` (None:
  none), metrics.jsonl to `workdir` on process 0.
  """

  def __init__(self, workdir: Path, writer, num_steps: int, samples_per_step: float,
               flops: float, peak: float, step: int, skipped: int):
    self._workdir, self._writer, self._num_steps = workdir, writer, num_steps
    self._samples, self._flops, self._peak = samples_per_step, flops, peak
    self.last: dict = {}  # the metrics last written
    self._t_last, self._step_last = time.perf_counter(), step
    # Host seconds spent making batches since the last log and how many, and the
    # skipped-step count then (a rise is reported on its own line).
    self._input_s, self._batches, self._skipped_logged = 0.0, 0, skipped
    self._off_step_s = 0.0

  def input(self, seconds: float) -> None:
    """One batch made in `seconds`."""
    self._input_s += seconds
    self._batches += 1

  def off_step(self, seconds: float) -> None:
    """`seconds` after a step finished that are not step time."""
    self._off_step_s += seconds

  def write(self, at: int, metrics: dict, timed: bool = True,
            before_batch: bool = False) -> dict:
    """Logs step `at`'s `metrics` (device arrays); returns them as floats with the
    timing fields. `timed=False`: the step's completion was observed late, its time
    is the previous log's. `before_batch`: a checkpoint step logged before the next
    batch is made; the previous log's input time stands."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    # Timed between completions of logged steps (device_get just waited for this one).
    now = time.perf_counter()
    steps = max(at - self._step_last, 1)
    dt = max(now - self._t_last - self._off_step_s, 1e-6) / steps
    self._off_step_s = 0.0
    if not timed and "step_time" in self.last:
      # Observed right after the previous log: this step may have finished while the
      # host was busy, so the gap measures nothing (it showed MFU of 700%+).
      dt = self.last["step_time"]
    # The next batch is made while the device runs the step just dispatched: when it
    # takes about as long as a step, the input pipeline bounds the run. The last step
    # makes none: 0.
    made = (self._input_s / self._batches if self._batches
            else self.last.get("input_s", 0.0) if before_batch else 0.0)
    m.update(step_time=dt, samples_per_s=self._samples / dt,
             mfu=self._flops / dt / self._peak, input_s=made)
    self._t_last, self._step_last, self._input_s, self._batches = now, at, 0.0, 0
    self.last = m
    self._print(at, m, dt)
    if self._writer is not None:
      for k, v in m.items():
        self._writer.add_scalar(f"train/{k}", v, at)
    if jax.process_index() == 0:
      with open(self._workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(dict(m, step=at)) + "\n")
    return m

  def _print(self, at: int, m: dict, dt: float) -> None:
    extra = " ".join(f"{k} {v:.4g}" for k, v in m.items()
                     if k not in _LOGGED and not k.startswith("grad_norm/"))
    eta = int((self._num_steps - at) * dt)
    log(f"step {at}: loss {m['loss']:.4f} grad_norm {m['grad_norm']:.3f} "
        f"lr {m.get('lr', 0):.2e} {dt:.3f}s/step (input {m['input_s']:.3f}s) "
        f"{m['samples_per_s']:.2f} samples/s MFU {m['mfu']:.1%} skipped "
        f"{int(m['skipped'])} eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        + (f" | {extra}" if extra else ""))
    skipped = int(m["skipped"])
    if skipped > self._skipped_logged:
      log(f"WARNING step {at}: {skipped - self._skipped_logged} step(s) since the last "
          f"log had a non-finite loss or gradient norm; their updates were skipped "
          f"({skipped} in total). Persisting, this means a diverged run: lower "
          "optim.lr or check the data.")
      self._skipped_logged = skipped


def last_metrics(workdir: Path) -> dict:
  """The metrics a finished run returned (WORKDIR/last_metrics.json, less its step)."""
  path = workdir / "last_metrics.json"
  last = json.loads(path.read_text()) if path.exists() else {}
  last.pop("step", None)
  return last


def save_last_metrics(workdir: Path, last: dict, step: int) -> None:
  """Writes `last_metrics` whole or not at all (process 0)."""
  tmp = workdir / "last_metrics.json.tmp"
  tmp.write_text(json.dumps(dict(last, step=step), indent=1))
  tmp.replace(workdir / "last_metrics.json")

