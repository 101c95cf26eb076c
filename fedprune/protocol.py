"""The message layout shared by the server strategy and the ClientApp.

Both sides import these names, so neither imports the other. A train or evaluate message
carries an ArrayRecord under ARRAYS (built by `fedprune.codec`) and a ConfigRecord under
CONFIG; a reply carries an ArrayRecord (train only) and a MetricRecord under METRICS.
"""

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord keys, server -> client
SERVER_ROUND = "server-round"
MASK_VERSION = "mask-version"  # the version of the mask the message's values are laid out by
# Set when the message's masks are changes ("md/"): the version they change, which the node
# must hold exactly (a change applied to another mask could give a wrong mask silently).
MASK_BASE_VERSION = "mask-base-version"
SEND_IMPORTANCE = "send-importance"  # reply with the importance accumulated since last asked
# keep this round's importance on the node for a later SEND_IMPORTANCE round (the paper's
# full participation: nodes accumulate, and upload only when the server reconfigures)
ACCUMULATE_IMPORTANCE = "accumulate-importance"
LEARNING_RATE = "lr"
# The clients a simulation stands for (`simulated-clients`), when its federation has fewer
# nodes: the node trains as the client ids `fedprune.identities.clients_of_node` gives it.
SIMULATED_CLIENTS = "simulated-clients"
# The `value-code` setting (fedprune.value_code). VALUE_BITS: reply with the update
# (trained minus received kept values) quantised to this many bits ("vq/"), not "v/".
# VALUES_VERSION: the values of this train message are the server's reference of that
# version; the node holds them (with the mask) for a later change. VALUES_BASE_VERSION: set
# when the values are quantised changes ("vq/"): the reference version they apply to, which
# the node must hold exactly.
VALUE_BITS = "value-bits"
VALUES_VERSION = "values-version"
VALUES_BASE_VERSION = "values-base-version"
# The compression-only reference (`fedprune.topk`): reply with at most this many entries of
# (update + error memory) and their positions instead of the kept values
TOPK_VALUES = "topk-values"
# FedRTS (`fedprune.thompson`): also reply with the positions of this fraction of each
# layer's kept count of pruned links with the largest gradients
TOP_GRADIENTS = "top-gradients"

# MetricRecord keys, client -> server
NUM_EXAMPLES = "num-examples"  # Flower's aggregation weight key
TRAIN_LOSS = "train-loss"
FIXED_IMPORTANCE = "importance-fixed"  # importance summed over never-pruned parameters
IMPORTANCE_ROUNDS = "importance-rounds"  # local rounds the importance was accumulated over
COMPUTE_S = "compute-s"  # seconds the node computed for this round (measured on the device)
# MB the node's process held at its peak in this train message's handler, above what it
# held at the handler's start (`fedprune.memory`); absent where it cannot be measured
PEAK_MEMORY_MB = "peak-memory-mb"
IMPORTANCE_TRACKED = "importance-tracked"  # 1 if the node computed importance this round
# Per prunable layer, in the model's prunable order: the format it trained in, as an index
# into fedprune.sparse.FORMATS (0 masked dense, 1 CSR, 2 direct sparse convolution)
LAYER_FORMATS = "layer-formats"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"

# context.state keys on the node
STATE_MASK = "fedprune-mask"  # ArrayRecord: the mask the node holds, packed
STATE_META = "fedprune-meta"  # ConfigRecord: its version
STATE_IMPORTANCE = "fedprune-importance"  # ArrayRecord: importance accumulated so far
STATE_IMPORTANCE_META = "fedprune-importance-meta"  # ConfigRecord: over how many rounds
STATE_TOPK_ERROR = "fedprune-topk-error"  # ArrayRecord: top-k error memory, per parameter
STATE_VALUES = "fedprune-values"  # ArrayRecord: the reference values the node holds
STATE_VALUE_MEMORY = "fedprune-value-memory"  # ArrayRecord: upload error feedback memory
# ConfigRecord: the reference's version and the mask version both arrays are laid out by
STATE_VALUES_META = "fedprune-values-meta"

# Node config and query replies: the node's stable client id
PARTITION_ID = "partition-id"

# The device-profile query (message type "query.profile"): the server sends an empty
# ConfigRecord under CONFIG; the node replies with its measurements (`fedprune.profiler`,
# scaled by its simulated speed factor and link) under PROFILE, plus PARTITION_ID.
PROFILE_ACTION = "profile"
PROFILE_MESSAGE_TYPE = "query.profile"
PROFILE = "profile"
STATE_PROFILE = "fedprune-profile"  # ConfigRecord: the node's raw measurements, cached
# ArrayRecord: the rows of the node's partition, under the data split they belong to
STATE_PARTITION = "fedprune-partition"

# The identity query (message type "query.identify"): the node replies under IDENTITY with
# PARTITION_ID (its stable client id, when its node config has one), NUM_PARTITIONS, and
# NUM_EXAMPLES it holds or DATA_ERROR (why it cannot load its data).
# Flower's node ids change from run to run; sampling by client id makes runs replayable.
IDENTIFY_ACTION = "identify"
IDENTITY = "identity"
NUM_PARTITIONS = "num-partitions"
DATA_ERROR = "data-error"
