"""What the server expects each node to hold: the bound on the `num-examples` it claims.

Where the nodes hold the configured split (`examples-from-split`: simulation, the embedded
partitions, `clients.prepare_data` folders), the server cuts the same split itself, with
flwr-datasets' partitioner built from the recipe the ClientApp uses
(`fedprune.data.partitioner_recipe`; kept on disk for the nodes of this machine,
`fedprune.partition_cache`), and bounds each node by the size of the partition its
client id names. The split is cut for the number of partitions most nodes report (their
data is cut by it), so one node that lies about it changes nothing. `max-examples-per-node`
bounds every node besides (and is the only bound for nodes holding their own data).
"""

from __future__ import annotations

from collections import Counter
from logging import INFO, WARNING

from flwr.common.logger import log

from fedprune.identities import Identities
from fedprune.partition_cache import partition_sizes
from fedprune.sample_counts import ExampleBounds
from fedprune.settings import Settings


def _partitioner_classes():
    """flwr-datasets' partitioners, imported only when the split is not in this machine's
    cache (`fedprune.partition_cache`): the package takes about 3 s of a core to import."""
    import flwr_datasets.partitioner

    return flwr_datasets.partitioner


def split_size(identities: Identities) -> int:
    """The number of partitions the nodes' data is cut by: the value most nodes report
    (the smaller on a tie), else the server's `num-clients`, else 0 (unknown)."""
    counts = Counter(identities.reported_size.values())
    if counts:
        return min(counts, key=lambda size: (-counts[size], size))
    return identities.num_clients


def example_bounds(settings: Settings, identities: Identities) -> ExampleBounds:
    """The bounds of this run: each partition's size when the nodes hold the configured
    split and it can be cut here, and `max-examples-per-node` for every node."""
    expected: dict[int, int] = {}
    n = split_size(identities)
    if settings.examples_from_split and n:
        try:
            expected = partition_sizes(settings.data_spec(), n, _partitioner_classes)
        except (ValueError, OSError) as exc:
            log(WARNING, "[fedprune] cannot cut the configured split into %d partitions (%s): "
                "num-examples is bounded by max-examples-per-node only", n, exc)  # fmt: skip
        else:
            log(INFO, "[fedprune] num-examples bounded by each node's partition of the split: "
                "%d to %d examples", min(expected.values()), max(expected.values()))  # fmt: skip
    return ExampleBounds(expected, settings.max_examples_per_node)
