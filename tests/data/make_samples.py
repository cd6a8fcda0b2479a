"""Write the small data samples the tests read, from the full public data sets.

    python tests/data/make_samples.py PATH/TO/data   # a folder laid out as below

The samples are committed, so the tests never need this script or the full data; it documents
where each row came from and can regenerate them. Rows are drawn at random with a fixed seed, so
each sample has the full set's classes and lengths.
"""

import csv
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0


def sample(rows, n, seed=SEED):
    rows = list(rows)
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def csv_sample(source: Path, target: Path, n: int, delimiter: str = ","):
    with source.open(newline="") as f:
        header, *rows = list(csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else 0))
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator="\n",
                            quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        writer.writerows([header, *sample(rows, n)])


def parallel_sample(source: Path, target: Path, split: str, n: int):
    en = (source / f"{split}.en").read_text().splitlines()
    de = (source / f"{split}.de").read_text().splitlines()
    assert len(en) == len(de)
    pairs = sample(zip(en, de), n)
    target.mkdir(parents=True, exist_ok=True)
    name = "test" if split.startswith("test") else split
    (target / f"{name}.en").write_text("".join(e + "\n" for e, _ in pairs))
    (target / f"{name}.de").write_text("".join(d + "\n" for _, d in pairs))


def main(data: Path):
    csv_sample(data / "classification/banking77/train.csv", HERE / "banking77/train.csv", 1600)
    csv_sample(data / "classification/banking77/test.csv", HERE / "banking77/test.csv", 400)
    csv_sample(data / "classification/sst2/train.tsv", HERE / "sst2/train.tsv", 512, delimiter="\t")
    csv_sample(data / "classification/sst2/test.tsv", HERE / "sst2/test.tsv", 256, delimiter="\t")
    for split, n in (("train", 400), ("val", 100), ("test_2016_flickr", 100)):
        parallel_sample(data / "translation/multi30k", HERE / "multi30k", split, n)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
