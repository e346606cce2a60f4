"""Stage ``sample``: render the built-in synthetic data set in the CelebA layout.

    python -m stages.make_sample --out data/sample

Reads ``params.yaml: sample``, and ``execution.n_jobs`` for the number of
rendering workers (how the stage runs, not what it writes: the bytes are the
same for any number, so dvc.yaml does not list it). The output folder is
replaced whole and atomically, so an interrupted run leaves the previous
sample (or none).
"""

from __future__ import annotations

import argparse
import logging

from facesearch.data.synth import SampleSpec, generate_sample
from facesearch.io import atomic_dir
from facesearch.params import load_params

log = logging.getLogger("facesearch.sample")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write (CelebA layout)")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    params = load_params(args.params)
    spec = SampleSpec(**params["sample"])
    n_jobs = (params.get("execution") or {}).get("n_jobs", 1)
    with atomic_dir(args.out) as tmp:
        counts = generate_sample(spec, tmp, n_jobs=n_jobs)
    log.info("wrote %s: %s", args.out, counts)


if __name__ == "__main__":
    main()
