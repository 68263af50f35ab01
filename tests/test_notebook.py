"""The training notebook (guide: "Training the model on the Working Machine") and Files/9.png.

The `trained_model` fixture (tests/fixtures/model.py) runs the real notebook with
papermill on a subset of MNIST; these tests check what it leaves behind. The error
tests run the notebook too, and fail before any training.
"""
import json
import struct

import numpy as np
import papermill
import pytest
from PIL import Image

from tests.fixtures import MNIST_NPZ, ROOT
from tests.make_sample_digit import draw_nine

NOTEBOOK = ROOT / "Files" / "00-mnist-cnn.ipynb"
SAMPLE_NINE = ROOT / "Files" / "9.png"
OUTPUTS = ("cnn-mnist.keras", "cnn-mnist.tflite", "metrics.json", "training_curves.png", "confusion_matrix.png")


@pytest.fixture(scope="module")
def mnist_digits():
    """The first 100 MNIST test digits in the model's input layout, and their labels."""
    with np.load(MNIST_NPZ) as data:
        return (data["x_test"][:100].astype("float32") / 255.0)[..., None], data["y_test"][:100]


@pytest.fixture(scope="module")
def keras_model(trained_model):
    import keras

    return keras.models.load_model(trained_model / "cnn-mnist.keras")


def tflite_probabilities(path, batch):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    assert source["dtype"] == np.float32 and target["dtype"] == np.float32
    assert list(source["shape_signature"]) == [-1, 28, 28, 1]
    interpreter.resize_tensor_input(source["index"], list(batch.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], batch)
    interpreter.invoke()
    return interpreter.get_tensor(target["index"])


def run_notebook(tmp_path, **parameters):
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "out.ipynb"),
        parameters={"output_dir": str(tmp_path), **parameters},
        kernel_name="python3",
        progress_bar=False,
        cwd=str(tmp_path),
    )


# --- What a training run leaves behind -------------------------------------------


@pytest.mark.slow
def test_run_writes_every_output(trained_model):
    for name in OUTPUTS:
        assert (trained_model / name).stat().st_size > 0, name
    for name in ("training_curves.png", "confusion_matrix.png"):
        header = (trained_model / name).read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n", name
        width, height = struct.unpack(">II", header[16:24])
        assert width >= 400 and height >= 400, (name, width, height)
        with Image.open(trained_model / name) as image:
            image.verify()  # the whole file decodes, not just the header


@pytest.mark.slow
def test_metrics_report_the_run(trained_model):
    metrics = json.loads((trained_model / "metrics.json").read_text())
    for key, kind in {
        "test_accuracy": float, "test_loss": float, "epochs": int, "seconds": float, "per_class_accuracy": list,
        "train_images": int, "seed": int, "tflite_agreement": float, "tflite_max_abs_diff": float,
    }.items():  # fmt: skip
        assert isinstance(metrics[key], kind), (key, metrics[key])
    assert metrics["test_accuracy"] > 0.9  # a brief run; a full one reaches 99.4% or more
    assert metrics["test_images"] == 10_000  # the whole test set, whatever the training subset
    assert 0 < metrics["test_loss"] < 1 and metrics["seconds"] > 0
    assert len(metrics["per_class_accuracy"]) == 10
    assert all(0.5 < a <= 1 for a in metrics["per_class_accuracy"])
    assert metrics["tflite_agreement"] >= 0.99
    assert metrics["tflite_max_abs_diff"] < 1e-3
    assert len(metrics["history"]["accuracy"]) == metrics["epochs"]


@pytest.mark.slow
def test_keras_model_keeps_the_contract(keras_model, mnist_digits):
    x, y = mnist_digits
    assert tuple(keras_model.input_shape) == (None, 28, 28, 1)
    probabilities = np.asarray(keras_model(x[:2], training=False))
    assert probabilities.shape == (2, 10) and probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert (probabilities >= 0).all()
    assert (keras_model.predict(x, verbose=0).argmax(axis=1) == y).mean() > 0.9
    # The augmentation runs in the training pipeline, not in the saved model.
    assert not [layer.name for layer in keras_model.layers if type(layer).__name__.startswith("Random")]


@pytest.mark.slow
def test_tflite_model_keeps_the_contract_and_agrees_with_keras(trained_model, keras_model, mnist_digits):
    x, _ = mnist_digits
    lite = tflite_probabilities(trained_model / "cnn-mnist.tflite", x[:2])
    assert lite.shape == (2, 10)
    assert np.allclose(lite.sum(axis=1), 1, atol=1e-5)
    full = tflite_probabilities(trained_model / "cnn-mnist.tflite", x)
    assert (full.argmax(axis=1) == keras_model.predict(x, verbose=0).argmax(axis=1)).all()
    assert np.abs(full - keras_model.predict(x, verbose=0)).max() < 1e-4


# --- Files/9.png -------------------------------------------------------------------


def test_sample_nine_is_what_the_script_draws():
    with Image.open(SAMPLE_NINE) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (280, 280)
        committed = np.asarray(image, dtype=np.int16)
    drawn = np.asarray(draw_nine(), dtype=np.int16)
    # Equal up to Pillow's rounding between versions.
    assert np.abs(committed - drawn).max() <= 2


@pytest.mark.slow
def test_sample_nine_reads_as_nine(trained_model, keras_model):
    from keras_flask import preprocess  # the back-end's own preprocessing

    digit = preprocess(SAMPLE_NINE.read_bytes())
    assert digit.shape == (28, 28) and digit.dtype == np.float32
    batch = digit[None, ..., None]
    assert keras_model.predict(batch, verbose=0).argmax() == 9
    assert tflite_probabilities(trained_model / "cnn-mnist.tflite", batch).argmax() == 9


# --- Errors: one clear message saying how to pass a local file --------------------


def test_missing_data_file_says_how_to_pass_one(tmp_path):
    missing = tmp_path / "nowhere" / "mnist.npz"
    with pytest.raises(papermill.PapermillExecutionError) as failure:
        run_notebook(tmp_path, data_path=str(missing))
    assert failure.value.ename == "FileNotFoundError"
    assert str(missing) in failure.value.evalue
    assert "data_path" in failure.value.evalue and "papermill" in failure.value.evalue
    assert not (tmp_path / "cnn-mnist.keras").exists()


def test_download_failure_says_how_to_pass_a_local_file(tmp_path, monkeypatch):
    # The default path downloads with keras.datasets.mnist; a proxy on a closed port makes
    # the download fail here even where there is internet. The kernel inherits the environment.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # no cached copy
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(papermill.PapermillExecutionError) as failure:
        run_notebook(tmp_path, epochs=1, limit=100)  # brief, should the download succeed anyway
    assert failure.value.ename == "RuntimeError"
    assert "could not be downloaded" in failure.value.evalue
    assert "data_path" in failure.value.evalue
