"""What the app adds to a job's wall time: the same training config run from the CLI and through the app.

    python bench/ui_overhead.py [--steps 100] [--rounds 3] [--root DIR]

The tiny demo model and dataset (built once under --root), one TrainConfig. Per round, back to back
and alternating which goes first:
  cli   `loratrain train --config_file run.toml` in a fresh process: spawn to exit
  ui    the real app (served on 127.0.0.1 in this process): from the `/start_job` request
        (`gradio_client`) until the app records the job's end (`/job_status`, polled once a second
        over plain HTTP within a session, as an open page's timer does); the job runs in the app's
        worker process, reporting JSON-line events, exactly as a click on Start does
Prints each run, the median of the per-round wall-time ratios ui/cli against the bar (1.05), the
same for CPU time (the job process's own, plus on the UI side what the app and the polling client
used meanwhile: less noisy than wall time on a shared machine), and each job process's peak RSS
(VmHWM): the CLI's through a wrapper, the worker's from its result event.
"""
from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BAR = 1.05
# runs the CLI in-process and leaves the process's VmHWM (MiB) in the file named by argv[1]
CLI_WRAPPER = """
import sys
from loratrain.cli import main
out, argv = sys.argv[1], sys.argv[2:]
code = main(argv)
import resource
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
open(out, "w").write(f"{hwm} {cpu}")
sys.exit(code)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_cpu() -> float:
    """CPU seconds of this process: the app (server, scheduler) and the polling client."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_cli(toml: Path, work: Path) -> tuple[float, float, float]:
    peak = work / "cli_peak.txt"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CLI_WRAPPER, str(peak), "train", "--config_file", str(toml)],
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"CLI run failed:\n{res.stderr[-3000:]}")
    hwm, cpu = map(float, peak.read_text().split())
    return wall, hwm, cpu


CLIENT_CPU = [0.0]  # CPU seconds the polling calls took on this thread (the HTTP client's side, not the app's)


def job_status(url: str, job: str) -> dict:
    """One poll as an open page's timer makes it: a plain HTTP call within a session.

    Not `gradio_client.predict`: that costs ~80 ms of CPU per call in the calling process (measured),
    which in this single process would be billed to the app; a browser's poll costs the app ~4 ms.
    """
    body = json.dumps({"data": [job], "session_hash": "ui-overhead-bench"}).encode()
    req = urllib.request.Request(url + "gradio_api/run/job_status", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["data"][0]


def run_ui(client, url: str, config: dict) -> tuple[float, float, float]:
    t0, c0 = time.time(), app_cpu()
    job = client.predict("train", config, api_name="/start_job")
    while True:  # polled once a second, like an open page's timer
        t = time.thread_time()
        s = job_status(url, job)
        CLIENT_CPU[0] += time.thread_time() - t
        if s["state"] not in ("queued", "running"):
            break
        time.sleep(1.0)
    wall = s["ended"] - t0  # when the app recorded the end (not when this loop happened to look)
    if s["state"] != "done":
        raise SystemExit(f"UI run ended {s['state']}: {s['message'] or s['error']}")
    # the job's own CPU time plus what the app and the client used meanwhile (competing for the same cores)
    run_ui.split = (float(s["cpu_s"] or 0), app_cpu() - c0)  # type: ignore[attr-defined]
    return wall, float(s["peak_rss_mib"] or 0), float(s["cpu_s"] or 0) + app_cpu() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="training steps per run (samples at the middle and the end)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--root", default="", help="workspace for the demo files and runs (default: a temporary folder)")
    args = ap.parse_args()

    from gradio_client import Client

    from loratrain.training.demo import demo_train_config
    from loratrain.ui.app import serve
    from loratrain.ui.config import UiConfig

    root = Path(args.root or tempfile.mkdtemp(prefix="ui_overhead_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    cfg = demo_train_config(root / "demo", args.steps)
    app, ctx, url = serve(UiConfig(root=[str(root)], port=free_port()), block=False)
    client = Client(url, verbose=False)
    rows = []
    try:
        for r in range(args.rounds):
            out = {}
            for kind in (("cli", "ui") if r % 2 == 0 else ("ui", "cli")):
                run_cfg = cfg.model_copy(update={"output_dir": str(root / f"r{r}_{kind}")})
                if kind == "cli":
                    toml = root / f"r{r}.toml"
                    toml.write_text(run_cfg.to_toml())
                    out[kind] = run_cli(toml, root)
                else:
                    CLIENT_CPU[0] = 0.0
                    out[kind] = run_ui(client, url, json.loads(run_cfg.model_dump_json()))
                    job_cpu, app_s = run_ui.split  # type: ignore[attr-defined]
                    print(f"  ui split: job process {job_cpu:.2f} CPU-s, app + client in this process {app_s:.2f} CPU-s "
                          f"(of which the client's own calls, on their thread, {CLIENT_CPU[0]:.2f})", flush=True)
            ratio = out["ui"][0] / out["cli"][0]
            rows.append((out, ratio))
            print(f"round {r + 1}: wall cli {out['cli'][0]:6.2f} s  ui {out['ui'][0]:6.2f} s  ratio {ratio:.3f} | "
                  f"CPU cli {out['cli'][2]:6.2f} s  ui job+app {out['ui'][2]:6.2f} s  ratio {out['ui'][2] / out['cli'][2]:.3f} | "
                  f"peak RSS cli {out['cli'][1]:.0f} MiB, ui worker {out['ui'][1]:.0f} MiB", flush=True)
    finally:
        client.close()
        ctx.runner.close()
        app.close()
    ratios = [ratio for _, ratio in rows]
    med = statistics.median(ratios)
    cli = statistics.median(o["cli"][0] for o, _ in rows)
    ui = statistics.median(o["ui"][0] for o, _ in rows)
    cpu_ratio = statistics.median(o["ui"][2] / o["cli"][2] for o, _ in rows)
    print(f"\n{args.steps} steps x {args.rounds} rounds: median wall cli {cli:.2f} s, ui {ui:.2f} s; "
          f"ui/cli median ratio {med:.3f} (rounds {min(ratios):.3f}..{max(ratios):.3f}); bar <= {BAR}: "
          f"{'PASS' if med <= BAR else 'FAIL'}")
    print(f"CPU time (less noisy on a shared machine): ui job + app / cli median ratio {cpu_ratio:.3f}")


if __name__ == "__main__":
    main()
