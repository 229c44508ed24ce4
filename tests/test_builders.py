"""Contracts shared by every manual-download builder: clear errors, names, config naming.

Per-dataset tests (tiny fixtures in the real raw formats) live in tests/test_builder_*.py.
"""

import socket

import pytest
import tensorflow_datasets as tfds

from mcr_jax.data.builders import CremaD, ManualDirError
from mcr_jax.data.builders.common import config_name
from mcr_jax.data.builders.cremad import CremaDConfig
from mcr_jax.data.dataset import BUILDERS, get_builder_class
from mcr_jax.data.tfds_source import load_tfds_dataset

# dataset → a file or directory its error must name when the manual directory is empty.
EXPECTED_NAMED = {
    "cremad": "AudioWAV",
    "ave": "Annotations.txt",
    "mosi": "mosi_data.pkl",
    "mosei": "mosei_senti_data.pkl",
    "ucf101": "classInd.txt",
}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_every_dataset_is_covered():
    assert set(BUILDERS) == set(EXPECTED_NAMED)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMED))
def test_missing_manual_dir_names_directory_and_layout(name, tmp_path):
    missing = tmp_path / "not_there"
    with pytest.raises(ManualDirError) as err:
        load_tfds_dataset(BUILDERS[name], data_dir=tmp_path / "tfds", manual_dir=missing)
    msg = str(err.value)
    assert str(missing) in msg and EXPECTED_NAMED[name] in msg and "datasets_manual.md" in msg
    assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").rglob("*.array_record*"))


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMED))
def test_incomplete_manual_dir_names_what_is_missing(name, tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "unrelated.txt").write_text("x")
    with pytest.raises(ManualDirError, match=EXPECTED_NAMED[name]) as err:
        load_tfds_dataset(BUILDERS[name], data_dir=tmp_path / "tfds", manual_dir=tmp_path / "raw")
    assert str(tmp_path / "raw") in str(err.value)


def test_a_name_instead_of_a_builder_class_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="get_builder_class"):
        load_tfds_dataset("cremad", data_dir=tmp_path)


def test_not_built_and_no_manual_dir(tmp_path):
    with pytest.raises(ManualDirError, match="manual_dir") as err:
        load_tfds_dataset(CremaD, data_dir=tmp_path)
    assert str(tmp_path) in str(err.value) and "AudioWAV" in str(err.value)


def test_tfds_path_also_gives_a_manual_dir_error(tmp_path):
    """Building through TFDS directly (no pre-check) still raises our error, not an AssertionError."""
    (tmp_path / "empty").mkdir()
    builder = CremaD(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    with pytest.raises(ManualDirError, match="AudioWAV") as err:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "empty")))
    assert str(tmp_path / "empty") in str(err.value)


def test_builder_names():
    assert get_builder_class("CremaD") is CremaD and get_builder_class("mcr_cremad") is CremaD
    assert get_builder_class("UCF-101") is BUILDERS["ucf101"]
    with pytest.raises(ValueError, match="unknown dataset 'kinetics'"):
        get_builder_class("kinetics")
    assert len({cls.name for cls in BUILDERS.values()}) == len(BUILDERS)


def test_options_name_the_config(tmp_path):
    assert config_name(CremaDConfig, {}) == "default"
    assert config_name(CremaDConfig, {"fold": 2, "frame_size": 224}) == "fold2"
    assert config_name(CremaDConfig, {"val_fraction": 0.25, "split_mode": "random"}) == (
        "split_moderandom-val_fraction0p25")
    b = CremaD(data_dir=str(tmp_path), frame_size=32, fold=1)
    assert b.builder_config.name == "fold1-frame_size32" and b.builder_config.frame_size == 32
    assert str(tmp_path) in str(b.data_dir) and "fold1-frame_size32" in str(b.data_dir)
    assert CremaD(data_dir=str(tmp_path)).builder_config.name == "default"
    with pytest.raises(ValueError, match="not both"):
        CremaD(data_dir=str(tmp_path), config="default", fold=1)


def test_parse_option():
    from mcr_jax.data.build import parse_option

    assert parse_option("fold=2") == ("fold", 2)
    assert parse_option("val_fraction=0.25") == ("val_fraction", 0.25)
    assert parse_option("skip_incomplete=True") == ("skip_incomplete", True)
    assert parse_option("split_mode=random") == ("split_mode", "random")
    with pytest.raises(ValueError, match="key=value"):
        parse_option("fold")
