"""Speech transcription: the speech detector's pieces, the decoder fed by our own encoder (a tiny random
Whisper converted by CTranslate2's converter), and, slow, the packaged model on espeak-ng speech against a
drum hit."""

from __future__ import annotations

import glob
import json
import logging
import shutil
import subprocess

import numpy as np
import pytest
import torch

from mm.speech import SpeechGate, Transcriber, is_loop, voiced_seconds

SR = 16000
SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|fr|>",
    "<|transcribe|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


def test_voiced_seconds_separates_tones_from_noise_and_silence():
    t = np.arange(SR) / SR
    voiced = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.1 * np.sin(2 * np.pi * 360 * t)
    assert voiced_seconds(voiced.astype(np.float32)) == pytest.approx(0.98, abs=0.03)
    noise = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.3
    assert voiced_seconds(noise) < 0.05
    assert voiced_seconds(np.zeros(SR, np.float32)) == 0.0
    assert voiced_seconds(np.zeros(10, np.float32)) == 0.0  # shorter than one frame
    half = np.concatenate([voiced[: SR // 2], np.zeros(SR // 2)]).astype(np.float32)
    assert voiced_seconds(half) == pytest.approx(0.48, abs=0.04)


@pytest.mark.parametrize(
    ("text", "loop"),
    [
        ("Ha ha ha ha ha ha", True),
        ("BEEEEEEEEEE", True),
        ("Grrrr! Grrrr! Grrrr!", True),
        ("No! No!", True),
        ("The quick brown fox.", False),
        ("7", False),
        ("Where is the nearest train station?", False),
        ("un cola", False),
    ],
)
def test_is_loop(text, loop):
    assert is_loop(text) is loop


@pytest.fixture(scope="module")
def tiny_ct2(tmp_path_factory):
    """A tiny random multilingual Whisper in CTranslate2's format, with a word-level tokenizer.json."""
    import tokenizers
    import transformers  # pinned dependencies, as ctranslate2 is: missing is a break, not a skip
    from ctranslate2.converters.transformers import WhisperLoader

    words = [f"w{i}" for i in range(57)]
    vocab = words + SPECIALS  # 64 tokens
    cfg = transformers.WhisperConfig(
        vocab_size=len(vocab),
        num_mel_bins=80,
        d_model=16,
        encoder_layers=2,
        encoder_attention_heads=2,
        decoder_layers=1,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=57,
        bos_token_id=57,
        eos_token_id=57,
        decoder_start_token_id=58,
    )
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    spec = WhisperLoader().get_model_spec(model)
    spec.config.suppress_ids, spec.config.suppress_ids_begin = [], []
    spec.config.lang_ids = [vocab.index("<|en|>"), vocab.index("<|fr|>")]
    spec.config.alignment_heads = [(0, 0)]
    spec.register_vocabulary(vocab)
    spec.validate()
    spec.optimize(quantization=None)
    folder = tmp_path_factory.mktemp("tiny_ct2_whisper")
    spec.save(str(folder))
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="w0")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text())}))
    return folder


def _voiced_clip(seconds: float = 1.5) -> tuple[np.ndarray, int]:
    t = np.arange(int(seconds * SR)) / SR
    return ((0.3 * np.sin(2 * np.pi * 150 * t)) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32), SR


def test_our_encoder_drives_the_ctranslate2_decoder(tiny_ct2):
    """encoder="torch" (our module's output into CTranslate2's decoder) decodes what CTranslate2's own
    encoder does, on a window shorter than 30 s, language detection included."""
    everything = SpeechGate(
        min_voiced_seconds=0.0, max_no_speech_prob=1.0, min_avg_logprob=-np.inf, max_repeat_ratio=0.0
    )
    clip = _voiced_clip()
    a = Transcriber(tiny_ct2, compute_type="float32", window_seconds=4, encoder="ct2", gate=everything)
    b = Transcriber(tiny_ct2, compute_type="float32", window_seconds=4, encoder="torch", gate=everything)
    assert a.features(clip[0]).shape == (1, 80, 400)  # 4 s window, not 30 s
    ta, tb = a.transcribe(clip), b.transcribe(clip)
    assert ta is not None and tb is not None
    assert ta.language in ("en", "fr") and ta.language == tb.language
    assert ta.text == tb.text and ta.text  # random weights: some words, the same ones
    assert ta.avg_logprob == pytest.approx(tb.avg_logprob, abs=1e-3)
    assert ta.no_speech_prob == pytest.approx(tb.no_speech_prob, abs=1e-3)
    forced = a.transcribe(clip, language="fr")
    assert forced is not None and forced.language == "fr" and forced.language_prob == 1.0


