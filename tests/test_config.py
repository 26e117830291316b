"""The config file's `engine:` section: known keys, each of its default's type, named when wrong."""

from __future__ import annotations

import pytest

from fundament.config import ServeConfig
from fundament.errors import InvalidRequestError


def write(tmp_path, text: str):
    path = tmp_path / "fundament.yaml"
    path.write_text(text)
    return path


def test_engine_settings_load_with_their_types(tmp_path):
    cfg = ServeConfig.from_yaml(write(tmp_path, "engine:\n  native_decode: no\n  threads: null\n  max_num_seqs: 8\n  dtype: float32\n"))
    assert (cfg.engine.native_decode, cfg.engine.threads, cfg.engine.max_num_seqs, cfg.engine.dtype) == (False, None, 8, "float32")
    assert cfg.engine.int8_decode is True  # left out: its default


@pytest.mark.parametrize("text, param, words", [
    ('engine:\n  native_decode: "no"\n', "engine.native_decode", "must be bool, got 'no'"),
    ("engine:\n  max_num_seqs: 8.5\n", "engine.max_num_seqs", "must be int, got 8.5"),
    ("engine:\n  max_num_seqs: true\n", "engine.max_num_seqs", "must be int, got True"),
    ("engine:\n  threads: two\n", "engine.threads", "must be int or null, got 'two'"),
    ("engine:\n  native: true\n", "engine.native", "unknown engine setting 'native'"),
    ("engine: fast\n", "engine", "engine must be a mapping"),
])
def test_a_wrong_engine_setting_is_named(tmp_path, text, param, words):
    with pytest.raises(InvalidRequestError) as e:
        ServeConfig.from_yaml(write(tmp_path, text))
    assert e.value.param == param and words in str(e.value)
