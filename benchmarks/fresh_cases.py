"""More held-out cases from the hard synthetic generator, for a trained work dir's accuracy benchmarks.

    python benchmarks/fresh_cases.py --out fresh --num_cases 60 --seed 1
    python benchmarks/precision_accuracy.py --work_dir accuracy_work/work --datalist fresh/datalist.json

benchmarks/accuracy.py holds out 6 cases; a per-case Dice swings by tenths between two equally valid
inference settings on such weak members, so a mean over 6 cannot resolve the 0.002 the issues ask for.
These cases come from another seed than the training ones (accuracy.py's --seed, 0 by default), so none
was trained on; --size_px must be the one the work dir was trained at.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import bench_common  # noqa: F401  (the repository on sys.path)
from autoseg2d.synthetic.hard import write_hard_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the images, labels and datalist.json")
    parser.add_argument("--num_cases", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1, help="not the training cases' seed")
    parser.add_argument("--size_px", type=int, default=128)
    args = parser.parse_args()
    datalist = write_hard_dataset(Path(args.out), num_train=0, num_test=args.num_cases, size_px=args.size_px,
                                  seed=args.seed)
    print(f"{args.num_cases} labelled testing cases: {datalist}")


if __name__ == "__main__":
    main()
