"""Pieces that need no model."""

from __future__ import annotations

import pytest

from serving.model import DEFAULT_MODEL_NAME, resolve_base_model, served_model_name
from serving.sampling import held_back
from serving.schemas import ChatCompletionRequest
from serving.server import parse_adapter_args


def test_held_back_keeps_possible_stop_prefixes():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["world"]) == 0
    assert held_back("abc\n", ["\n\n", "c\nX"]) == 2
    assert held_back("anything", []) == 0


def test_parse_adapter_args():
    assert parse_adapter_args(["a=/x", "b=/y=z"]) == {"a": "/x", "b": "/y=z"}
    for bad in (["a"], ["=x"], ["a="], ["a=/x", "a=/y"]):
        with pytest.raises(ValueError):
            parse_adapter_args(bad)


def test_served_names_and_resolution(tmp_path):
    assert served_model_name("default") == DEFAULT_MODEL_NAME
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text("{}")
    assert served_model_name(str(tmp_path / "my-model")) == "my-model"
    assert resolve_base_model(str(tmp_path / "my-model")) == (tmp_path / "my-model").resolve()
    with pytest.raises(FileNotFoundError):
        resolve_base_model(str(tmp_path / "nope"))


def test_the_gguf_file_is_parsed_once_per_path_within_a_conversion_only(tmp_path):
    import gguf
    import numpy as np

    from serving.model import _gguf_parsed_once

    paths = [tmp_path / "a.gguf", tmp_path / "b.gguf"]
    for path in paths:
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_block_count(2)
        writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        first = gguf.GGUFReader(str(paths[0]))
        assert gguf.GGUFReader(str(paths[0])) is first and gguf.GGUFReader(str(paths[1])) is not first
        assert first.tensors[0].name == "token_embd.weight"
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        assert gguf.get_tensor_name_map(arch, 3) is not gguf.get_tensor_name_map(arch, 2)
        assert gguf.get_tensor_name_map(arch, 2).get_name("model.layers.1.self_attn.q_proj") == "blk.1.attn_q"
    assert gguf.GGUFReader(str(paths[0])) is not gguf.GGUFReader(str(paths[0]))  # outside the block: as it was
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    with pytest.raises(RuntimeError), _gguf_parsed_once():
        raise RuntimeError("a failed conversion")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)


def test_request_schema_defaults_and_conversions():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            ],
            "temperature": None,
            "stop": "END",
        }
    )
    assert req.temperature == 1.0 and req.top_p == 1.0 and not req.stream
    assert req.stop_list() == ["END"]
    assert req.chat() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert req.token_limit() is None


def test_cli_help_runs():
    from serving.server import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