def test_gate_rejects_before_and_after_decoding(tiny_ct2):
    t = Transcriber(
        tiny_ct2,
        compute_type="float32",
        window_seconds=2,
        gate=SpeechGate(min_avg_logprob=-np.inf, max_no_speech_prob=1.0, max_repeat_ratio=0.0),
    )
    noise = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.3
    assert t.transcribe((noise, SR)) is None  # stage 1: nothing voiced, the model never runs
    strict = Transcriber(
        tiny_ct2, compute_type="float32", window_seconds=2, gate=SpeechGate(min_avg_logprob=0.0)
    )
    assert strict.transcribe(_voiced_clip()) is None  # stage 2: no transcript is that certain
    with pytest.raises(ValueError, match="encoder"):
        Transcriber(tiny_ct2, encoder="onnx")


ESPEAK = shutil.which("espeak-ng")
DRUMS = sorted(
    glob.glob("/usr/share/sonic-pi/samples/drum_cymbal_*.flac")
    + glob.glob("/usr/share/sonic-pi/samples/drum_tom_*.flac")
)


@pytest.mark.slow
def test_packaged_base_transcribes_speech_and_skips_drums(tmp_path):
    if ESPEAK is None or not DRUMS:
        pytest.skip("needs Debian espeak-ng and sonic-pi-samples")
    t = Transcriber("base")  # the packaged Whisper base is a pinned dependency
    wav = tmp_path / "q.wav"
    subprocess.run([ESPEAK, "-v", "en", "-w", str(wav), "Where is the nearest train station?"], check=True)
    got = t.transcribe(wav)
    assert got is not None and got.language == "en"
    assert "train station" in got.text.lower()
    assert all(t.transcribe(d) is None for d in DRUMS[:4])


def _write_wav(path, wave: np.ndarray, rate: int = SR):
    import soundfile as sf

    sf.write(str(path), wave, rate)
    return path


