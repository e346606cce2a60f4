"""``python -m facesearch check-data DIR``: what a crop run would reject, and why, without detecting.

Before a long run on a new download: lists every entry of the image folder (any
labelled layout, :mod:`facesearch.data.layouts`) the crop stage would reject before
detection, with the same functions the stage uses
(:func:`facesearch.data.layouts.read_dataset`, :func:`facesearch.faces.cropping.pre_reason`
and :func:`facesearch.faces.cropping.inspect_photo`: the entry, the annotations, the
bytes, the decode, the size), the annotation files' problems, and the entries
anywhere under DIR that DVC itself cannot hash: FIFOs (``dvc repro`` and
``dvc status`` block reading them), sockets, devices, dangling or looping
symlinks (they fail). Those stop DVC before the crop stage even starts; remove
them first. Exit status 1 when there are any, else 0.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path

from facesearch.data import manifest as M
from facesearch.data.celeba import file_type_problem, storable_name
from facesearch.data.layouts import AUTO, read_dataset
from facesearch.faces.cropping import CropLimits, inspect_photo, pre_reason


def dvc_blockers(root: str | os.PathLike) -> list[dict]:
    """Entries under ``root`` DVC cannot hash as a dependency: FIFOs, sockets, devices, broken links.

    Walks with ``lstat`` only and does not follow symlinked folders (DVC does not either).
    """
    out = []
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        for raw in sorted(dirnames + filenames):
            path = os.path.join(dirpath, raw)
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue  # vanished meanwhile
            if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                continue
            if stat.S_ISLNK(mode):
                problem, detail = file_type_problem(path)
                if problem is None or "does not resolve" not in detail:
                    continue  # a link to a file or a folder hashes fine
            else:
                detail = file_type_problem(path)[1]
            rel = os.path.relpath(path, base)
            out.append({"path": storable_name(rel), "kind": detail})
    return sorted(out, key=lambda d: d["path"])


def check_data(root: str | os.PathLike, limits: CropLimits, layout: str = AUTO) -> dict:
    """The report ``check-data`` prints (see the module doc); raises DatasetError if the folder is unusable."""
    dataset = read_dataset(root, layout)
    annotations, entries = dataset.annotations, dataset.entries
    files = []
    for entry in entries:
        reason = pre_reason(entry, annotations)
        detail = entry.detail
        if reason is None:
            row: dict = {}
            try:
                inspect_photo(entry.path, limits, row)
            except Exception as exc:  # the stage would count it as error; so does the check
                row[M.REASON] = M.Reason.ERROR.value
                detail = f"{type(exc).__name__}: {exc}"
            reason = row.get(M.REASON)
        if reason is not None:
            files.append({"file_name": entry.name, "reason": str(reason), "detail": detail})
    n_entries = len(entries)
    report = annotations.report
    return {
        "data": str(root),
        "layout": dataset.layout,
        "image_dir": dataset.image_dir,
        "n_entries": n_entries,
        "n_rejected_before_detection": len(files),
        "rejected": dict(sorted(Counter(f["reason"] for f in files).items())),
        "files": files,
        "dvc_blockers": dvc_blockers(root),
        "annotations": {
            "identity_rows": len(annotations.identities),
            "attribute_rows": report.attribute_rows,
            "attribute_header_count": report.attribute_header_count,
            "malformed_rows": dict(sorted(report.malformed_rows.items())),
            "duplicate_rows": dict(sorted(report.duplicate_rows.items())),
            "conflicting_rows": dict(sorted(report.conflicting_rows.items())),
            "ambiguous_identities": sorted(report.ambiguous_identities),
            "missing_files": sorted(report.missing_files),
        },
    }


def format_report(r: dict) -> str:
    lines = [f"{r['data']} ({r['layout']} layout): {r['n_entries']} entries in {r['image_dir']}/, "
             f"{r['n_rejected_before_detection']} would be rejected before detection"]  # fmt: skip
    lines += [f"  {reason:20s} {n}" for reason, n in r["rejected"].items()]
    lines += [f"{f['reason']:20s} {f['file_name']}" + (f"  ({f['detail']})" if f["detail"] else "") for f in r["files"]]
    a = r["annotations"]
    for key in ("malformed_rows", "duplicate_rows", "conflicting_rows"):
        bad = {k: v for k, v in a[key].items() if v}
        if bad:
            lines.append(f"annotations: {key.replace('_', ' ')}: {bad}")
    if a["ambiguous_identities"]:
        lines.append(f"annotations: conflicting identity rows for {len(a['ambiguous_identities'])} names, "
                     f"e.g. {a['ambiguous_identities'][:5]}")  # fmt: skip
    if a["missing_files"]:
        lines.append(f"annotations: missing (optional) {a['missing_files']}")
    if r["dvc_blockers"]:
        lines.append(f"DVC cannot hash {len(r['dvc_blockers'])} entries (dvc repro/status would hang or fail); "
                     "remove them:")  # fmt: skip
        lines += [f"  {b['path']}  ({b['kind']})" for b in r["dvc_blockers"]]
    return "\n".join(lines)


def limits_from_params(path: str | os.PathLike) -> CropLimits:
    """``crop``'s limits in the params file ``path``; the defaults (params.yaml's) when there is no such file.

    So ``check-data DIR`` works outside the repository, where the default ``--params params.yaml`` is absent.
    """
    from facesearch.params import load_params

    if not Path(path).is_file():
        return CropLimits()
    return CropLimits.from_params(load_params(path)["crop"])


def run(root: str, params_path: str = "params.yaml", as_json: bool = False, layout: str = AUTO) -> int:
    """The ``check-data`` command: print the report, return the exit status."""
    report = check_data(Path(root), limits_from_params(params_path), layout)
    print(json.dumps(report, indent=2, sort_keys=True) if as_json else format_report(report))
    return 1 if report["dvc_blockers"] else 0
