"""Training benchmark: a full headless run of the notebook, timed.

    python bench/training.py [--epochs 15] [--data ../shared/data/mnist.npz]

Writes the model to artifacts/ (what `fab local` and the other benchmarks serve)
and bench/results/training.json: wall seconds, test accuracy, per-class accuracy.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DEFAULT_MODEL, save_result
from tasks.config import DEFAULTS
from tasks.local import train_here


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=DEFAULTS["train"]["epochs"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["train"]["batch_size"])
    parser.add_argument("--data", default=DEFAULTS["train"]["data"],
                        help="local mnist.npz (default: found, else download)")
    parser.add_argument("--output", type=Path, default=DEFAULT_MODEL.parent)
    args = parser.parse_args()

    started = time.perf_counter()
    train_here(args.output, args.data, args.epochs, args.batch_size)
    seconds = time.perf_counter() - started
    metrics = json.loads((args.output / "metrics.json").read_text())
    print(f"test accuracy {metrics['test_accuracy']:.4%} in {seconds:.0f} s wall "
          f"({metrics['seconds']:.0f} s in the notebook)")
    save_result("training", {"epochs": args.epochs, "batch_size": args.batch_size, "wall_seconds": round(seconds, 1),
                             "metrics": metrics})  # fmt: skip


if __name__ == "__main__":
    main()