def test_ingest_keeps_transcripts_of_speech_and_survives_a_failing_recogniser(tmp_path, embedder):
    """index.ingest with a recogniser: speech gets extra["transcript"] (found by the lexical index), a clip
    without speech gets none, a recogniser that raises costs only the transcript."""
    from index.collection import Collection
    from index.ingest import ingest, ingest_one

    folder = tmp_path / "media"
    folder.mkdir()
    t = np.arange(SR) / SR
    _write_wav(folder / "speech.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
    _write_wav(folder / "drum.wav", (0.3 * np.sin(2 * np.pi * 90 * t) * np.exp(-8 * t)).astype(np.float32))
    seen = []

    def transcribe(payload):
        wave, rate = payload
        seen.append((len(wave), rate))
        return {"text": " a barking dog ", "language": "en"} if len(seen) == 1 else None

    with Collection.create(tmp_path / "c", dim=embedder.dim, embedder_id=embedder.model_id) as coll:
        report = ingest(
            coll,
            embedder,
            [folder / "speech.wav", folder / "drum.wav"],
            workers=1,
            progress=False,
            transcribe=transcribe,
        )
        assert report.added == 2 and len(seen) == 2 and seen[0][1] == embedder.media.sample_rate
        speech = coll.find_by_uri(str((folder / "speech.wav").resolve()))
        drum = coll.find_by_uri(str((folder / "drum.wav").resolve()))
        assert speech.extra["transcript"] == {"text": "a barking dog", "language": "en"}
        assert "transcript" not in drum.extra
        hits = coll.lexical_search("barking")
        assert [h.id for h in hits] == [speech.id]
        from service.search import hit_to_dict, item_to_dict

        assert hit_to_dict(hits[0])["transcript"] == {"text": "a barking dog", "language": "en"}
        assert item_to_dict(drum)["transcript"] is None  # results and items say what was heard, or null

        def broken(payload):
            raise RuntimeError("recogniser crashed")

        _write_wav(folder / "other.wav", (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32))
        item = ingest_one(coll, embedder, folder / "other.wav", transcribe=broken)
        assert item.id > 0 and "transcript" not in item.extra


def test_cli_no_transcribe_and_env_switch(monkeypatch, caplog):
    from service.transcription import LazyTranscriber, transcription_enabled

    monkeypatch.delenv("MM_TRANSCRIBE", raising=False)
    assert transcription_enabled() and not transcription_enabled(False) and transcription_enabled(True)
    monkeypatch.setenv("MM_TRANSCRIBE", "0")
    assert not transcription_enabled() and transcription_enabled(True)
    missing = LazyTranscriber(model="no-such-model")  # fails to load: ingest goes on without transcripts
    with caplog.at_level(logging.WARNING, logger="service.transcription"):
        assert missing((np.zeros(SR, np.float32), SR)) is None
        assert missing((np.zeros(SR, np.float32), SR)) is None
    warned = [r.getMessage() for r in caplog.records if "not transcribed" in r.getMessage()]
    assert len(warned) == 1 and "unknown packaged Whisper model 'no-such-model'" in warned[0]


def test_spoken_query_is_fused_with_its_transcript_and_says_what_was_heard(tmp_path, embedder, monkeypatch):
    """service.search: an audio query through an embedder with a recogniser searches by
    normalise(clip + w * transcript) and the answer carries "heard"; without speech, the clip alone."""
    from index.collection import Collection
    from service import search
    from service.schemas import QueryMedia, SearchQuery

    t = np.arange(SR) / SR
    clip = _write_wav(tmp_path / "q.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
    query = SearchQuery(media=QueryMedia("audio", clip))
    with Collection.create(tmp_path / "c", dim=embedder.dim, embedder_id=embedder.model_id) as coll:
        from index.ingest import add_text

        dog, car = add_text(coll, embedder, "a barking dog"), add_text(coll, embedder, "a red car")
        audio = embedder.encode_audio([(load_wave(clip), SR)])[0]
        plain = search.answer(query, embedder, coll)  # no recogniser attached: the clip alone
        assert plain.heard is None and "heard" not in plain.to_dict()
        monkeypatch.setattr(
            embedder, "transcribe", lambda payload: {"text": "a red car", "language": "en"}, raising=False
        )
        spoken = search.answer(query, embedder, coll)
        assert spoken.heard == {"text": "a red car", "language": "en"}
        assert spoken.to_dict()["heard"] == spoken.heard and spoken.hits[0].id == car.id
        from mm.speech import SPOKEN_TEXT_WEIGHT

        fused = audio + SPOKEN_TEXT_WEIGHT * embedder.encode_text(["a red car"])[0]
        np.testing.assert_allclose(
            search.embed(query, embedder, coll).vector, fused / np.linalg.norm(fused), atol=1e-5
        )
        monkeypatch.setattr(embedder, "transcribe", lambda payload: None)  # no speech: clip alone
        assert search.answer(query, embedder, coll).heard is None
        np.testing.assert_allclose(search.query_vector(query, embedder, coll), audio, atol=1e-5)

        def broken(payload):
            raise RuntimeError("recogniser crashed")

        monkeypatch.setattr(embedder, "transcribe", broken)
        assert search.answer(query, embedder, coll).heard is None  # the search still answers
        assert dog.id != car.id


def load_wave(path):
    from mm.media import load_audio

    return load_audio(path, target_rate=SR)
