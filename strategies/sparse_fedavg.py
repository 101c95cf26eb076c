"""FedAvg over a sparse model: the machinery every pruning method here shares.

What changes against Flower's FedAvg, and nothing else:
- `configure_train` / `configure_evaluate`: each node gets the kept values only if it
  already holds the current mask version, else values plus the packed mask;
- `aggregate_train`: replies are validated one by one (a bad reply is dropped with a
  logged reason, never aggregated) and kept values are averaged weighted by samples.

A pruning method is a subclass that says when it needs the clients' importance
(`wants_importance`) and how the mask changes (`update_mask`); its policy itself is a
pure function in `fedprune/`. The strategy keeps a dense copy of the global weights:
pruned positions keep the last value they had, so a parameter that grows back can
restart from it (the paper) or from 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedprune import protocol as P
from fedprune.codec import CodecError, decode_update, encode_model
from fedprune.costs import CostProfile, slowest
from fedprune.masks import Masks, density, kept_counts
from fedprune.profiler import profile_from_measurements
from strategies.node_sampling import (
    EVALUATE,
    TRAIN,
    NodeSampler,
    fraction_size,
    query_messages,
    reply_config,
)

MAX_NUM_EXAMPLES = 10**9  # a reply claiming more samples than this is not believed


@dataclass
class RoundStats:
    """What one round cost, from the records really sent and received."""

    bytes_down: int = 0
    bytes_up: int = 0
    sim_time_s: float = 0.0  # modelled time of this round (slowest node)
    replies: int = 0
    dropped: int = 0
    masks_sent: int = 0
    reconfigured: bool = False
    per_node_bytes: dict[int, int] = field(default_factory=dict)

    def count(self, node_id: int, sent: int = 0, received: int = 0) -> None:
        self.bytes_down += sent
        self.bytes_up += received
        self.per_node_bytes[node_id] = self.per_node_bytes.get(node_id, 0) + sent + received

    def count_reply(self, msg: Message) -> None:
        if msg.has_content():
            self.count(msg.metadata.src_node_id, received=content_bytes(msg.content))


@dataclass
class TrainReply:
    """A train reply that passed validation, decoded."""

    node_id: int
    num_examples: int
    values: dict[str, torch.Tensor]
    importance: dict[str, torch.Tensor] | None
    fixed_importance: float
    loss: float
    order: tuple[int, int]  # (partition id, node id): a fixed summation order


def slowest_profile(profiles: Iterable[CostProfile]) -> CostProfile:
    """The element-wise slowest of some device profiles (`fedprune.costs.slowest`): a
    synchronous round waits for its slowest node."""
    return slowest(profiles)


def content_bytes(content: RecordDict) -> int:
    """Bytes of all records in a message's content, as Flower serialises them."""
    return sum(record.count_bytes() for record in content.values())


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


