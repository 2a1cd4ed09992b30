"""A run whose output is not a terminal (a log file, a wrapper's pipe) still shows it moving: a progress line at a
steady interval with the step, the rate, the latest metrics and an ETA."""
from __future__ import annotations

import io
import os
import subprocess
import sys

from loratrain.console import ConsoleReporter


def test_a_progress_line_at_each_interval_on_a_pipe(capsys):
    now = [100.0]
    rep = ConsoleReporter(stream=io.StringIO(), every=10.0)
    rep.clock = lambda: now[0]
    rep.start(100, "training", unit="it")
    for _ in range(4):  # 4 steps in 8 s: not yet an interval
        now[0] += 2.0
        rep.advance(1, loss=0.5)
    assert capsys.readouterr().out.strip().splitlines() == ["training: 0/100 it"]
    now[0] += 2.0
    rep.advance(1, loss=0.25, lr_unet=1e-4)  # 5 steps in 10 s
    line = capsys.readouterr().out.strip()
    assert line == "training: 5/100 it · 0.5 it/s · loss 0.25 · lr_unet 0.0001 · ETA 3:10", line
    rep.close()
    rep.advance(1)  # no phase: nothing printed, no error
    assert capsys.readouterr().out == ""


def test_a_terminal_gets_the_bar_not_the_lines(capsys):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    rep = ConsoleReporter(stream=Tty(), every=0.0)
    rep.start(3, "training")
    rep.advance(1, loss=1.0)
    rep.close()
    assert "it/s ·" not in capsys.readouterr().out


def test_a_cli_run_into_a_log_file_shows_progress(tiny_files, dataset, tmp_path):
    log = tmp_path / "run.log"
    with open(log, "w") as fh:
        res = subprocess.run([sys.executable, "-m", "loratrain", "train", "--pretrained_model_name_or_path",
                              str(tiny_files["sd1_file"]), "--train_data_dir", str(dataset), "--output_dir", str(tmp_path / "o"),
                              "--resolution", "64", "--network_dim", "4", "--max_train_steps", "4", "--train_batch_size", "2"],
                             stdout=fh, stderr=subprocess.STDOUT, timeout=300, env={**os.environ, "LORATRAIN_PROGRESS_EVERY": "0"})
    text = log.read_text()
    assert res.returncode == 0, text[-2000:]
    lines = [ln for ln in text.splitlines() if ln.startswith("training: ") and "it/s" in ln]
    assert len(lines) >= 3 and "loss " in lines[-1] and "/4 " in lines[-1], text[-2000:]
