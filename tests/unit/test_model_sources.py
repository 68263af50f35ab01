"""Which local files `push-model` takes, and under which names the host gets them."""
import pytest
from invoke.exceptions import Exit

from tasks import backend
from tests.fixtures import context


def touch(path, data=b"x"):
    path.write_bytes(data)
    return path


def test_a_file_brings_its_twin_and_both_get_the_served_names(tmp_path):
    lite, keras = touch(tmp_path / "my.tflite"), touch(tmp_path / "my.keras")
    touch(tmp_path / "other.keras")
    assert backend.model_sources(context(), str(lite), False) == {"cnn-mnist.tflite": lite, "cnn-mnist.keras": keras}
    assert backend.model_sources(context(), str(keras), False) == {"cnn-mnist.tflite": lite, "cnn-mnist.keras": keras}


def test_a_folder_gives_its_cnn_mnist_files_and_the_default_is_train_artifacts(tmp_path):
    lite = touch(tmp_path / "cnn-mnist.tflite")
    touch(tmp_path / "notes.txt")
    assert backend.model_sources(context(), str(tmp_path), False) == {"cnn-mnist.tflite": lite}
    assert backend.model_sources(context(train={"artifacts": str(tmp_path)}), None, False) == {"cnn-mnist.tflite": lite}


@pytest.mark.parametrize(("name", "says"), [("model.h5", "takes a .tflite or .keras file"),
                                            ("empty-folder", "no model at")])
def test_what_is_not_a_model_is_refused_before_any_connection(tmp_path, name, says):
    path = tmp_path / name
    path.mkdir() if name == "empty-folder" else touch(path)
    with pytest.raises(Exit) as error:
        backend.model_sources(context(), str(path), False)
    assert says in error.value.message


def test_a_keras_only_model_is_refused_unless_the_back_end_has_tensorflow(tmp_path):
    sources = {"cnn-mnist.keras": touch(tmp_path / "cnn-mnist.keras")}
    with pytest.raises(Exit) as error:
        backend.refuse_keras_only(context(), sources, "train.artifacts")
    assert "has no .tflite" in error.value.message and "backend.keras_fallback" in error.value.message
    backend.refuse_keras_only(context(backend={"keras_fallback": True}), sources, "train.artifacts")


def test_a_model_is_known_by_its_sha256_from_a_file_or_bytes(tmp_path):
    expected = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"  # sha256 of b"x"
    assert backend.digest_of(touch(tmp_path / "m.tflite")) == expected
    assert backend.digest_of(b"x") == expected
