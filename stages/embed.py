"""Stage ``embed@<backbone>``: query, gallery and validation embeddings, before and after fine-tuning.

    python -m stages.embed --model models/resnet50.pt --split data/split --arrays data/arrays/resnet50 \
        --out data/embeddings/resnet50

Writes ``{before,after}_{query,gallery,val}.npy`` (float32, one row per row of
the split's ``query.parquet`` / ``gallery.parquet`` / ``val.parquet``),
``{query,gallery,val}.parquet`` (crop path, file name, identity: the index of
those rows) and ``threshold.json``, the model's verdict threshold record
(:func:`facesearch.nets.contract.model_threshold`; null for a model without one), so
that evaluate needs the embeddings only, not the model file. "after" is the
trained model; "before" is the same backbone as training started it (ImageNet
weights, or the seeded random network under ``weights: none``), rebuilt from
the config and seed saved in the model file. Batched, without gradients, bf16
on CUDA.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from facesearch.data import manifest as M
from facesearch.data.packing import load_array
from facesearch.io import atomic_dir, write_json_atomic, write_parquet_atomic
from facesearch.nets.contract import model_preprocessing, model_threshold
from facesearch.nets.inference import embed_array
from facesearch.nets.models import ModelConfig, ModelFileError, failure_line, load_model, resolve_device, seeded_model
from facesearch.params import load_params
from facesearch.threads import use_usable_cpus

log = logging.getLogger("facesearch.embed")

# The validation identities' images are embedded too: evaluate calibrates the verdict
# threshold of each state on them (never on the test identities of query/gallery).
SETS = ("query", "gallery", "val")
INDEX_COLUMNS = (M.CROP_PATH, M.FILE_NAME, M.IDENTITY)


def untrained_twin(payload: dict) -> torch.nn.Module:
    """The network of a saved model as it was before fine-tuning."""
    return seeded_model(ModelConfig(**payload["config"]), payload["train_config"]["seed"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="trained model, models/<backbone>.pt")
    parser.add_argument("--split", required=True, help="folder with query/gallery/val .parquet")
    parser.add_argument("--arrays", required=True, help="folder with the packed query/gallery/val .npy")
    parser.add_argument("--out", required=True, help="folder to write (replaced whole)")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    try:
        embed(args)
    except (ModelFileError, OSError) as exc:  # a missing or unusable model, split or arrays: why, in one line
        raise SystemExit(f"embed: {failure_line(exc)}") from None


def embed(args: argparse.Namespace) -> None:
    params = load_params(args.params)["embed"]
    device = resolve_device(params["device"])
    use_usable_cpus()
    after, payload = load_model(args.model, map_location=device)
    if "seed" not in (payload.get("train_config") or {}):
        # "before" is rebuilt from the training seed: a model the train stage did not write has none.
        raise SystemExit(f"embed: {args.model} has no training record (train_config): write it with the train stage")
    cl = torch.channels_last
    models = {
        "after": after.to(device, memory_format=cl),
        "before": untrained_twin(payload).to(device, memory_format=cl),
    }
    face, size = model_preprocessing(payload)
    with atomic_dir(args.out) as tmp:
        write_json_atomic(tmp / "threshold.json", model_threshold(payload))
        # What each state is, for evaluate's details and the results table: "before" is the
        # network training started from, untrained when its weights were random.
        weights = payload["config"].get("weights")
        write_json_atomic(tmp / "states.json", {state: M.state_label(state, weights) for state in models})
        for name in SETS:
            table = pd.read_parquet(Path(args.split) / f"{name}.parquet")
            # Packed from the crops this model was trained on, at least at its input side.
            images = load_array(Path(args.arrays) / f"{name}.npy", len(table), crop_side=face.size, min_side=size)
            write_parquet_atomic(tmp / f"{name}.parquet", table.loc[:, list(INDEX_COLUMNS)])
            for state, model in models.items():
                emb = embed_array(model, images, size, device, params["batch"], amp=True,
                                  channels_last=True, desc=f"{state} {name}")  # fmt: skip
                np.save(tmp / f"{state}_{name}.npy", emb.astype(np.float32))
                log.info("%s %s: %s", state, name, emb.shape)


if __name__ == "__main__":
    main()