class SparseFedAvg(FedAvg):
    """FedAvg on the kept parameters of a masked model, on Flower's Message API.

    Parameters
    ----------
    params : dict[str, torch.Tensor]
        Initial global weights (dense; pruned positions are ignored).
    masks : dict[str, torch.Tensor]
        Initial bool masks of the prunable weights (e.g. from initial pruning).
    profile : CostProfile
        Round-time model used by the solver and for the modelled time.
    clients_per_round : int
        Nodes sampled for training each round (unless `fraction_train` is set).
    fraction_train : float (default: 0.0)
        If > 0, the fraction of the federation's nodes sampled each round instead.
    num_clients : int (default: 0)
        The federation's size: nodes to wait for before round 1 and to sample from; 0
        takes what the nodes report (`NodeSampler`).
    seed : int (default: 0)
        Fixes each round's sample, with the round number (`NodeSampler`).
    importance_upload : "auto" | "reconfig" | "every-round"
        How importance reaches the server (see fedprune.settings.IMPORTANCE_UPLOADS).
    fraction_evaluate : float (default: 0.0)
        Fraction of nodes asked to evaluate the global model on their local data.
    regrow_init : "last" | "zero"
        Value a regrown parameter starts from.
    node_wait_s : float (default: 120)
        How long to wait for enough nodes to connect before giving up with an error.
    min_replies : int (default: 1)
        A round with fewer valid train replies is skipped (logged, model unchanged).
    measure_costs : bool (default: False)
        Ask each sampled node for its device profile (a "query.profile" message, once per
        node) and model each round with the slowest sampled node's costs; `profile` is
        then only the fallback while no node has answered.
    query_timeout_s : float (default: 600)
        How long to wait for profile replies.
    """

    def __init__(
        self,
        *,
        params: Mapping[str, torch.Tensor],
        masks: Masks,
        profile: CostProfile,
        clients_per_round: int,
        fraction_evaluate: float = 0.0,
        regrow_init: str = "last",
        node_wait_s: float = 120.0,
        min_replies: int = 1,
        measure_costs: bool = False,
        query_timeout_s: float = 600.0,
        fraction_train: float = 0.0,
        num_clients: int = 0,
        seed: int = 0,
        importance_upload: str = "auto",
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=clients_per_round,
            min_evaluate_nodes=1 if fraction_evaluate > 0 else 0,
            min_available_nodes=clients_per_round,
            arrayrecord_key=P.ARRAYS,
            configrecord_key=P.CONFIG,
            weighted_by_key=P.NUM_EXAMPLES,
        )
        self.clients_per_round = clients_per_round
        self.fraction_train = fraction_train
        self.sampler = NodeSampler(
            seed=seed,
            num_clients=num_clients,
            wait_s=node_wait_s,
            identify_timeout_s=min(60.0, query_timeout_s),
        )
        if importance_upload not in ("auto", "reconfig", "every-round"):
            raise ValueError(f"importance_upload = {importance_upload!r}")
        self.importance_upload = importance_upload
        self.upload_mode: str | None = None  # resolved when the federation's size is known
        # Importance gathered since the last reconfiguration, summed over the replies (each
        # node's importance is already weighted by its samples), and over how many rounds.
        self.importance_sum: dict[str, torch.Tensor] | None = None
        self.fixed_importance_sum = 0.0
        self.importance_rounds = 0
        self.nodes_hold_importance = False  # nodes keep importance not yet uploaded
        self.sampled_clients: dict[int, list[int]] = {}  # round -> client ids that trained
        self.min_replies = min_replies
        self.params = {k: v.detach().clone().float() for k, v in params.items()}
        self.masks = {k: m.clone() for k, m in masks.items()}
        self.shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        self.profile = profile
        self.prior_profile = profile
        self.measure_costs = measure_costs
        self.query_timeout_s = query_timeout_s
        self.node_profiles: dict[int, CostProfile] = {}
        self.profile_queries: dict[int, int] = {}  # node id -> profile queries sent
        self.regrow_init = regrow_init
        self.num_rounds = 0
        self.mask_version = 0
        self.node_mask_version: dict[int, int] = {}
        self.stats: dict[int, RoundStats] = {}
        self._payloads: dict[bool, RecordDict] = {}
        self._payload_key: tuple[int, int, str] | None = None
        self._asked_importance = False
        self._train_nodes: set[int] = set()
        self._eval_nodes: set[int] = set()

    # ------------------------------------------------------------------ state views
    @property
    def never_pruned(self) -> int:
        return sum(v.numel() for k, v in self.params.items() if k not in self.masks)

    def masked_params(self) -> dict[str, torch.Tensor]:
        """The global model as the nodes see it: exact zeros at pruned positions."""
        return {
            k: v * self.masks[k] if k in self.masks else v.clone() for k, v in self.params.items()
        }

    def global_arrays(self) -> ArrayRecord:
        return ArrayRecord(self.masked_params())

    def density(self) -> float:
        """Kept fraction of the whole model, biases included."""
        return density(self.masks, always_kept=self.never_pruned)

    # ------------------------------------------------------------------ the method's hooks
    def wants_importance(self, server_round: int) -> bool:
        """Whether this round's replies must carry the clients' importance."""
        return False

    def update_mask(
        self,
        server_round: int,
        importance: dict[str, torch.Tensor] | None,
        fixed_importance: float,
    ) -> Masks | None:
        """The mask after this round (None: unchanged). Called after averaging."""
        return None

    def summary(self) -> None:
        super().summary()
        name = self.profile.name
        if self.measure_costs:
            name = f"measured per node (until profiled: {self.prior_profile.name})"
        log(INFO, "\t├──> %s: cost profile %s", type(self).__name__, name)

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
        first_round: int = 0,
        on_round_end: Callable[[int], None] | None = None,
    ) -> Result:
        """Flower's round loop, plus two things a long run needs: start at `first_round`
        (0: evaluate the initial model, then train from round 1; a resumed run gives the
        round after its checkpoint) and call `on_round_end(round)` once a round is fully
        done (to write a checkpoint)."""
        self.num_rounds = num_rounds  # importance asked for in the last round would go unused
        log(
            INFO,
            "Starting %s strategy, rounds %d to %d:",
            type(self).__name__,
            first_round,
            num_rounds,
        )
        self.summary()
        train_config = train_config if train_config is not None else ConfigRecord()
        evaluate_config = evaluate_config if evaluate_config is not None else ConfigRecord()
        result, arrays = Result(), initial_arrays
        if evaluate_fn is not None and first_round == 0 and (res := evaluate_fn(0, arrays)):
            result.evaluate_metrics_serverapp[0] = res
        for server_round in range(max(first_round, 1), num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(server_round, arrays, train_config, grid),
                timeout=timeout,
            )
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(server_round, arrays, evaluate_config, grid),
                timeout=timeout,
            )
            if (eval_metrics := self.aggregate_evaluate(server_round, replies)) is not None:
                result.evaluate_metrics_clientapp[server_round] = eval_metrics
            if evaluate_fn is not None and (res := evaluate_fn(server_round, arrays)) is not None:
                result.evaluate_metrics_serverapp[server_round] = res
            if on_round_end is not None:
                on_round_end(server_round)
        return result

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """Everything the strategy needs to go on from the end of the last round (plain
        tensors, numbers and strings: loadable with torch.load(weights_only=True))."""
        return {
            "params": {k: v.clone() for k, v in self.params.items()},
            "masks": {k: m.clone() for k, m in self.masks.items()},
            "mask_version": self.mask_version,
            "importance_sum": (
                None
                if self.importance_sum is None
                else {k: v.clone() for k, v in self.importance_sum.items()}
            ),
            "fixed_importance_sum": self.fixed_importance_sum,
            "importance_rounds": self.importance_rounds,
            "upload_mode": self.upload_mode or "",
            "nodes_hold_importance": self.nodes_hold_importance,
            "sampled_clients": {r: list(c) for r, c in self.sampled_clients.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Adopt a `state_dict()`; shapes and layers must be this model's."""
        params, masks = state["params"], state["masks"]
        if set(params) != set(self.params) or set(masks) != set(self.masks):
            raise ValueError("the checkpoint's layers are not this model's")
        for k, v in params.items():
            if tuple(v.shape) != self.shapes[k]:
                raise ValueError(
                    f"{k}: shape {tuple(v.shape)} in the checkpoint, model has {self.shapes[k]}"
                )
        self.params = {k: v.clone().float() for k, v in params.items()}
        self.masks = {k: m.clone().bool() for k, m in masks.items()}
        self.mask_version = int(state["mask_version"])
        imp = state["importance_sum"]
        self.importance_sum = None if imp is None else {k: v.clone() for k, v in imp.items()}
        self.fixed_importance_sum = float(state["fixed_importance_sum"])
        self.importance_rounds = int(state["importance_rounds"])
        self.upload_mode = state["upload_mode"] or None
        self.nodes_hold_importance = bool(state["nodes_hold_importance"])
        self.sampled_clients = {int(r): list(c) for r, c in state["sampled_clients"].items()}
        self.node_mask_version.clear()  # a new run: no node holds a mask yet

    # ------------------------------------------------------------------ sending
    def _payload(self, server_round: int, with_mask: bool, config: ConfigRecord) -> RecordDict:
        """The message content for this round, built once per (mask version, kind)."""
        key = (server_round, self.mask_version, str(dict(config)))
        if key != self._payload_key:
            self._payloads, self._payload_key = {}, key
        if with_mask not in self._payloads:
            arrays = encode_model(self.params, self.masks, include_masks=with_mask)
            self._payloads[with_mask] = RecordDict(
                {P.ARRAYS: to_array_record(arrays), P.CONFIG: config}
            )
        return self._payloads[with_mask]

    def _messages(
        self, server_round: int, node_ids: list[int], config: ConfigRecord, message_type: str
    ) -> list[Message]:
        stats = self.stats.setdefault(server_round, RoundStats())
        messages = []
        for node_id in node_ids:
            with_mask = self.node_mask_version.get(node_id) != self.mask_version
            content = self._payload(server_round, with_mask, config)
            stats.count(node_id, sent=content_bytes(content))
            stats.masks_sent += int(with_mask)
            messages.append(
                Message(content=content, message_type=message_type, dst_node_id=node_id)
            )
        return messages

    def _config(
        self, server_round: int, config: ConfigRecord, send: bool, accumulate: bool = False
    ) -> ConfigRecord:
        cfg = ConfigRecord(dict(config))
        cfg[P.SERVER_ROUND] = server_round
        cfg[P.MASK_VERSION] = self.mask_version
        cfg[P.SEND_IMPORTANCE] = send
        cfg[P.ACCUMULATE_IMPORTANCE] = accumulate
        return cfg

    def _next_importance_round(self, server_round: int) -> int | None:
        """The first round from `server_round` on whose mask update uses importance (the
        last round's would go unused, so it never counts; before `start` sets the number
        of rounds, the search looks a long way ahead)."""
        horizon = self.num_rounds or server_round + 100_000
        for r in range(server_round, horizon):
            if self.wants_importance(r):
                return r
        return None

    def _importance_plan(self, server_round: int) -> tuple[bool, bool]:
        """(send, accumulate): what the nodes of this round do with their importance."""
        upcoming = self._next_importance_round(server_round)
        if upcoming is None:
            return False, False
        if self.upload_mode == "every-round":
            return True, False
        return upcoming == server_round, upcoming != server_round

    def _resolve_upload_mode(self, sampled: int, population: int) -> None:
        full = sampled >= population
        mode = self.importance_upload
        if mode == "auto":
            mode = "reconfig" if full else "every-round"
        elif mode == "reconfig" and not full:
            raise RuntimeError(
                f"importance-upload = 'reconfig' needs every node in every round, but "
                f"{sampled} of {population} nodes are sampled: nodes that are not sampled "
                "when the server reconfigures would hold their importance back. Use "
                "'every-round' (or 'auto')"
            )
        if mode != self.upload_mode:
            log(INFO, "importance upload: %s (%d of %d nodes per round)", mode, sampled, population)
        self.upload_mode = mode

    def _count(self, server_round: int) -> Callable[[int, int, int], None]:
        stats = self.stats.setdefault(server_round, RoundStats())
        return lambda node_id, sent, received: stats.count(node_id, sent, received)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes; send each the kept values, plus the mask if it lacks it."""
        count = self._count(server_round)
        wait_for = self.clients_per_round if self.fraction_train == 0 else 1
        population = self.sampler.population(grid, server_round, wait_for, count)
        size = (
            fraction_size(self.fraction_train, len(population))
            if self.fraction_train > 0
            else self.clients_per_round
        )
        node_ids = self.sampler.draw(population, server_round, size, TRAIN)
        self._resolve_upload_mode(len(node_ids), len(population))
        self.sampled_clients[server_round] = [self.sampler.client_ids[n] for n in node_ids]
        self._train_nodes = set(node_ids)
        if self.measure_costs:
            self._query_profiles(server_round, node_ids, grid)
            self.profile = self.round_profile(server_round, node_ids)
        send, accumulate = self._importance_plan(server_round)
        self._asked_importance, self.nodes_hold_importance = send, accumulate
        self._sent_version = self.mask_version
        messages = self._messages(
            server_round,
            node_ids,
            self._config(server_round, config, send, accumulate),
            MessageType.TRAIN,
        )
        log(
            INFO,
            "configure_train: %d of %d nodes, %d get the mask (version %d)%s",
            len(node_ids),
            len(population),
            self.stats[server_round].masks_sent,
            self.mask_version,
            ", importance requested" if send else "",
        )
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        population = self.sampler.population(grid, server_round, 1, self._count(server_round))
        sample_size = fraction_size(self.fraction_evaluate, len(population))
        node_ids = self.sampler.draw(population, server_round, sample_size, EVALUATE)
        self._eval_nodes = set(node_ids)
        self._eval_version = self.mask_version
        return self._messages(
            server_round, node_ids, self._config(server_round, config, False), MessageType.EVALUATE
        )

    # ------------------------------------------------------------------ device profiles
    def _query_profiles(self, server_round: int, node_ids: list[int], grid: Grid) -> None:
        """Ask the sampled nodes without a profile yet for theirs; keep the valid ones."""
        missing = [n for n in node_ids if n not in self.node_profiles]
        if not missing:
            return
        stats = self.stats.setdefault(server_round, RoundStats())
        messages = query_messages(
            P.PROFILE_ACTION, missing, server_round, self._count(server_round)
        )
        for node_id in missing:
            self.profile_queries[node_id] = self.profile_queries.get(node_id, 0) + 1
        asked = set(missing)
        for msg in grid.send_and_receive(messages, timeout=self.query_timeout_s):
            node_id = msg.metadata.src_node_id
            stats.count_reply(msg)
            try:
                if node_id not in asked:
                    raise ValueError("a profile this round did not ask this node for")
                self.node_profiles[node_id] = self._check_profile_reply(msg, node_id)
            except (ValueError, TypeError, KeyError) as exc:
                log(
                    WARNING,
                    "round %d: dropped profile reply from node %d: %s",
                    server_round,
                    node_id,
                    exc,
                )
        log(
            INFO,
            "round %d: profiled %d of %d nodes asked; %d nodes profiled so far",
            server_round,
            len(asked & set(self.node_profiles)),
            len(asked),
            len(self.node_profiles),
        )

    def _check_profile_reply(self, msg: Message, node_id: int) -> CostProfile:
        """The node's CostProfile from a well-formed profile reply; ValueError otherwise."""
        profile = profile_from_measurements(reply_config(msg, P.PROFILE))
        if set(profile.compute_s_per_param) != set(self.masks):
            raise ValueError(
                f"profile layers {sorted(profile.compute_s_per_param)} are not the model's "
                f"prunable layers {sorted(self.masks)}"
            )
        profile.check()  # finite, non-negative costs and a positive link
        return dataclasses.replace(profile, name=f"measured-node-{node_id}")

    def round_profile(self, server_round: int, node_ids: Iterable[int]) -> CostProfile:
        """The element-wise slowest profile of the sampled nodes that have one; the prior
        profile if none has."""
        profiles = [self.node_profiles[n] for n in node_ids if n in self.node_profiles]
        if not profiles:
            log(
                WARNING,
                "round %d: no sampled node has a device profile; using %s",
                server_round,
                self.prior_profile.name,
            )
            return self.prior_profile
        return slowest_profile(profiles)

    # ------------------------------------------------------------------ receiving
    def _forget_silent_nodes(self, sampled: set[int], answered: set[int]) -> None:
        """A sampled node without a valid reply may have lost (or never stored) its mask:
        it gets the mask in full next time. This covers nodes that timed out, and errors
        the SuperLink writes for a node that died, which name the SuperLink as sender."""
        for node_id in sampled - answered:
            self.node_mask_version.pop(node_id, None)

    def _reject(self, server_round: int, node_id: int, reason: str) -> None:
        log(WARNING, "round %d: dropped reply from node %d: %s", server_round, node_id, reason)
        self.stats[server_round].dropped += 1
        # The node may hold a mask we no longer know about: send it in full next time.
        self.node_mask_version.pop(node_id, None)

    def _check_reply(self, server_round: int, msg: Message, expected_version: int):
        """Return (metrics, arrays) of a well-formed reply; raise ValueError otherwise."""
        if msg.has_error():
            raise ValueError(f"client error: {msg.error.reason}")
        content = msg.content
        metrics = content.get(P.METRICS)
        if not isinstance(metrics, MetricRecord):
            raise ValueError(f"no MetricRecord under {P.METRICS!r}")
        n = metrics.get(P.NUM_EXAMPLES)
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_NUM_EXAMPLES:
            raise ValueError(
                f"{P.NUM_EXAMPLES} = {n!r} is not an integer in [1, {MAX_NUM_EXAMPLES}]"
            )
        version = metrics.get(P.MASK_VERSION)
        if version != expected_version:
            raise ValueError(f"mask version {version!r}, expected {expected_version}")
        return metrics, n

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, average kept values by samples, maybe change the mask."""
        stats = self.stats.setdefault(server_round, RoundStats())
        accepted = []
        for msg in replies:
            stats.count_reply(msg)
            try:
                accepted.append(self._accept_train_reply(server_round, msg))
            except (ValueError, CodecError, TypeError, KeyError) as exc:
                self._reject(server_round, msg.metadata.src_node_id, str(exc))
        # Replies arrive in any order; summing them in a fixed one keeps runs reproducible.
        accepted.sort(key=lambda reply: reply.order)
        self._forget_silent_nodes(self._train_nodes, {r.node_id for r in accepted})
        stats.replies = len(accepted)
        if stats.per_node_bytes:
            stats.sim_time_s = self.profile.round_time_s(
                kept_counts(self.masks), max(stats.per_node_bytes.values())
            )
        if len(accepted) < max(self.min_replies, 1):
            log(
                WARNING,
                "round %d: %d valid replies, fewer than min-replies = %d; the round "
                "is skipped and the global model is unchanged",
                server_round,
                len(accepted),
                self.min_replies,
            )
            return None, None
        for reply in accepted:
            self.node_mask_version[reply.node_id] = self._sent_version

        self._average([(r.num_examples, r.values) for r in accepted])
        if self._asked_importance:
            self._gather_importance(accepted)
        importance, fixed_importance = None, 0.0
        if self.wants_importance(server_round) and server_round != self.num_rounds:
            importance, fixed_importance = self.importance_sum, self.fixed_importance_sum
            log(
                INFO,
                "round %d: importance summed over %d uploads",
                server_round,
                self.importance_rounds,
            )
            self.importance_sum, self.fixed_importance_sum, self.importance_rounds = None, 0.0, 0
        new_masks = self.update_mask(server_round, importance, fixed_importance)
        if new_masks is not None:
            stats.reconfigured = self._install_masks(server_round, new_masks)
        total = sum(r.num_examples for r in accepted)
        loss = sum(r.num_examples * r.loss for r in accepted) / total
        metrics = MetricRecord(
            {
                P.TRAIN_LOSS: loss,
                "replies": len(accepted),
                "dropped": stats.dropped,
                "density": self.density(),
                P.MASK_VERSION: self.mask_version,
            }
        )
        return self.global_arrays(), metrics

    def _gather_importance(self, accepted: list[TrainReply]) -> None:
        """Add this round's importance (replies in their fixed order) to the sums."""
        if self.importance_sum is None:
            self.importance_sum = {
                k: torch.zeros_like(v) for k, v in accepted[0].importance.items()
            }
        for r in accepted:
            for k, g in r.importance.items():
                self.importance_sum[k].add_(g)
            self.fixed_importance_sum += r.fixed_importance
        self.importance_rounds += 1

    def _accept_train_reply(self, server_round: int, msg: Message) -> TrainReply:
        """Decode one train reply; raise ValueError (or CodecError) saying what is wrong."""
        metrics, n = self._check_reply(server_round, msg, self._sent_version)
        record = msg.content.get(P.ARRAYS)
        if not isinstance(record, ArrayRecord):
            raise ValueError(f"no ArrayRecord under {P.ARRAYS!r}")
        arrays = {k: record[k].numpy() for k in record}
        values, importance = decode_update(
            arrays, self.shapes, self.masks, expect_importance=self._asked_importance
        )
        fixed = 0.0
        if self._asked_importance:
            fixed = metrics.get(P.FIXED_IMPORTANCE, 0.0)
            if not isinstance(fixed, int | float) or not np.isfinite(fixed) or fixed < 0:
                raise ValueError(f"{P.FIXED_IMPORTANCE} = {fixed!r} is not finite and >= 0")
        loss = metrics.get(P.TRAIN_LOSS, 0.0)
        node_id = msg.metadata.src_node_id
        partition = metrics.get(P.PARTITION_ID, node_id)
        return TrainReply(
            node_id=node_id,
            num_examples=n,
            values=values,
            importance=importance,
            fixed_importance=float(fixed),
            loss=float(loss) if isinstance(loss, int | float) else 0.0,
            order=(partition if isinstance(partition, int) else node_id, node_id),
        )

    def _average(self, accepted: list[tuple[int, dict[str, torch.Tensor]]]) -> None:
        """FedAvg over the kept positions; pruned positions keep their last value."""
        total = float(sum(n for n, _ in accepted))
        for name in self.params:
            avg = sum(values[name] * (n / total) for n, values in accepted)
            if name in self.masks:
                self.params[name] = torch.where(self.masks[name], avg, self.params[name])
            else:
                self.params[name] = avg

    def _install_masks(self, server_round: int, masks: Masks) -> bool:
        """Adopt `masks`; return True if they differ (a new mask version)."""
        grown = sum(int((new & ~self.masks[k]).sum()) for k, new in masks.items())
        removed = sum(int((self.masks[k] & ~new).sum()) for k, new in masks.items())
        if grown == 0 and removed == 0:
            log(INFO, "round %d: the mask is unchanged", server_round)
            return False
        if self.regrow_init == "zero":
            for k, new in masks.items():
                self.params[k] = torch.where(new & ~self.masks[k], 0.0, self.params[k])
        self.masks = {k: m.clone() for k, m in masks.items()}
        self.mask_version += 1
        log(
            INFO,
            "round %d: new mask: +%d -%d parameters, density %.4f, mask version %d",
            server_round,
            grown,
            removed,
            self.density(),
            self.mask_version,
        )
        return True

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted mean of the nodes' local evaluation; bad replies are dropped."""
        stats = self.stats.setdefault(server_round, RoundStats())
        rows, answered = [], set()
        for msg in replies:
            node_id = msg.metadata.src_node_id
            stats.count_reply(msg)
            try:
                metrics, n = self._check_reply(server_round, msg, self._eval_version)
                acc, loss = float(metrics[P.EVAL_ACCURACY]), float(metrics[P.EVAL_LOSS])
                if not (np.isfinite(acc) and np.isfinite(loss)):
                    raise ValueError("non-finite evaluation metrics")
            except (ValueError, TypeError, KeyError) as exc:
                self._reject(server_round, node_id, f"evaluate: {exc}")
                continue
            self.node_mask_version[node_id] = self._eval_version
            answered.add(node_id)
            rows.append((n, acc, loss))
        self._forget_silent_nodes(self._eval_nodes, answered)
        if not rows:
            return None
        total = sum(n for n, _, _ in rows)
        return MetricRecord(
            {
                P.EVAL_ACCURACY: sum(n * a for n, a, _ in rows) / total,
                P.EVAL_LOSS: sum(n * lo for n, _, lo in rows) / total,
            }
        )
