"""Search your own photos: ``python -m facesearch index build|add|remove|info`` and ``search``.

    python -m facesearch index build --model models/resnet50.pt --photos ~/Pictures --out photos.index
    python -m facesearch index add --index photos.index --photos ~/Pictures/2025 [--prune]
    python -m facesearch index remove --index photos.index --photos ~/Pictures/2025/blurry.jpg
    python -m facesearch index remove --index photos.index --missing
    python -m facesearch index info --index photos.index [--check] [--json]
    python -m facesearch search --index photos.index me.jpg [more.jpg ...] [--top 9] [--also 4] [--json]

What the commands do is told below by the modules that do it (``index --help`` prints them all):
:mod:`facesearch.gallery.build` (build, add, remove, info), :mod:`facesearch.gallery.people`
(person folders), :mod:`facesearch.gallery.search` (search and its JSON lines) and
:mod:`facesearch.gallery.store` (paths, the index folder, its search structure).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from facesearch.data.celeba import DatasetError
from facesearch.data.layouts import AUTO, GALLERY_LAYOUTS
from facesearch.data.manifest import SchemaError
from facesearch.gallery import build as B
from facesearch.gallery import people as P
from facesearch.gallery import search as S
from facesearch.gallery import store as X
from facesearch.gallery.build import _counts, add, build, info, info_lines, remove
from facesearch.gallery.embedder import PhotoIndexError
from facesearch.gallery.search import ALSO, result_lines, search
from facesearch.gallery.store import DEFAULT_HNSW_THRESHOLD
from facesearch.nets.models import ModelFileError

# ``index --help``: this module's usage lines, then what each part of the index does, from where it is done.
HELP = "\n".join([__doc__, B.__doc__, P.__doc__, S.__doc__, X.__doc__])


def add_parsers(sub) -> None:
    """Register ``index`` (build, add, remove, info) and ``search`` on the ``python -m facesearch`` parser."""
    idx = sub.add_parser("index", help="index every face of your photos (build, add, remove, info)",
                         description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    cmds = idx.add_subparsers(dest="index_command", required=True)
    b = cmds.add_parser("build", help="index every face of every photo under a folder")
    b.add_argument("--model", required=True, help="a trained model, e.g. models/resnet50.pt")
    b.add_argument("--photos", required=True, help="folder of photos (searched recursively)")
    b.add_argument("--out", required=True, help="index folder to create")
    b.add_argument("--hnsw-threshold", type=int, default=DEFAULT_HNSW_THRESHOLD,
                   help="search with FAISS HNSW from this many faces on (default %(default)s)")  # fmt: skip
    b.add_argument("--force", action="store_true", help="replace an existing index at --out")
    a = cmds.add_parser("add", help="add the photos under a folder the index has not seen, follow moved and changed "
                                    "ones")  # fmt: skip
    a.add_argument("--index", required=True)
    a.add_argument("--photos", required=True, help="folder of photos (searched recursively)")
    a.add_argument("--model", default=None, help="the index's model, if it moved (another model is refused)")
    a.add_argument("--prune", action="store_true", help="drop indexed photos under --photos whose file is gone")
    for p in (b, a):
        p.add_argument("--layout", choices=GALLERY_LAYOUTS, default=AUTO,
                       help="folders: <photos>/<person>/*.jpg names people; plain: no names; auto: folders when "
                            "every photo is one folder deep (add inside an indexed root: that root's)")  # fmt: skip
        p.add_argument("--device", default="cpu", help="where to embed (cpu, cuda, auto)")
    r = cmds.add_parser("remove", help="remove photos by path (file or folder) or by the content of a file")
    r.add_argument("--index", required=True)
    r.add_argument("--photos", nargs="+", default=[], metavar="PATH",
                   help="a photo or folder (relative: from the current folder), or a file with a photo's "
                        "content")  # fmt: skip
    r.add_argument("--missing", action="store_true",
                   help="also every photo whose file is gone or changed (moved ones are followed)")  # fmt: skip
    i = cmds.add_parser("info", help="people, faces, photos, model and threshold of an index")
    i.add_argument("--index", required=True)
    i.add_argument("--json", action="store_true")
    i.add_argument("--check", action="store_true",
                   help="read every indexed photo: report gone, changed and moved ones (exit 1 if any)")  # fmt: skip
    s = sub.add_parser("search", help="find the people in photos in an index")
    s.add_argument("--index", required=True)
    s.add_argument("photos", nargs="+", metavar="PHOTO")
    s.add_argument("--top", type=int, default=9, help="people (or unnamed faces) per face (default %(default)s)")
    s.add_argument("--also", type=int, default=ALSO, help="more faces of a person listed under them (default "
                                                          "%(default)s)")  # fmt: skip
    s.add_argument("--json", action="store_true", help="one JSON object per line and face")
    s.add_argument("--threshold", type=float, default=None, help="similarity for a match (default: the model's)")
    s.add_argument("--fpir", type=float, default=None, help="false matches per search for someone not in the index "
                   "to allow, instead of the model's calibrated target (e.g. 0.001: stricter)")  # fmt: skip
    s.add_argument("--model", default=None, help="the index's model, if it moved (another model is refused)")


# The expected failures of an index command: each is one line and a non-zero exit, never a traceback.
EXPECTED = (PhotoIndexError, ModelFileError, SchemaError, DatasetError, OSError)


def main(args: argparse.Namespace) -> None:
    name = " ".join(x for x in (args.command, getattr(args, "index_command", None)) if x)
    try:
        code = _run(args)
    except EXPECTED as exc:
        raise SystemExit(f"{name}: {' '.join(str(exc).split())}") from None
    if code:
        raise SystemExit(code)


def _run(args: argparse.Namespace) -> int:
    if args.command == "search":
        failed: Counter = Counter()
        for line in search(
            args.index, args.photos, args.top, args.threshold, args.model, also=args.also, fpir=args.fpir
        ):
            print(json.dumps(line) if args.json else "\n".join(result_lines(line)), flush=True)
            if line["box"] is None:
                failed[line["verdict"]] += 1
        if failed and sum(failed.values()) == len(args.photos):
            print(f"search: nothing could be searched ({_counts(failed)})", file=sys.stderr)
            return 2
        return 0
    cmd = args.index_command
    if cmd == "info":
        d = info(args.index, check=args.check)
        print(json.dumps(d) if args.json else "\n".join(info_lines(d)))
        c = d.get("check")
        return int(bool(c and (c["missing"] or c["changed"] or c["unreadable"] or c["moved"])))
    if cmd == "build":
        report = build(args.model, args.photos, args.out, args.layout, args.hnsw_threshold, args.force, args.device)
    elif cmd == "add":
        report = add(args.index, args.photos, args.layout, args.model, args.device, prune=args.prune)
    else:
        if not args.photos and not args.missing:
            raise PhotoIndexError("name photos to remove (--photos PATH ...), or --missing")
        report = remove(args.index, args.photos, missing=args.missing)
    print("\n".join(report.lines()))
    return int(cmd == "remove" and bool(report.unmatched) and not report.removed_photos)
