import pytest
import torch

from selfflow.text.build_encoder import build_text_encoder
from selfflow.text.cache import CachedTextEncoder
from selfflow.text.encoder import HFTextEncoder, pad_embeddings
from selfflow.text.tiny import TinyTextEncoder, tokenize


def test_tiny_encoder_is_deterministic_and_word_sensitive():
    enc = TinyTextEncoder(dim=16)
    a, b = enc.encode_unpadded(["a red square moving left", "a red square moving right"])
    assert a.shape == (5, 16) and torch.equal(a[:4], b[:4]) and not torch.allclose(a[4], b[4])
    again = TinyTextEncoder(dim=16).encode_unpadded(["A RED square, moving left!"])[0]
    assert torch.equal(a, again)  # case and punctuation do not matter; a fresh instance agrees
    swapped = enc.encode_unpadded(["red a square moving left"])[0]
    assert not torch.allclose(swapped, a)  # order is visible through the position code
    assert tokenize("a C-major chord") == ["a", "c", "major", "chord"]
    emb, mask = enc.encode(["one two three", ""])
    assert emb.shape == (2, 3, 16) and mask.tolist() == [[True] * 3, [False] * 3]
    assert (emb[1] == 0).all()
    assert pad_embeddings([torch.zeros(0, 4)], 4)[1].shape == (1, 1)  # never an empty context


def test_pad_embeddings_pads_on_the_items_device():
    emb, mask = pad_embeddings([torch.ones(2, 4, device="meta")], 4)  # a training batch arrives on the GPU
    assert emb.device.type == mask.device.type == "meta"


def test_cache_round_trip_and_keying(tmp_path):
    enc = CachedTextEncoder(TinyTextEncoder(8), tmp_path)
    first = enc.encode_unpadded(["a flute", "an organ"])
    assert enc.misses == 2 and enc.hits == 0
    second = enc.encode_unpadded(["an organ", "a flute", "a piano"])
    assert enc.hits == 2 and enc.misses == 3
    assert torch.equal(second[0], first[1]) and torch.equal(second[1], first[0])
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    other = CachedTextEncoder(TinyTextEncoder(8, max_length=1), tmp_path)  # other settings, other key
    assert other.encode_unpadded(["a flute"])[0].shape == (1, 8) and other.misses == 1
    built = build_text_encoder({"kind": "tiny", "dim": 8, "cache_dir": str(tmp_path)})
    assert isinstance(built, CachedTextEncoder) and torch.equal(built.encode_unpadded(["a flute"])[0], first[0])


def _word_tokenizer(path, words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                            eos_token="</s>").save_pretrained(path)


@pytest.mark.parametrize("family", ["t5", "qwen3"])
def test_hf_encoder_from_local_dir(tmp_path, family):
    import transformers

    torch.manual_seed(0)
    if family == "t5":
        cfg = transformers.T5Config(vocab_size=16, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0)
        model = transformers.T5EncoderModel(cfg)
    else:
        cfg = transformers.Qwen3Config(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=4)
        model = transformers.Qwen3Model(cfg)
    model.save_pretrained(tmp_path)
    _word_tokenizer(tmp_path, ["a", "red", "square", "moving", "left"])
    enc = HFTextEncoder(tmp_path, layers=(-2, -1), max_length=8)
    assert enc.dim == 32 and "layers=[-2, -1]" in enc.cache_id
    short, long = enc.encode_unpadded(["a square", "a red square moving left"])
    assert short.shape == (2, 32) and long.shape == (5, 32)
    ids = enc.tokenizer(["a red square moving left"], return_tensors="pt")
    with torch.no_grad():
        hs = model.eval()(**ids, output_hidden_states=True).hidden_states
    assert torch.allclose(long, torch.cat([hs[-2], hs[-1]], -1)[0], atol=1e-5)
    # padding in a batch does not change a caption's embedding
    assert torch.allclose(enc.encode_unpadded(["a square"])[0], short, atol=1e-5)
    # an uncaptioned medium (a tokenizer adding no special tokens makes "" zero tokens): the empty caption,
    # alone or beside a cached caption — it used to crash the model on a (B, 0) batch
    assert [e.shape for e in enc.encode_unpadded(["", ""])] == [(0, 32), (0, 32)]
    both = enc.encode_unpadded(["", "a square"])
    assert both[0].shape[1] == 32 and torch.allclose(both[1], short, atol=1e-5)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        HFTextEncoder(tmp_path / "nope")
    with pytest.raises(ValueError, match="model_dir"):
        build_text_encoder({"kind": "hf"})


