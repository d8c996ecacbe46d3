"""Test helper: the merged output of a running trainer, read by a thread (so the pipe
never fills) and searched with a deadline."""

import queue
import re
import threading
import time

# A logged step, also with local_multiprocess.sh's "[pI] " prefix.
_STEP = re.compile(r"^(?:\[p\d+\] )?step (\d+):")


class RunLog:
  """`proc` must have been started with stdout=PIPE (stderr merged), text=True."""

  def __init__(self, proc):
    self.proc, self.lines, self.seen = proc, queue.Queue(), []
    self.reader = threading.Thread(
        target=lambda: [self.lines.put(x) for x in iter(proc.stdout.readline, "")],
        daemon=True)
    self.reader.start()

  def wait_for(self, found, what: str, timeout=300) -> None:
    """Returns once `found(lines so far)` holds; fails (with the log's end) when the
    process exits or `timeout` seconds pass first."""
    deadline = time.time() + timeout
    while not found(self.seen):
      assert time.time() < deadline, f"no {what} in time: " + self.text()[-3000:]
      try:
        self.seen.append(self.lines.get(timeout=1.0))
      except queue.Empty:
        assert self.proc.poll() is None, f"exited before {what}: " + self.text()[-3000:]

  def drain(self) -> list[str]:
    """The lines so far, after taking in what the reader has without waiting."""
    while not self.lines.empty():
      self.seen.append(self.lines.get())
    return self.seen

  def wait_for_step_after(self, step: int, timeout=300) -> None:
    """Returns once the run has logged a step after `step` (it is then in the loop,
    with the SIGTERM handler installed)."""
    self.wait_for(lambda lines: any(int(m[1]) > step for m in map(_STEP.match, lines) if m),
                  f"step after {step}", timeout)

  def wait_for_text(self, text: str, timeout=300) -> None:
    self.wait_for(lambda lines: any(text in x for x in lines), repr(text), timeout)

  def finish(self, timeout=300, returncode=0) -> str:
    """Waits for the process and the reader; the whole log, after asserting its exit
    status (143: videoldm-train stopped by SIGTERM)."""
    self.proc.wait(timeout=timeout)
    self.reader.join(timeout=timeout)
    self.drain()
    assert self.proc.returncode == returncode, self.text()[-3000:]
    return self.text()

  def text(self) -> str:
    return "".join(self.seen)
