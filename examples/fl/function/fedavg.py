"""The federated example's functions: `python -m fedavg train|aggregate|test [io.json]`.

- `train`: logistic regression by full-batch gradient descent on the task's data samples
  (loaded with its data manager's opener), starting from the input model when there is
  one (the previous round's aggregate), else from zero;
- `aggregate`: FedAvg, the input models' parameters averaged with their sample counts as
  weights;
- `test`: the input model's accuracy on the task's samples, written as the PERFORMANCE
  output (a file holding one number).

Everything is read from io.json (its path in `CONSORT_IO`, also the last argument), so the
same script runs in a container and as a plain process. A model is a JSON file:
`{"coef": [...], "intercept": b, "samples": n}` in the raw feature space. Each training
standardizes its own data and maps the parameters in and out of that space, so no
organization ever needs another's statistics.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]
# Few local steps per round (a short local epoch), so that the rounds matter.
STEPS = 5
LEARNING_RATE = 0.5
L2 = 1e-3


def read_io(argv: list[str]) -> dict[str, Any]:
    path = os.environ.get("CONSORT_IO") or argv[-1]
    document: dict[str, Any] = json.loads(Path(path).read_text())
    return document


def input_paths(io: dict[str, Any], identifier: str) -> list[str]:
    return [str(entry["path"]) for entry in io["inputs"] if entry["identifier"] == identifier]


def output_path(io: dict[str, Any], identifier: str) -> Path:
    [path] = [entry["path"] for entry in io["outputs"] if entry["identifier"] == identifier]
    return Path(path)


def load_data(io: dict[str, Any]) -> tuple[Array, Array]:
    """The task's samples, read by its data manager's opener."""
    [opener_path] = input_paths(io, "opener")
    spec = importlib.util.spec_from_file_location("opener", opener_path)
    assert spec is not None and spec.loader is not None
    opener = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(opener)
    features, labels = opener.load(input_paths(io, "datasamples"))
    return np.asarray(features, dtype=np.float64), np.asarray(labels, dtype=np.float64)


def read_model(path: str) -> tuple[Array, float, int]:
    model = json.loads(Path(path).read_text())
    return np.asarray(model["coef"], dtype=np.float64), float(model["intercept"]), \
        int(model["samples"])


def write_model(path: Path, coef: Array, intercept: float, samples: int) -> None:
    path.write_text(json.dumps({"coef": coef.tolist(), "intercept": intercept,
                                "samples": samples}) + "\n")


def sigmoid(t: Array) -> Array:
    result: Array = 1.0 / (1.0 + np.exp(-np.clip(t, -30.0, 30.0)))
    return result


def accuracy(features: Array, labels: Array, coef: Array, intercept: float) -> float:
    predicted = (features @ coef + intercept) > 0
    return float(np.mean(predicted == (labels > 0.5)))


def train(io: dict[str, Any]) -> None:
    features, labels = load_data(io)
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale == 0] = 1.0
    scaled = (features - mean) / scale
    models = input_paths(io, "model")
    if models:
        coef, intercept, _ = read_model(models[0])
        weights, bias = coef * scale, intercept + float(coef @ mean)
    else:
        weights, bias = np.zeros(features.shape[1]), 0.0
    for _ in range(STEPS):
        error = sigmoid(scaled @ weights + bias) - labels
        weights -= LEARNING_RATE * (scaled.T @ error / len(labels) + L2 * weights)
        bias -= LEARNING_RATE * float(error.mean())
    coef = weights / scale
    intercept = bias - float(coef @ mean)
    write_model(output_path(io, "model"), coef, intercept, len(labels))
    print(f"trained on {len(labels)} samples from "
          f"{'the aggregated model' if models else 'zero'}: training accuracy "
          f"{accuracy(features, labels, coef, intercept):.3f}")


def aggregate(io: dict[str, Any]) -> None:
    models = [read_model(path) for path in input_paths(io, "models")]
    counts = np.array([samples for _, _, samples in models], dtype=np.float64)
    coef = np.average(np.stack([c for c, _, _ in models]), axis=0, weights=counts)
    intercept = float(np.average([b for _, b, _ in models], weights=counts))
    write_model(output_path(io, "model"), coef, intercept, int(counts.sum()))
    print(f"averaged {len(models)} models ({int(counts.sum())} samples)")


def test(io: dict[str, Any]) -> None:
    features, labels = load_data(io)
    [model] = input_paths(io, "model")
    coef, intercept, _ = read_model(model)
    score = accuracy(features, labels, coef, intercept)
    output_path(io, "accuracy").write_text(f"{score}\n")
    print(f"accuracy on {len(labels)} test samples: {score:.4f}")


COMMANDS = {"train": train, "aggregate": aggregate, "test": test}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(f"usage: python -m fedavg {{{'|'.join(COMMANDS)}}} [io.json]", file=sys.stderr)
        return 2
    COMMANDS[argv[1]](read_io(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