def test_under_shapes_only_an_hf_encoder_is_its_config_alone(tmp_path):
    """`selfflow plan` reads the width from config.json, no weights: the shape's cache id is the encoder's, so
    shards prepared with it still match."""
    import transformers

    from selfflow.core.codec import shapes_only
    from selfflow.text.encoder import HFTextEncoderShape

    transformers.T5EncoderModel(transformers.T5Config(vocab_size=16, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                                      num_heads=4, decoder_start_token_id=0)).save_pretrained(tmp_path)
    _word_tokenizer(tmp_path, ["a", "cat"])
    options = {"kind": "hf", "model_dir": str(tmp_path), "layers": [-2, -1], "max_length": 8,
               "cache_dir": str(tmp_path / "cache")}
    with shapes_only():
        shape = build_text_encoder(options)
    real = build_text_encoder(options)
    assert isinstance(shape, HFTextEncoderShape) and (shape.dim, shape.cache_id) == (real.dim, real.cache_id)
    emb, mask = shape.encode(["a cat", "a"])
    assert emb.shape == (2, 8, 32) and mask.all()  # the longest context the run can see
    (tmp_path / "config.json").unlink()
    with shapes_only(), pytest.raises(FileNotFoundError, match=r"Planning reads only that file.*config\.json"):
        build_text_encoder(options)
    assert not (tmp_path / "cache").exists()  # planning writes nothing


def _t5_dir(path, seed):
    import transformers

    torch.manual_seed(seed)
    transformers.T5EncoderModel(transformers.T5Config(vocab_size=16, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                                      num_heads=4, decoder_start_token_id=0)).save_pretrained(path)


def test_other_weights_in_the_same_directory_are_another_encoder(tmp_path):
    """The cache and the shards' record must see a new training (or tokenizer) behind an unchanged config.json:
    the cache used to return the old weights' embeddings."""
    from types import SimpleNamespace

    from selfflow.text.conditioning import CaptionedModalityMixin

    model_dir = tmp_path / "t5"
    _t5_dir(model_dir, seed=0)
    _word_tokenizer(model_dir, ["a", "cat"])
    first = CachedTextEncoder(HFTextEncoder(model_dir), tmp_path / "cache")
    old = first.encode_unpadded(["a cat"])[0]
    assert first.weights_id.startswith("files:") and first.weights_id.endswith(":float32")
    _t5_dir(model_dir, seed=1)  # same config.json, other weights
    second = CachedTextEncoder(HFTextEncoder(model_dir), tmp_path / "cache")
    assert second.cache_id == first.cache_id and second.weights_id != first.weights_id
    new = second.encode_unpadded(["a cat"])[0]
    assert second.misses == 1 and not torch.allclose(new, old)
    _word_tokenizer(model_dir, ["a", "dog"])  # another tokenizer, same weights
    assert HFTextEncoder(model_dir).weights_id != second.weights_id

    modality = CaptionedModalityMixin()
    modality.conditioner = SimpleNamespace(encoder=second)
    modality.check_stored_captions({"text": second.describe()}, "shards/")
    with pytest.raises(ValueError, match=r"shards/ stores caption embeddings of hf:t5.* with weights files:"
                                         r".*the weights, tokenizer or dtype changed since preparation"):
        modality.check_stored_captions({"text": first.describe()}, "shards/")
    legacy = {"cache_id": first.cache_id, "dim": first.dim}  # shards prepared before weights were recorded
    modality.check_stored_captions({"text": legacy}, "shards/")


def test_the_same_encoder_in_a_folder_of_another_name_is_the_same_encoder(tmp_path):
    """Shards prepared with the encoder downloaded to one folder, trained on a machine where it lies in a folder
    of another name: the same config and files — the same encoder. Its cache_id names the folder, and the
    shards' check refused them."""
    import shutil
    from types import SimpleNamespace

    from selfflow.text.conditioning import CaptionedModalityMixin
    from selfflow.text.encoder import model_identity

    _t5_dir(tmp_path / "t5-v1_1-base", seed=0)
    _word_tokenizer(tmp_path / "t5-v1_1-base", ["a", "cat"])
    shutil.copytree(tmp_path / "t5-v1_1-base", tmp_path / "t5")
    prepared, here = HFTextEncoder(tmp_path / "t5-v1_1-base"), HFTextEncoder(tmp_path / "t5")
    assert prepared.cache_id != here.cache_id and model_identity(prepared.cache_id) == model_identity(here.cache_id)
    assert prepared.weights_id == here.weights_id
    modality = CaptionedModalityMixin()
    modality.conditioner = SimpleNamespace(encoder=here)
    modality.check_stored_captions({"text": prepared.describe()}, "shards/")
    name, digest, rest = prepared.cache_id.split(":", 3)[1:]
    other = {**prepared.describe(), "cache_id": f"hf:{name}:{'0' * len(digest)}:{rest}"}  # another config.json
    with pytest.raises(ValueError, match=r"shards/ stores caption embeddings of hf:t5-v1_1-base:0+:"):
        modality.check_stored_captions({"text": other}, "shards/")
    assert model_identity("tiny-hashed-words-v1:dim=8:max=4") == "tiny-hashed-words-v1:dim=8:max=4"
