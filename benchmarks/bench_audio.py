"""Audio encoders and speech transcription: speed on 1-5 s clips, speech detection, word accuracy, and the
spoken-query latency.

Clips (decoded once into memory at each encoder's rate, so decoding and resampling files are timed on
their own, ``decode``; each encoder's features are timed with it): speech = espeak-ng English sentences
(one or two sentences, ~2-5 s); non-speech = Sonic Pi drum/percussion samples and Tux Paint animal
sounds, cut to 5 s. Human speech for word accuracy =
Tux Paint's English spoken stamp names (``*_desc.ogg``, single words, reference = the stamp's caption).

Reported, each for speech and non-speech clips separately, one clip at a time (as ingest does),
``clips_per_s`` (wall) and ``clips_per_cpu_s`` (process CPU time, all threads):

- encoders: ``mel`` (the trained log-mel patch encoder at the ``small`` config's settings), ``whisper``
  (Whisper base, our torch module, on each clip's own length; fp32 and int8 = torch dynamic int8
  Linear layers), ``sfx`` (aisfx CNN, fp32; no int8 kernels for its convolutions here);
- transcription (:class:`mm.speech.Transcriber`, Whisper base, 10 s window): ``ct2_int8`` (the
  default), ``ct2_fp32``, ``torch_fp32`` (our encoder's output into CTranslate2's decoder); per mode the
  share of clips given a transcript (speech: should be 1, non-speech: should be 0) and the espeak-ng
  word accuracy (1 - word error rate, mean over clips);
- ``spoken_query_p50_ms`` / ``spoken_query_p95_ms``: a ~3 s espeak-ng question through the service's
  search (``service.search.answer``, as ``/search/upload`` after saving the upload): decode ->
  transcript (default mode) fused with the default model's clip embedding -> k=10 nearest in a small
  collection of sentences, with ``spoken_query_word_accuracy`` at the same settings (and whether the
  question's own text is the top hit) and ``human_word_accuracy`` on the human words.

- ``fusion`` (with the demo collection of ``make demo``): spoken queries for Tux Paint stamps (human
  recordings of their names; espeak-ng readings of their captions) against the stamps' images, R@1 and
  R@10 for the clip alone, fused with its transcript at several weights, and the transcript alone.

Targets (issue 15, 2 cores): spoken-query p95 < 1000 ms for a 3 s clip; transcription (detector
included) >= 10 non-speech clips/s and >= 2 speech clips/s.

Usage: ``python benchmarks/bench_audio.py [--clips 10] [--queries 20] [--human 20] [--threads 1]
[--quick]``; about 2-3 minutes by default on 2 cores; the last line is JSON.
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paths import cache_dir  # noqa: E402

log = logging.getLogger("bench_audio")

SENTENCES = [
    "A dog is barking in the garden.",
    "Show me pictures of a red car.",
    "The cat is sleeping on the sofa.",
    "Where is the nearest train station?",
    "I would like a cup of hot tea.",
    "Find the sound of a ringing bell.",
    "My brother plays the guitar every evening.",
    "The children are swimming in the lake.",
    "Please open the window.",
    "An elephant has a very long trunk.",
    "What makes a croaking sound?",
    "A frog sits on a green leaf.",
]
QUERY = "Show me a photo of a small brown dog playing in the snow."  # ~3 s in espeak-ng
MAX_SECONDS = 5.0


def espeak(text: str, path: Path) -> Path:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("needs Debian espeak-ng (make setup installs it)")
    if not path.exists():
        subprocess.run([exe, "-v", "en", "-w", str(path), text], check=True, capture_output=True)
    return path


def speech_clips(n: int) -> list[tuple[str, Path]]:
    """(reference text, wav): single sentences, then pairs (longer clips), n in all."""
    folder = cache_dir("bench_audio")
    texts = SENTENCES[: max(1, n - n // 3)]
    texts += [f"{a} {b}" for a, b in zip(SENTENCES[::2], SENTENCES[1::2], strict=False)][: n - len(texts)]
    return [
        (t, espeak(t, folder / f"speech_{hashlib.sha1(t.encode()).hexdigest()[:12]}.wav")) for t in texts[:n]
    ]


def nonspeech_clips(n: int) -> list[Path]:
    drums = sorted(
        glob.glob("/usr/share/sonic-pi/samples/drum_*.flac")
        + glob.glob("/usr/share/sonic-pi/samples/perc_*.flac")
    )
    animals = [
        Path(p)
        for p in sorted(glob.glob("/usr/share/tuxpaint/stamps/animals/**/*.ogg", recursive=True))
        if "_desc" not in p and not re.search(r"_[a-z][a-z](_[A-Za-z]+)?\.ogg$", p)
    ]
    if not drums or not animals:
        raise SystemExit(
            "needs Debian sonic-pi-samples and tuxpaint-stamps-default (make setup installs them)"
        )
    half = n // 2
    pick = lambda xs, k: [xs[i * len(xs) // k] for i in range(k)]  # noqa: E731  spread over the list
    return [Path(p) for p in pick(drums, half)] + pick(animals, n - half)


def human_words(n: int) -> list[tuple[str, Path]]:
    out = []
    for p in sorted(glob.glob("/usr/share/tuxpaint/stamps/**/*_desc.ogg", recursive=True)):
        txt = Path(p.replace("_desc.ogg", ".txt"))
        if txt.exists():
            ref = txt.read_text(errors="replace").splitlines()[0]
            out.append((re.sub(r"^(a|an|the)\s+", "", ref.strip(), flags=re.I), Path(p)))
    return [out[i * len(out) // n] for i in range(min(n, len(out)))]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower().replace("-", " "))


def word_accuracy(ref: str, hyp: str | None) -> float:
    """1 - word error rate (Levenshtein over words), floored at 0; no transcript scores 0."""
    r, h = words(ref), words(hyp or "")
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
    return max(0.0, 1.0 - d[len(h)] / max(1, len(r)))


def load(paths: list[Path], rate: int) -> list[tuple[np.ndarray, int]]:
    from mm.media import load_audio

    return [(load_audio(p, target_rate=rate, crop_seconds=MAX_SECONDS), rate) for p in paths]


def bench_decode(paths: list[Path]) -> dict[str, float]:
    """What ingest pays before any encoder: decode + resample to 16 kHz (mm.media.load_audio)."""
    from mm.media import load_audio

    row, _ = timed(lambda p: load_audio(p, target_rate=16000, crop_seconds=MAX_SECONDS), paths)
    return {"ms_per_clip": round(1000 / row["clips_per_s"], 1), **row}


def timed(fn, items: list) -> tuple[dict[str, float], list]:
    fn(items[0])  # warm-up (first-call allocations, lazy tables)
    t0, c0 = time.perf_counter(), time.process_time()
    out = [fn(x) for x in items]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(items)
    return {"clips_per_s": round(n / wall, 2), "clips_per_cpu_s": round(n / max(cpu, 1e-9), 2)}, out


def bench_encoders(clips: dict[int, dict[str, list]], quick: bool) -> dict[str, Any]:
    import torch

    from mm.config import AudioEncoderConfig
    from mm.encoders.audio import LogMelPatchEncoder
    from mm.encoders.sfx import SFXAudioEncoder
    from mm.encoders.whisper import WhisperAudioEncoder
    from mm.model import resolve

    small, _ = resolve("small")
    mel_cfg = (
        small.audio
        if small.audio.kinds == ("logmel_patch",)
        else AudioEncoderConfig(dim=192, max_seconds=5.0)
    )
    whisper = WhisperAudioEncoder("base", max_seconds=MAX_SECONDS)
    whisper_int8 = copy.deepcopy(whisper)
    whisper_int8.quantize_int8()
    encoders = {
        "mel": {"fp32": LogMelPatchEncoder(mel_cfg).eval()},
        "whisper": {"fp32": whisper, "int8": whisper_int8},
        "sfx": {"fp32": SFXAudioEncoder(max_seconds=MAX_SECONDS)},
    }
    res: dict[str, Any] = {}
    for name, variants in encoders.items():
        for dtype, enc in variants.items():

            def run(clip, enc=enc):
                with torch.inference_mode():
                    return enc(enc.prepare([clip])).pooled

            row = {}
            for kind, items in clips[getattr(enc, "sample_rate", 16000)].items():
                row[kind], _ = timed(run, items)
            res.setdefault(name, {})[dtype] = row
            log.info("encoder %s %s: %s", name, dtype, row)
    return res


def bench_transcription(
    speech: list, refs: list[str], nonspeech: list, quick: bool, threads: int
) -> dict[str, Any]:
    from mm.speech import Transcriber

    modes = {"ct2_int8": ("ct2", "int8")}
    if not quick:
        modes |= {"ct2_fp32": ("ct2", "float32"), "torch_fp32": ("torch", "float32")}
    res: dict[str, Any] = {}
    for name, (encoder, compute) in modes.items():
        tr = Transcriber("base", compute_type=compute, encoder=encoder, threads=threads)
        row: dict[str, Any] = {}
        row["speech"], outs = timed(tr.transcribe, speech)
        row["speech"]["transcribed"] = round(float(np.mean([o is not None for o in outs])), 3)
        row["speech"]["word_accuracy"] = round(
            float(
                np.mean([word_accuracy(r, o.text if o else None) for r, o in zip(refs, outs, strict=True)])
            ),
            3,
        )
        row["nonspeech"], outs = timed(tr.transcribe, nonspeech)
        row["nonspeech"]["transcribed"] = round(float(np.mean([o is not None for o in outs])), 3)
        row["nonspeech"]["false_transcripts"] = [o.text for o in outs if o is not None][:5]
        res[name] = row
        log.info("transcription %s: %s", name, row)
    return res


def bench_spoken_query(n: int, n_human: int, threads: int) -> dict[str, Any]:
    """The service's own path (``service.search.answer``): the clip as stored by an upload -> decode ->
    transcript + clip embedding fused -> nearest neighbours in a collection of the sentences as text."""
    import tempfile

    from index.collection import Collection
    from index.ingest import add_text
    from mm.model import create_model, default_model_name
    from mm.speech import Transcriber
    from service.schemas import QueryMedia, SearchQuery
    from service.search import answer

    path = espeak(
        QUERY, cache_dir("bench_audio") / f"query_{hashlib.sha1(QUERY.encode()).hexdigest()[:12]}.wav"
    )
    tr = Transcriber("base", threads=threads)  # default settings: CTranslate2 int8, 10 s window
    embedder = create_model(default_model_name())
    embedder.transcribe = lambda clip: t.to_dict() if (t := tr.transcribe(clip)) else None
    query = SearchQuery(media=QueryMedia("audio", path), k=10)
    with tempfile.TemporaryDirectory(dir=cache_dir("bench_audio")) as tmp:
        coll = Collection.create(Path(tmp) / "c", dim=embedder.dim, embedder_id=embedder.model_id)
        for text in [*SENTENCES, QUERY]:
            add_text(coll, embedder, text)
        answer(query, embedder, coll)  # warm-up
        times, heard, top = [], [], []
        for _ in range(n):
            t0 = time.perf_counter()
            found = answer(query, embedder, coll)
            times.append((time.perf_counter() - t0) * 1000)
            heard.append(found.heard["text"] if found.heard else None)
            top.append(found.hits[0].item.caption if found.hits else None)
        coll.close()
    from mm.media import load_audio

    seconds = len(load_audio(path, target_rate=16000)) / 16000
    humans = human_words(n_human)
    acc = [word_accuracy(ref, (t.text if (t := tr.transcribe(p)) else None)) for ref, p in humans]
    return {
        "spoken_query_p50_ms": round(float(np.percentile(times, 50)), 1),
        "spoken_query_p95_ms": round(float(np.percentile(times, 95)), 1),
        "spoken_query_clip_s": round(seconds, 2),
        "spoken_query_heard": heard[-1],
        "spoken_query_word_accuracy": round(word_accuracy(QUERY, heard[-1]), 3),
        "spoken_query_top_hit_is_its_text": top[-1] == QUERY,
        "human_word_accuracy": round(float(np.mean(acc)), 3) if acc else None,
        "human_words": len(acc),
        "query_model": embedder.name,
    }


def bench_fusion(n_espeak: int, threads: int) -> dict[str, Any]:
    """Spoken queries against the demo collection (``make demo``): each Tux Paint stamp's image is the
    target of its English spoken name (human ``*_desc.ogg``) and of its caption read by espeak-ng;
    R@1/R@10 among images for the clip alone (w=0), the clip fused with its transcript
    (``mm.speech.fuse_spoken``, weight w) and the transcript alone."""
    from benchmarks.paths import ROOT
    from index.collection import Collection
    from index.types import Filter
    from mm.model import create_model, default_model_name
    from mm.speech import SPOKEN_TEXT_WEIGHT, Transcriber, fuse_spoken

    coll_dir, lib = ROOT / "demo" / "collection", (ROOT / "demo" / "library" / "tuxpaint").resolve()
    if not (coll_dir / "collection.json").exists() or not lib.is_dir():
        return {"skipped": "no demo collection (make demo builds it)"}
    embedder = create_model(default_model_name())
    coll = Collection.open(coll_dir, readonly=True)
    if coll.embedder_id != embedder.model_id:
        coll.close()
        return {"skipped": f"the demo collection holds {coll.embedder_id}, not {embedder.model_id}"}
    queries: list[tuple[str, Path, str]] = []
    for p in sorted(glob.glob("/usr/share/tuxpaint/stamps/**/*_desc.ogg", recursive=True)):
        png = lib / (Path(p).name[: -len("_desc.ogg")] + ".png")
        if png.exists():
            queries.append(("human", Path(p), str(png)))
    pngs = [p for p in sorted(lib.glob("*.png")) if p.with_suffix(".txt").exists()]
    rng = np.random.default_rng(0)
    for png in [pngs[i] for i in rng.choice(len(pngs), min(n_espeak, len(pngs)), replace=False)]:
        caption = png.with_suffix(".txt").read_text(errors="replace").splitlines()[0].strip()
        name = f"caption_{hashlib.sha1(caption.encode()).hexdigest()[:12]}.wav"
        queries.append(("espeak", espeak(caption, cache_dir("bench_audio") / name), str(png)))
    tr = Transcriber("base", threads=threads)
    weights: list[float | None] = [0.0, 0.5, 1.0, SPOKEN_TEXT_WEIGHT, 4.0, None]  # None: transcript alone
    ranks: dict[str, dict[str, list[int]]] = {}
    heard: dict[str, int] = {}
    images = Filter(modalities=["image"])
    for kind, path, target in queries:
        clip = embedder.encode_audio([path])[0]
        t = tr.transcribe(path)
        text = embedder.encode_text([t.text])[0] if t is not None else None
        heard[kind] = heard.get(kind, 0) + (t is not None)
        for w in weights:
            if text is None:
                v = clip / np.linalg.norm(clip)
            else:
                v = text / np.linalg.norm(text) if w is None else fuse_spoken(clip, text, w)
            uris = [h.item.uri for h in coll.search(v[None].astype(np.float32), k=10, filter=images)[0]]
            key = "text_only" if w is None else f"w={w:g}"
            ranks.setdefault(kind, {}).setdefault(key, []).append(
                uris.index(target) + 1 if target in uris else 99
            )
    coll.close()
    out: dict[str, Any] = {"default_weight": SPOKEN_TEXT_WEIGHT}
    for kind, by_w in ranks.items():
        out[kind] = {"queries": len(by_w["w=0"]), "transcribed": heard[kind]}
        for key, r in by_w.items():
            arr = np.array(r)
            out[kind][key] = {
                "r1": round(float(np.mean(arr <= 1)), 3),
                "r10": round(float(np.mean(arr <= 10)), 3),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=10, help="speech and non-speech clips each")
    ap.add_argument("--queries", type=int, default=20, help="spoken queries timed")
    ap.add_argument("--human", type=int, default=20, help="human single-word recordings")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and CTranslate2 threads (1: on a shared, oversubscribed machine 2 OpenMP threads "
        "stall each other; a dedicated 2-core machine runs two such workers)",
    )
    ap.add_argument("--fusion", type=int, default=60, help="espeak-ng captions in the fusion test (0: skip)")
    ap.add_argument(
        "--quick", action="store_true", help="4 clips, 5 queries, default transcription mode only"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.clips, args.queries, args.human = 4, 5, 5
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    sp = speech_clips(args.clips)
    refs = [t for t, _ in sp]
    paths = {"speech": [p for _, p in sp], "nonspeech": nonspeech_clips(args.clips)}
    # decoded once per rate an encoder reads, outside the timings (decoding is reported on its own)
    clips = {rate: {k: load(v, rate) for k, v in paths.items()} for rate in (16000, 44100)}
    speech, nonspeech = clips[16000]["speech"], clips[16000]["nonspeech"]
    dur = lambda clips: round(float(np.mean([len(w) / r for w, r in clips])), 2)  # noqa: E731
    result: dict[str, Any] = {
        "clips": {
            "speech": len(speech),
            "speech_mean_s": dur(speech),
            "nonspeech": len(nonspeech),
            "nonspeech_mean_s": dur(nonspeech),
        },
        "threads": args.threads,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    result["decode"] = {k: bench_decode(v) for k, v in paths.items()}
    result["encoders"] = bench_encoders(clips, args.quick)
    result["transcription"] = bench_transcription(speech, refs, nonspeech, args.quick, args.threads)
    result |= bench_spoken_query(args.queries, args.human, args.threads)
    if args.fusion and not args.quick:
        result["fusion"] = bench_fusion(args.fusion, args.threads)
    default = result["transcription"]["ct2_int8"]
    result["targets"] = {
        "spoken_query_p95_under_1000ms": result["spoken_query_p95_ms"] < 1000,
        "nonspeech_transcription_10_per_s": default["nonspeech"]["clips_per_s"] >= 10,
        "speech_transcription_2_per_s": default["speech"]["clips_per_s"] >= 2,
    }
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
