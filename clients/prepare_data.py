"""Write each client's data to its own folder, for devices that cannot download data.

    python -m clients.prepare_data --out data --num-partitions 3

writes `data/partition-0/`, `data/partition-1/`, ... each with `data.npz` (`x`: N images,
uint8 where the pixels allow, `y`: N labels) and `meta.json` (how the partition was made,
and the class count and image shape the model is built for). Copy
`partition-<i>` to device i and start its SuperNode with
`--node-config 'partition-id=<i> num-partitions=<N> data-path="/path/to/partition-<i>"'`:
the ClientApp then reads that folder instead of cutting its partition out of the data set
(the embedded digits, or `--source`), and a device needs no copy of the data source.

The partitions are exactly those a node would take by partition id with the same split
settings (`--dataset`, `--partitioner`, `--seed`, ... must match the run config's
`dataset`, `partitioner`, `seed`, `test-fraction`, `server-fraction`, `dirichlet-alpha`,
`shards-per-client`, `data-source`), so runs with folders and runs without give the same
results. The server's test split and
its own share never go into a client folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clients.partitions import client_partition
from fedprune.data import DATASETS, PARTITIONERS, DataSpec, data_shape, save_folder


def prepare(out: Path, num_partitions: int, spec: DataSpec | None = None) -> list[Path]:
    """Write `out/partition-<i>` for every partition; return the folders."""
    spec = spec or DataSpec()
    if num_partitions < 1:
        raise ValueError("num-partitions must be at least 1")
    num_classes, input_shape = data_shape(spec)
    folders = []
    for pid in range(num_partitions):
        part = client_partition(spec, pid, num_partitions)
        meta = {
            "dataset": spec.dataset,
            "partition-id": pid,
            "num-partitions": num_partitions,
            "examples": len(part),
            "partitioner": spec.partitioner,
            "dirichlet-alpha": spec.dirichlet_alpha,
            "shards-per-client": spec.shards_per_client,
            "test-fraction": spec.test_fraction,
            "server-fraction": spec.server_fraction,
            "seed": spec.seed,
            "source": spec.source,
            "num-classes": num_classes,
            "input-shape": list(input_shape),
        }
        folders.append(save_folder(Path(out) / f"partition-{pid}", part, meta))
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = DataSpec()
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--num-partitions", type=int, required=True)
    parser.add_argument("--dataset", default=d.dataset, choices=DATASETS)
    parser.add_argument("--partitioner", default=d.partitioner, choices=PARTITIONERS)
    parser.add_argument("--dirichlet-alpha", type=float, default=d.dirichlet_alpha)
    parser.add_argument("--shards-per-client", type=int, default=d.shards_per_client)
    parser.add_argument("--test-fraction", type=float, default=d.test_fraction)
    parser.add_argument("--server-fraction", type=float, default=d.server_fraction)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--source",
        default=d.source,
        help="a local copy of the data set (the run's data-source; needed for 'local')",
    )
    args = parser.parse_args(argv)
    spec = DataSpec(
        dataset=args.dataset,
        test_fraction=args.test_fraction,
        server_fraction=args.server_fraction,
        partitioner=args.partitioner,
        dirichlet_alpha=args.dirichlet_alpha,
        shards_per_client=args.shards_per_client,
        seed=args.seed,
        source=args.source,
    )
    for folder in prepare(args.out, args.num_partitions, spec):
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
