"""Reading and writing the libraries' checkpoint files: shards, tokenizer.json, and pickles refused unopened."""

import pickle

import pytest
import torch

from polytrain.models.convert.external import read_external, write_external
from polytrain.models.convert.files import TokenizerFiles
from polytrain.models.convert.rules import ConversionError
from tests.models.convert_checks import perturbed

transformers = pytest.importorskip("transformers")

LLAMA = dict(vocab_size=100, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=32)


def llama():
    torch.manual_seed(0)
    return perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)))


class Trap:
    """Unpickling this creates ``path``: proof that a file was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_sharded_weights_are_read_through_their_index(tmp_path):
    hf = llama()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    state = read_external(tmp_path).state
    assert state.keys() == hf.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in hf.state_dict().items())
    shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ConversionError, match=f"{shard.name}: no such file"):
        read_external(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pth", "weights.pt"])
def test_pickled_weights_are_refused_without_being_opened(name, tmp_path):
    folder = tmp_path / "checkpoint"
    llama().config.save_pretrained(folder)
    with open(folder / name, "wb") as f:
        pickle.dump(Trap(tmp_path / "unpickled"), f)
    for path in (folder, folder / name):
        with pytest.raises(ConversionError, match=rf"{name}: pickled weights, .*save_pretrained\(folder, "
                                                  r"safe_serialization=True\).*safetensors\.torch\.save_file"):
            read_external(path, timm_model="vit_small_patch16_224")
    assert not (tmp_path / "unpickled").exists()


def test_the_tokenizer_and_its_special_tokens_travel_with_the_weights(tmp_path):
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "<s>": 2, "</s>": 3}, unk_token="<unk>"))
    hf = llama()
    hf.config.bos_token_id, hf.config.eos_token_id = 2, 3
    hf.save_pretrained(tmp_path / "in")
    tokenizer.save(str(tmp_path / "in" / "tokenizer.json"))
    (tmp_path / "in" / "tokenizer_config.json").write_text('{"unk_token": {"content": "<unk>"}, "pad_token": null}')
    checkpoint = read_external(tmp_path / "in")
    assert checkpoint.tokenizer == tmp_path / "in" / "tokenizer.json"
    assert checkpoint.special == {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}  # from the ids, and the file's names
    files = TokenizerFiles(tokenizer.to_str(), {"bos": ("<s>", 2), "eos": ("</s>", 3), "mask": ("hello", 1)})
    config = write_external(checkpoint.build("lm"), "lm", "LlamaForCausalLM", tmp_path / "out", tokenizer=files)
    assert (config["bos_token_id"], config["eos_token_id"]) == (2, 3) and "mask_token_id" not in config
    assert Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).encode("hello").ids == [1]
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (fast.bos_token, fast.eos_token, fast.mask_token, fast("hello").input_ids) == ("<s>", "</s>", "hello", [1])
    with pytest.raises(ConversionError, match="out: not empty; give a new folder"):
        write_external(checkpoint.build("lm"), "lm", "LlamaForCausalLM", tmp_path / "out")


def test_missing_or_unknown_pieces_are_named(tmp_path):
    with pytest.raises(ConversionError, match="absent: no such file or folder"):
        read_external(tmp_path / "absent")
    with pytest.raises(ConversionError, match=r"config\.json: no such file"):
        read_external(tmp_path)
    llama().config.save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="no model.safetensors or model.safetensors.index.json"):
        read_external(tmp_path)
    (tmp_path / "lone.safetensors").write_bytes(b"")
    with pytest.raises(ConversionError, match="lone weights file has no config; name its timm model"):
        read_external(tmp_path / "lone.safetensors")
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"]}')
    with pytest.raises(ValueError, match="unknown checkpoint family 'LlamaForSequenceClassification'; known: .*"
                                         "BertForMaskedLM.*LlamaForCausalLM.*timm"):
        read_external(tmp_path)
