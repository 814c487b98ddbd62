"""A console-script run started when its test module starts and checked by its own test.

The default run keeps torch on one thread (conftest.py), so while a test module's in-process tests run, the second
core is mostly idle, and a test that runs a command as a process (a DDP fit, a console script as the user types
it) mostly waits for it: the process's imports alone take ~8 s. A module-scoped fixture starts such a command
with `EarlyRun` when the module's first test starts (only when the test that checks it is selected), and the test
takes `result()` where it called `subprocess.run(..., capture_output=True, text=True, timeout=...)`: the same
command, environment, working directory, output and exit status, and the same timeout, counted from the start.
Its output goes to temporary files, so a process that writes much never waits for a reader.
"""

from __future__ import annotations

import subprocess
import tempfile
import time


class EarlyRun:
    def __init__(self, args: list[str], *, timeout: float, **popen_kwargs) -> None:
        self.args, self.timeout = args, timeout
        self._files = [tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")]
        self._start = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=self._files[0], stderr=self._files[1], text=True, **popen_kwargs)

    def result(self) -> subprocess.CompletedProcess:
        """What `subprocess.run(args, capture_output=True, text=True, timeout=timeout)` returns (it raises
        TimeoutExpired after killing the process, as that does)."""
        try:
            self.proc.wait(timeout=max(0.0, self.timeout - (time.monotonic() - self._start)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        out = []
        for f in self._files:
            f.seek(0)
            out.append(f.read())
        return subprocess.CompletedProcess(self.args, self.proc.returncode, *out)

    def close(self) -> None:
        """Kill the process if it still runs (its test failed before waiting, or was not reached) and drop the
        output files."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in self._files:
            f.close()


def selected(request, test_name: str) -> bool:
    """Whether this session runs `test_name` (any of its parametrizations) of the requesting module."""
    return any(getattr(item, "originalname", item.name) == test_name and getattr(item, "module", None) is request.module
               for item in request.session.items)
