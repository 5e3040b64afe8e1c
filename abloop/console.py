"""The demo's terminal: one line per stage, and library output sent to a log file instead.

Prefect, transformers, httpx and uvicorn all write to stdout/stderr, some from C code, so the
demo moves file descriptors 1 and 2 to `.abloop-demo/logs/demo.log` for its duration and draws its
own display (rich) on a copy of the terminal's descriptor.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


def exit_output_to(log_path: Path) -> None:
    """Send what the process writes while it exits to `log_path` instead of the terminal.

    Prefect stops its temporary server from an `atexit` hook and logs that it does, after the demo's
    summary. `atexit` runs hooks last registered first, so this must be called after that server
    started (after the demo ran) to take effect before Prefect's hook.
    """
    def redirect() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        log = open(log_path, "a", buffering=1)  # noqa: SIM115 - open until the process ends
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log

    atexit.register(redirect)


_ICONS = {"running": "[yellow]…[/]", "done": "[green]✓[/]", "failed": "[red]✗[/]"}


@dataclass
class Stage:
    name: str
    what: str
    status: str = "running"
    detail: str = ""
    count: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    # Called once when the stage finishes: a stage that wraps later ones (serve) is reported when it is
    # done, not when its block closes after everything it wraps.
    on_end: Callable[[Stage], None] | None = field(default=None, repr=False)

    def advance(self, n: int = 1) -> None:
        self.count += n
        self.detail = f"{self.count} done"

    def update(self, detail: str) -> None:
        self.detail = detail

    def done(self, detail: str) -> None:
        self._end("done", detail)

    def fail(self, detail: str) -> None:
        self._end("failed", detail)

    def _end(self, status: str, detail: str) -> None:
        if self.ended is not None:
            return
        self.status, self.detail, self.ended = status, detail, time.monotonic()
        if self.on_end is not None:
            self.on_end(self)

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


class DemoConsole:
    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.stages: list[Stage] = []
        self.notes: list[str] = []
        self.started = time.monotonic()

    def __enter__(self) -> DemoConsole:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 - closed in __exit__
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self._terminal = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(self._log.fileno(), 1)
        os.dup2(self._log.fileno(), 2)
        # Python-level writers too: sys.stdout may not be fd 1 (pytest, IDEs, notebooks).
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout = sys.stderr = self._log
        self.console = Console(file=self._terminal, highlight=False)
        self.console.print(f"[bold]abloop demo[/] - library output goes to {self.log_path}")
        self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop_live()
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = self._streams
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        if exc_info[0] is not None and exc_info[0] is not KeyboardInterrupt:
            self.console.print(f"[red]demo failed:[/] {exc_info[1]} (details in {self.log_path})")
        self._terminal.close()
        # The log stays open: handlers created meanwhile (Prefect's, at exit) still hold it as their stream.
        self._log.flush()

    def _stop_live(self) -> None:
        if getattr(self, "_live", None) is not None:
            self._live.update(self._render())
            self._live.__exit__(None, None, None)
            self._live = None
            if not self.console.is_terminal:  # rich ends the table's last line on a terminal only
                self.console.line()

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[Stage]:
        stage = Stage(name, what, on_end=self._finished)
        self.stages.append(stage)
        print(f"== stage {name}: {what}", flush=True)  # into the log, to line it up with library output
        try:
            yield stage
        except BaseException as error:
            stage.fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
            raise
        finally:
            stage.done(stage.detail)  # no-op if the stage already finished

    def _finished(self, stage: Stage) -> None:
        print(f"== stage {stage.name}: {stage.status} {stage.detail} ({stage.seconds:.1f} s)", flush=True)
        if not self.console.is_terminal:  # no live table to update: one line per finished stage instead
            self.console.print(f"{_ICONS[stage.status]} {stage.name}: {stage.detail} ({stage.seconds:.1f} s)")
        self._refresh()

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)
        if self._live is not None:
            self._live.console.print(Text(text, style="dim"))

    def _refresh(self) -> None:
        if getattr(self, "_live", None) is not None:
            self._live.update(self._render())

    def _render(self) -> Group:
        table = Table(show_header=True, header_style="bold", expand=True, box=None)
        table.add_column("", width=2)
        table.add_column("stage", style="bold", no_wrap=True)
        table.add_column("what", ratio=2)
        table.add_column("status", ratio=3)
        table.add_column("time", justify="right", no_wrap=True)
        for stage in self.stages:
            table.add_row(_ICONS[stage.status], stage.name, stage.what, stage.detail, f"{stage.seconds:5.1f} s")
        return Group(table)

    def summary(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The closing table: offline gate, online metric per arm with intervals, verdict, report."""
        summary["seconds"] = round(time.monotonic() - self.started, 1)
        (self.log_path.parent.parent / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        self._stop_live()
        table = Table(title="abloop demo: summary (all traffic and feedback SIMULATED)", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        holdout = summary.get("holdout_loss") or {}
        if holdout.get("base") is not None:
            table.add_row("offline gate", f"holdout loss base {holdout['base']:.3f} -> adapter {holdout['adapter']:.3f}"
                                          f" ({summary.get('adapter')})")
        for arm, values in (summary.get("arms") or {}).items():
            ci = values.get("ci")
            interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            value = "-" if values.get("value") is None else f"{values['value']:.3f}"
            table.add_row(f"{summary.get('primary_metric')} ({arm})", f"{value}{interval}, {values['users']} users")
        difference = summary.get("difference") or {}
        if difference.get("value") is not None and difference.get("ci"):
            low, high = difference["ci"]
            table.add_row("candidate - control",
                          f"{difference['value']:+.3f}, always-valid 95% [{low:+.3f}, {high:+.3f}]")
        verdict = summary.get("verdict") or {}
        if verdict:
            table.add_row("verdict", f"[bold]{verdict.get('action')}[/] - {verdict.get('reason')}")
        if summary.get("acted"):
            table.add_row("acted on", summary["acted"])
        if summary.get("after"):
            served = ", ".join(f"{model}: {n}" for model, n in summary["after"]["models"].items())
            table.add_row("served after the verdict", served)
        if summary.get("report"):
            table.add_row("report", summary["report"])
        table.add_row("time", f"{summary['seconds']:.0f} s")
        table.add_row("simulated", summary["simulated"])
        self.console.print(table)
        return summary
