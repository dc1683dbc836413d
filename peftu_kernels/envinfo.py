"""The environment block every report carries: device, versions, git commit, date (benchmarks and
bench_suite both write it)."""
from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import torch


def environment(device: str | torch.device = "cpu") -> dict:
    dev = torch.device(device)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except OSError:
        commit = None
    env = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for mod in ("triton", "transformers", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env
