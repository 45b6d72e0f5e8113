"""`mm demo`: build the sample corpus, index it with the default model, show example queries, serve.

Everything lives under one work directory (default ``./demo``): ``corpus/`` (the manifest-backed sample
corpus), ``library/`` (a media folder with ``.txt`` sidecar captions, the way users bring their own
media) and ``collection/`` (the indexed collection). A second run reuses all three and starts in seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Which corpus rows become library items (kept small so that a fresh machine indexes in minutes).
LIBRARY_SOURCES = ("tuxpaint", "sonicpi")
MAX_EMOJI = 300  # a sample of twemoji images
MAX_TEXTS = 300  # captions of held-out stamps as text items


@dataclass
class Example:
    title: str
    kind: str  # "text" | "image" | "audio"
    query: str  # the text, or the path of the query file
    modalities: list[str]


def build_library(corpus: Path, library: Path) -> int:
    """Link (or copy) corpus media into ``library`` with English sidecar captions; returns files placed."""
    from mm.data import read_manifest

    rows = read_manifest(corpus / "manifest.jsonl")
    library.mkdir(parents=True, exist_ok=True)
    placed = 0
    emoji = 0
    texts = 0
    seen: set[str] = set()
    for r in rows:
        if r.get("lang") not in (None, "en") or not r.get("text"):
            continue
        src = r["source"]
        if src == "twemoji":
            if emoji >= MAX_EMOJI:
                continue
            emoji += 1
        elif src not in LIBRARY_SOURCES:
            continue
        for m in ("image", "audio"):
            path = r.get(m)
            if not path or path in seen:
                continue
            seen.add(path)
            dest = library / src / Path(path).name
            placed += _place(Path(path), dest)
            caption = dest.with_suffix(".txt")
            if not caption.exists():
                caption.write_text(r["text"].strip() + "\n")
        if src == "tuxpaint" and r["split"] == "test" and texts < MAX_TEXTS and r.get("image"):
            note = library / "captions" / f"{Path(r['image']).stem}.txt"
            if not note.exists():
                note.parent.mkdir(parents=True, exist_ok=True)
                note.write_text(r["text"].strip() + "\n")
                texts += 1
    return placed


def _place(src: Path, dest: Path) -> int:
    if dest.exists():
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
    return 1


def spoken_query(text: str, out: Path) -> Path | None:
    """Synthesise ``text`` with espeak-ng (a spoken query); None when espeak-ng is not installed."""
    if out.exists():
        return out
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-v", "en", "-s", "150", "-w", str(out), text], check=True, capture_output=True)
    return out


def examples(library: Path, work: Path) -> list[Example]:
    ex = [
        Example("text -> image", "text", "a frog", ["image"]),
        Example("text -> audio", "text", "a drum hit", ["audio"]),
        Example("text -> image", "text", "a guitar", ["image"]),
    ]
    sound_images = sorted(p for p in (library / "tuxpaint").glob("*.png") if p.with_suffix(".ogg").exists())
    if sound_images:
        img = sound_images[0]
        ex.append(Example(f"image -> audio ({img.name})", "image", str(img), ["audio"]))
    # Whisper base hears espeak-ng's short "a cat" as "A cot." and "a frog" as "for log." (any English
    # voice, 120-150 wpm); "a guitar" and "a dog" come through, and the guitar's pictures are its top 4
    spoken = spoken_query("a guitar", work / "queries" / "a_guitar.wav")
    if spoken is not None:
        ex.append(Example("spoken 'a guitar' -> image", "audio", str(spoken), ["image"]))
    return ex


def run_examples(collection: Any, embedder: Any, exs: list[Example], k: int = 3) -> list[dict[str, Any]]:
    """Each example answered by the one search path (``service.search.answer``): a text as ``POST /search``
    answers it, a file as ``POST /search/upload`` does (a spoken clip transcribed and fused when the
    embedder carries a recogniser; ``heard`` says what was heard)."""
    from service.schemas import QueryMedia, SearchQuery
    from service.search import answer

    out = []
    for e in exs:
        if e.kind == "text":
            query = SearchQuery(query=e.query, k=k, modalities=e.modalities)
        else:
            query = SearchQuery(media=QueryMedia(e.kind, e.query), k=k, modalities=e.modalities)
        found = answer(query, embedder, collection)
        out.append(
            {
                "title": e.title,
                "query": e.query,
                "heard": found.heard,
                "results": [
                    {
                        "id": h.id,
                        "score": round(h.score, 3),
                        "modality": h.item.modality,
                        "caption": h.item.caption,
                        "file": Path(h.item.uri).name,
                    }
                    for h in found.hits
                ],
            }
        )
    return out


def _open_collection(coll_dir: Path, embedder: Any, progress: bool) -> Any:
    """The demo's collection, created when missing. It is derived data: after a model update it is
    re-embedded instead of refused (a model of another width still fails, with reembed's message)."""
    from index.collection import META_FILE, Collection
    from service.reembed import reembed

    if not (coll_dir / META_FILE).exists():
        return Collection.create(coll_dir, dim=embedder.dim, embedder_id=embedder.model_id)
    coll = Collection.open(coll_dir)
    if coll.embedder_id != embedder.model_id:
        log.info("the model changed since %s was indexed: re-embedding it", coll_dir)
        try:
            reembed(coll, embedder, progress=progress)
        except BaseException:
            coll.close()
            raise
    return coll


def prepare(work: Path, model: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Corpus, library and collection under ``work`` (reused when present). Returns a summary."""
    from index.ingest import ingest
    from mm.model import create_model, default_model_name
    from service.samples import build_corpus

    corpus, library, coll_dir = work / "corpus", work / "library", work / "collection"
    if not (corpus / "manifest.jsonl").exists():
        log.info("building the sample corpus in %s", corpus)
        build_corpus(corpus, progress=progress)
    build_library(corpus, library)
    from service.transcription import LazyTranscriber, transcription_enabled

    embedder = create_model(model or default_model_name())
    if transcription_enabled():  # speech in the library keeps its transcript; spoken examples are fused
        embedder.transcribe = LazyTranscriber()
    coll = _open_collection(coll_dir, embedder, progress)
    report = ingest(coll, embedder, [library], progress=progress, transcribe=embedder.transcribe)
    return {"collection": coll, "embedder": embedder, "report": report}


def demo(
    work: Path,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    serve: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    state = prepare(work, model, progress)
    coll, embedder, report = state["collection"], state["embedder"], state["report"]
    stats = coll.stats()
    print(
        f"collection {coll.path}: {stats['items']} items {json.dumps(stats['by_modality'])}; "
        f"this run added {report.added}, skipped {report.skipped}, failed {report.failed}"
    )
    shown = run_examples(coll, embedder, examples(work / "library", work))
    for ex in shown:
        print(f"\n{ex['title']}: {Path(ex['query']).name if os.sep in ex['query'] else repr(ex['query'])}")
        if ex["heard"] is not None:
            print(f"  heard ({ex['heard']['language'] or '?'}): {ex['heard']['text']}")
        for i, r in enumerate(ex["results"], 1):
            print(f"  {i}. {r['score']:.3f} [{r['modality']}] {r['caption'] or ''} ({r['file']})")
    if serve:
        import uvicorn

        from service.app import create_app
        from service.settings import Settings

        coll.close()
        settings = Settings(
            collection=coll.path, model=model or _model_name(embedder), allowed_roots=[work / "library"]
        )
        print(f"\nserving on http://{host}:{port}/ (API docs at /docs); Ctrl-C to stop")
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
    return shown


def _model_name(embedder: Any) -> str:
    from mm.model import default_model_name

    return default_model_name() if embedder.name in ("default", "small") else embedder.name
