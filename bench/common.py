"""What the benchmark scripts share: the model they measure, ports, the results files."""
import json
import os
import platform
import time
from pathlib import Path

from tasks.config import ROOT

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = ROOT / "artifacts" / "cnn-mnist.keras"


def ensure_model(model=None):
    """The model to measure: the given one, the full run's in artifacts/, or a quick one."""
    if model:
        return Path(model).resolve()
    if DEFAULT_MODEL.exists():
        return DEFAULT_MODEL
    from tasks.local import train_here
    from tests.fixtures import MNIST_NPZ

    print("no artifacts/cnn-mnist.keras: training a quick model (run bench/training.py for the full one)")
    return train_here(ROOT / "bench" / "work" / "quick-model", MNIST_NPZ, epochs=2, limit=20000)



def machine():
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}"}  # fmt: skip


def save_result(name, figures):
    RESULTS.mkdir(exist_ok=True)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    record = {"benchmark": name, "when": when, "machine": machine(), **figures}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return record
