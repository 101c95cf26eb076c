"""FedAvg over a sparse model: what every pruning method here shares.

What changes against Flower's FedAvg:
- `configure_train` / `configure_evaluate` send each sampled node the kept values, plus
  the mask (or its change) if the node does not hold the current version;
- `aggregate_train` checks each reply and sums its kept values into a running mean, in
  client-id order; a bad reply is dropped with a logged reason, never aggregated.

The parts are plain objects in `fedprune/` (no Flower): the global model and its versions
(`GlobalModel`), what each node holds (`NodeLedger`), reply checks (`replies`), the running
mean (`KeptMean`), when importance is computed and its sum (`ImportanceCollector`) and the
nodes' device profiles (`NodeProfiles`); node sampling is `strategies.node_sampling`. This
class only wires them into Flower's hooks.

A pruning method is a subclass that says when it needs the clients' importance
(`wants_importance`) and how the mask changes (`update_mask`); its policy itself is a pure
function in `fedprune/`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.supercore.differential_privacy import clip_inputs_inplace

from fedprune import protocol as P
from fedprune.aggregate import (
    KeptMean,
    Kernels,
    RobustKept,
    RobustRule,
    WeightedScalar,
    robust_importance,
)
from fedprune.costs import CostProfile
from fedprune.global_model import GlobalModel
from fedprune.importance import ImportanceCollector, RoundPlan
from fedprune.masks import Masks
from fedprune.node_profiles import NodeProfiles
from fedprune.node_state import CHANGE, FULL, NONE, VALUE_CHANGE, NodeLedger
from fedprune.replies import (
    Expected,
    ReplyError,
    TrainUpdate,
    check_evaluate_reply,
)
from fedprune.sample_counts import ExampleBounds
from fedprune.value_code import ValueReference, value_bits
from strategies.accounting import RoundStats
from strategies.messages import ModelPayloads, SentRound, query_profiles, reply_parts
from strategies.method import PruningMethod
from strategies.node_sampling import EVALUATE, TRAIN, NodeSampler, fraction_size

SKIPPED = (
    "round %d: %d valid replies, fewer than min-replies = %d; the round is skipped and the "
    "global model is unchanged"
)
NEW_MASK = "round %d: new mask: +%d -%d parameters, density %.4f, mask version %d"
CLIPPED_COUNT = (
    "round %d: node %d (client id %s) claims %d examples, the server expects at most %d: "
    "counted as %d"
)
# The robust rules' kernels are Flower's own (FedTrimmedAvg's trimmed mean, the DP
# wrappers' norm clipping); fedprune.aggregate explains where Flower's strategies fit.
FLOWER_KERNELS = Kernels(trim_mean=trim_mean, clip_inplace=clip_inputs_inplace)


class SparseFedAvg(FedAvg, PruningMethod):
    """FedAvg on the kept parameters of a masked model, on Flower's Message API.

    Parameters
    ----------
    params, masks : dict[str, torch.Tensor]
        Initial global weights (dense) and bool masks of the prunable weights.
    profile : CostProfile
        Round-time model for the modelled time (and PruneFL's solver).
    clients_per_round : int
        Nodes sampled for training each round (all, if fewer are connected); 0 = every
        node. `fraction_train` > 0 takes precedence.
    fraction_train : float (default: 0.0)
        If > 0, the fraction of the federation's nodes sampled each round instead.
    num_clients : int (default: 0)
        The federation's size (0: what the nodes report; see `NodeSampler`).
    seed : int (default: 0)
        Fixes each round's sample, with the round number.
    importance_upload : "auto" | "reconfig" | "every-round"
        How importance reaches the server ("auto": "reconfig" when every node takes part).
    importance_window : int (default: 0)
        Nodes compute importance only in the last this-many rounds before the method's
        mask update needs it; 0 = every round since the previous update.
    fraction_evaluate : float (default: 0.0)
        Fraction of nodes asked to evaluate the global model on their local data.
    regrow_init : "last" | "zero"
        Value a regrown parameter starts from.
    node_wait_s : float (default: 120)
        How long a round waits for enough nodes (`min_replies`) to be connected.
    min_replies : int (default: 1)
        A round with fewer valid train replies is skipped (logged, model unchanged).
    measure_costs : bool (default: False)
        Ask each sampled node once for its device profile and model each round with the
        slowest sampled node's; `profile` is the prior until one has answered.
    query_timeout_s : float (default: 600)
        How long to wait for profile replies.
    sampler : NodeSampler, optional
        One that already knows the federation (the ServerApp checks it before any work);
        by default a new one from `seed`, `num_clients` and `node_wait_s`.
    aggregation : "mean" | "clipped-mean" | "trimmed-mean" | "median" (default: "mean")
        How a round's kept values and importance uploads are combined
        (`fedprune.aggregate`); "mean" streams, the others hold the round's replies.
    clip_multiple, trim_fraction : float (default: 2.0, 0.2)
        The robust rules' parameters (`fedprune.aggregate.RobustRule`).
    example_bounds : ExampleBounds, optional
        The most examples counted per node (`fedprune.sample_counts`); by default only
        the codec's 10^9.
    value_code : "exact" | "q16" | "q8" | "q4" (default: "exact")
        Kept values in train messages and replies as float32, or as quantised changes
        both ways (`fedprune.value_code`).
    """

    def __init__(
        self,
        *,
        params: Mapping[str, torch.Tensor],
        masks: Masks,
        profile: CostProfile,
        clients_per_round: int,
        fraction_train: float = 0.0,
        num_clients: int = 0,
        seed: int = 0,
        importance_upload: str = "auto",
        importance_window: int = 0,
        fraction_evaluate: float = 0.0,
        regrow_init: str = "last",
        node_wait_s: float = 120.0,
        min_replies: int = 1,
        measure_costs: bool = False,
        query_timeout_s: float = 600.0,
        sampler: NodeSampler | None = None,
        aggregation: str = "mean",
        clip_multiple: float = 2.0,
        trim_fraction: float = 0.2,
        example_bounds: ExampleBounds | None = None,
        value_code: str = "exact",
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=max(clients_per_round, 1),
            min_evaluate_nodes=1 if fraction_evaluate > 0 else 0,
            min_available_nodes=max(clients_per_round, 1),
            arrayrecord_key=P.ARRAYS,
            configrecord_key=P.CONFIG,
            weighted_by_key=P.NUM_EXAMPLES,
        )
        if importance_upload not in ("auto", "reconfig", "every-round"):
            raise ValueError(f"importance_upload = {importance_upload!r}")
        self.clients_per_round, self.fraction_train = clients_per_round, fraction_train
        self.importance_upload, self.min_replies = importance_upload, min_replies
        self.model = GlobalModel(params, masks, regrow_init)
        self.nodes = NodeLedger()
        self.sampler = sampler or NodeSampler(
            seed=seed, num_clients=num_clients, wait_s=node_wait_s
        )
        shapes = {name: tuple(mask.shape) for name, mask in masks.items()}
        self.importance = ImportanceCollector(self.wants_importance, 0, importance_window, shapes)
        self.profiles = NodeProfiles(profile, list(masks))
        self.profile, self.measure_costs = profile, measure_costs
        self.query_timeout_s = query_timeout_s
        self.stats: defaultdict[int, RoundStats] = defaultdict(RoundStats)
        self.sampled_clients: dict[int, list[int]] = {}  # round -> client ids that trained
        self.payloads = ModelPayloads(self.model)
        # What the round in progress sent: the importance plan, and per message kind the
        # nodes asked and the mask version they were sent.
        self._plan, self._sent = RoundPlan(), {"train": SentRound(), "evaluate": SentRound()}
        self.rule = RobustRule(aggregation, FLOWER_KERNELS, clip_multiple, trim_fraction)
        self.example_bounds = example_bounds or ExampleBounds()
        self.value_bits = value_bits(value_code)
        # What the nodes start each train round from (None: the global values, as float32).
        self.reference = None if self.value_bits is None else ValueReference(self.value_bits)

    # ------------------------------------------------------------------ views
    @property
    def masks(self) -> Masks:
        return self.model.masks

    @property
    def mask_version(self) -> int:
        return self.model.mask_version

    def masked_params(self) -> dict[str, torch.Tensor]:
        return self.model.masked_params()

    def kept_values(self) -> dict[str, torch.Tensor]:
        return self.model.kept_values()

    def density(self) -> float:
        return self.model.density()

    def global_arrays(self) -> ArrayRecord:
        """The global model as Flower's round loop passes it on: in its wire form, the
        kept values every node is sent ("v/<name>", `fedprune.codec`), encoded once per
        model version and shared with the next round's messages. A dense state dict
        (`masked_params`) cost 41 ms a round on Conv-2 to build into an ArrayRecord, and
        nothing here reads one: the server evaluates the model itself (`RoundEnd`)."""
        return self.payloads.arrays(NONE)

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t├──> %s: cost profile %s", type(self).__name__, self.profile.name)

    # ------------------------------------------------------------------ the round loop
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
    ) -> Result:
        """Flower's round loop (`Strategy.start`), which always begins at round 1 with an
        evaluation of round 0: a resumed run must begin after its checkpoint's round, so
        this copy takes `first_round` (1: a new run, as Flower's)."""
        self.importance.num_rounds = num_rounds
        if first_round == 1:
            return super().start(
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                evaluate_fn,
            )
        log(INFO, "Resuming %s at round %d of %d", type(self).__name__, first_round, num_rounds)
        result, arrays = Result(), initial_arrays
        for r in range(first_round, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", r, num_rounds)
            train = self.configure_train(r, arrays, train_config or ConfigRecord(), grid)
            new, _ = self.aggregate_train(r, grid.send_and_receive(train, timeout=timeout))
            arrays = result.arrays = new or arrays
            evaluate = self.configure_evaluate(r, arrays, evaluate_config or ConfigRecord(), grid)
            self.aggregate_evaluate(r, grid.send_and_receive(evaluate, timeout=timeout))
            if evaluate_fn is not None:
                evaluate_fn(r, arrays)
        return result

    # ------------------------------------------------------------------ sending
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes; send each the kept values, plus the mask if it lacks it."""
        node_ids, population = self._sample(server_round, grid, TRAIN)
        self.sampled_clients[server_round] = [self.sampler.client_ids[n] for n in node_ids]
        if self.importance.resolve_mode(self.importance_upload, len(node_ids), population):
            log(INFO, "importance upload: %s", self.importance.mode)
        if self.measure_costs:
            self.profile = self._round_profile(server_round, node_ids, grid)
        self._plan = plan = self.importance.plan(server_round)
        self.stats[server_round].importance_tracked = plan.track
        flags = {P.SEND_IMPORTANCE: plan.send, P.ACCUMULATE_IMPORTANCE: plan.keep}
        messages = self._messages(server_round, node_ids, config, MessageType.TRAIN, flags)
        log(
            INFO,
            "configure_train: %d of %d nodes, %d get the mask (version %d)%s",
            len(node_ids),
            population,
            self.stats[server_round].masks_sent,
            self.mask_version,
            ", importance tracked" if plan.track else "",
        )
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        node_ids, _ = self._sample(server_round, grid, EVALUATE)
        return self._messages(server_round, node_ids, config, MessageType.EVALUATE, {})

    def _sample(self, server_round: int, grid: Grid, purpose: int) -> tuple[list[int], int]:
        """(sampled node ids, population size): every connected node that may be sampled,
        a fraction of them, or a number of them (all, if fewer are connected)."""
        if purpose == TRAIN:
            fraction, size, minimum = self.fraction_train, self.clients_per_round, self.min_replies
        else:
            fraction, size, minimum = self.fraction_evaluate, 0, 1
        count = self.stats[server_round].count
        population = self.sampler.population(grid, server_round, max(minimum, 1), count)
        if fraction > 0:
            size = fraction_size(fraction, len(population))
        return self.sampler.draw(population, server_round, size, purpose), len(population)

    def _messages(self, server_round, node_ids, config, message_type, flags) -> list[Message]:
        """One message per node: the model in the form that node needs (`NodeLedger`)."""
        stats, version = self.stats[server_round], self.mask_version
        base = {**dict(config), **flags, P.SERVER_ROUND: server_round, P.MASK_VERSION: version}
        ref = self.reference if message_type == MessageType.TRAIN else None
        if ref is not None:  # this round's reference values: what every node starts from
            ref.advance(self.model.kept_values(), version)
            base.update({P.VALUE_BITS: self.value_bits, P.VALUES_VERSION: ref.version})
        configs = {
            NONE: ConfigRecord(base),
            FULL: ConfigRecord(base),
            CHANGE: ConfigRecord({**base, P.MASK_BASE_VERSION: version - 1}),
        }
        if ref is not None and ref.change is not None:
            configs[VALUE_CHANGE] = ConfigRecord({**base, P.VALUES_BASE_VERSION: ref.version - 1})
        has_change = self.model.previous_masks is not None
        messages = []
        for node_id in node_ids:
            form = self.nodes.mask_to_send(node_id, version, change_available=has_change)
            if form != NONE:  # a new mask: the values it holds are laid out by another
                self.nodes.forget_values(node_id)
            elif VALUE_CHANGE in configs and self.nodes.values_change(node_id, ref.version):
                form = VALUE_CHANGE
            content = RecordDict(
                {P.ARRAYS: self.payloads.arrays(form, ref), P.CONFIG: configs[form]}
            )
            stats.count_sent(node_id, content)
            stats.masks_sent += int(form == FULL)
            stats.mask_changes_sent += int(form == CHANGE)
            messages.append(
                Message(content=content, message_type=message_type, dst_node_id=node_id)
            )
        kind = "train" if message_type == MessageType.TRAIN else "evaluate"
        self._sent[kind] = SentRound(version, messages)
        return messages

    def _round_profile(self, server_round: int, node_ids: list[int], grid: Grid) -> CostProfile:
        """The slowest sampled node's measured profile (asking new nodes for theirs), or the
        prior while none has one."""
        stats = self.stats[server_round]
        query_profiles(grid, self.profiles, node_ids, server_round, stats, self.query_timeout_s)
        profile = self.profiles.for_round(node_ids)
        if profile is None:
            log(WARNING, "round %d: no sampled node has a device profile; using %s",
                server_round, self.profiles.prior.name)  # fmt: skip
        return profile or self.profiles.prior

    # ------------------------------------------------------------------ receiving
    def _drop(self, server_round: int, node_id: int | None, reason: str, msg: Message) -> None:
        if node_id is None:  # nobody we asked: name the sender, forget no one
            node_id = msg.metadata.src_node_id
        else:
            self.nodes.forget([node_id])  # it may hold a mask we no longer know about
        log(WARNING, "round %d: dropped reply from node %d: %s", server_round, node_id, reason)
        self.stats[server_round].dropped += 1

    def _in_order(self, replies: Iterable[Message]) -> list[Message]:
        def key(msg: Message) -> tuple[int, int]:
            node_id = msg.metadata.src_node_id
            return (self.sampler.client_ids.get(node_id, node_id), node_id)

        return sorted(replies, key=key)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, average kept values by samples, maybe change the mask."""
        stats, loss = self.stats[server_round], WeightedScalar()
        robust = self.rule.name != "mean"
        mean = RobustKept(self.rule, self.model.kept_values()) if robust else KeptMean()
        for update in self._valid_updates(server_round, replies):
            mean.add(update.num_examples, update.values)
            loss.add(update.num_examples, update.loss)
        kept = self.model.kept_counts()
        stats.sim_time_s = self.profile.round_time_s(kept, stats.busiest_node_bytes())
        aggregated = self.aggregated(server_round)
        if aggregated:
            self.model.set_kept(mean.mean())
            if getattr(mean, "clipped", 0):
                log(INFO, "round %d: %s clipped %d of %d updates", server_round,
                    self.rule.name, mean.clipped, mean.count)  # fmt: skip
        else:
            log(WARNING, SKIPPED, server_round, stats.replies, self.min_replies)
        self._update_mask(server_round, *self.importance.end_round(self._plan, aggregated))
        if not aggregated:
            return None, None
        metrics = {P.TRAIN_LOSS: loss.mean(), "replies": stats.replies, "dropped": stats.dropped}
        metrics.update({"density": self.density(), P.MASK_VERSION: self.mask_version})
        return self.global_arrays(), MetricRecord(metrics)

    def _valid_updates(
        self, server_round: int, replies: Iterable[Message]
    ) -> Iterator[TrainUpdate]:
        """The valid train replies' updates, in client order, one at a time (their
        importance summed on the way); afterwards the node records follow who answered."""
        stats, sent = self.stats[server_round], self._sent["train"]
        version = sent.version
        covers = self._plan.covers if self._plan.send else 0
        # Quantised updates add to the round's global values (exact on the server).
        base = self.model.kept_values() if self.reference is not None else None
        expected = Expected(version, self.model.shapes, self.model.masks, covers, base)
        answered, uploads = set(), []
        for msg in self._in_order(replies):
            stats.count_reply(msg)
            node_id = sent.node_of(msg)
            try:
                update = self.check_train_reply(*self._parts(msg, node_id, train=True), expected)
            except ReplyError as exc:
                self._drop(server_round, node_id, str(exc), msg)
                continue
            self._count_examples(server_round, node_id, update)
            if update.importance_note:
                log(WARNING, "round %d: node %d: %s", server_round, node_id, update.importance_note)
            if update.importance is not None and self.rule.name == "mean":
                self.importance.add(update.importance, update.fixed_importance)  # streaming
            elif update.importance is not None:
                uploads.append((update.num_examples, update.importance, update.fixed_importance))
            stats.device_round_s = max(stats.device_round_s, update.compute_s)
            if update.peak_memory_mb is not None:
                stats.node_peak_memory_mb = max(
                    stats.node_peak_memory_mb or 0.0, update.peak_memory_mb
                )
            if update.formats is not None:
                stats.layer_formats[node_id] = update.formats
            answered.add(node_id)
            yield update
        if uploads:  # a robust rule: the round's uploads at once, per coordinate
            importance, fixed, clipped = robust_importance(self.rule, uploads, self.model.shapes)
            self.importance.add(importance, fixed, uploads=len(uploads))
            if clipped:
                log(INFO, "round %d: %s clipped %d of %d importance uploads", server_round,
                    self.rule.name, clipped, len(uploads))  # fmt: skip
        values_version = self.reference.version if self.reference is not None else None
        self._answered(sent.nodes, answered, version, values_version)
        stats.replies = len(answered)

    def _count_examples(self, server_round: int, node_id: int, update: TrainUpdate) -> None:
        """Bound the examples the reply claims by what the server expects of the node
        (`fedprune.sample_counts`). Its importance does not depend on the count: it is
        scaled by the samples the round processed (K x B)."""
        client_id = self.sampler.client_ids.get(node_id)
        claimed = update.num_examples
        counted = self.example_bounds.count(client_id, claimed)
        if counted == claimed:
            return
        bound = self.example_bounds.bound(client_id)
        log(WARNING, CLIPPED_COUNT, server_round, node_id, client_id, claimed, bound, counted)
        update.num_examples = counted

    def _parts(self, msg: Message, node_id: int | None, train: bool) -> tuple[dict, dict]:
        if node_id is None:
            raise ReplyError("a reply from a node this round did not ask")
        arrays, metrics = reply_parts(msg)
        if train and arrays is None:
            raise ReplyError(f"no ArrayRecord under {P.ARRAYS!r}")
        return arrays, metrics

    def _answered(
        self, sent_to: set[int], answered: set[int], version: int, values_version=None
    ) -> None:
        """Nodes that answered validly hold mask `version` (and, from a train round under
        the value code, reference values `values_version`); silent ones may have lost
        theirs."""
        self.nodes.forget(sent_to - answered)
        for node_id in answered:
            self.nodes.confirm(node_id, version, values_version)

    def aggregated(self, server_round: int) -> bool:
        """Whether this round had enough replies for its updates to be aggregated."""
        stats = self.stats.get(server_round)
        return stats is not None and stats.replies >= max(self.min_replies, 1)

    def _update_mask(self, server_round: int, importance, fixed: float) -> None:
        if importance is not None:
            uploads, rounds = self.importance.used
            log(INFO, "round %d: importance summed over %d uploads from %d rounds",
                server_round, uploads, rounds)  # fmt: skip
        new_masks = self.update_mask(server_round, importance, fixed)
        if new_masks is None:
            return
        grown, removed = self.model.install_masks(new_masks)
        self.stats[server_round].reconfigured = bool(grown or removed)
        density, version = self.density(), self.mask_version
        log(INFO, NEW_MASK, server_round, grown, removed, density, version)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted mean of the nodes' local evaluation; bad replies are dropped."""
        stats, sent = self.stats[server_round], self._sent["evaluate"]
        accuracy, loss, answered = WeightedScalar(), WeightedScalar(), set()
        for msg in self._in_order(replies):
            stats.count_reply(msg)
            node_id = sent.node_of(msg)
            try:
                n, acc, lo = check_evaluate_reply(self._parts(msg, node_id, False)[1], sent.version)
            except ReplyError as exc:
                self._drop(server_round, node_id, f"evaluate: {exc}", msg)
                continue
            # a claimed count weighs the federated accuracy too: bounded alike (not logged)
            n = self.example_bounds.count(self.sampler.client_ids.get(node_id), n)
            answered.add(node_id)
            accuracy.add(n, acc)
            loss.add(n, lo)
        self._answered(sent.nodes, answered, sent.version)
        if not answered:
            return None
        return MetricRecord({P.EVAL_ACCURACY: accuracy.mean(), P.EVAL_LOSS: loss.mean()})

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """Everything needed to go on after the last round (tensors, numbers, strings)."""
        return {
            **self.model.state_dict(),
            "importance": self.importance.state_dict(),
            "sampled_clients": {r: list(c) for r, c in self.sampled_clients.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Adopt a `state_dict()`; the layers and shapes must be this model's."""
        self.model.load_state_dict(state)
        self.importance.load_state_dict(state["importance"])
        self.sampled_clients = {int(r): list(c) for r, c in state["sampled_clients"].items()}
        self.nodes.forget_all()  # a new run: no node holds a mask yet
