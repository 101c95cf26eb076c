"""TEST ONLY: the project's ClientApp, with nodes that lie and poison (`simulate-attacks`).

`app` is `clients.client_app`'s handlers behind one ClientApp mod (Flower's
`ClientApp(mods=[...])`): every message runs the honest handler, then a node whose
partition id `simulate-attacks` names rewrites the reply, as a device under an attacker's
control could. The project's own ClientApp is untouched and ignores the setting.

Attacks (`fedprune.settings.ATTACKS`), each a reply that passes every format check:
- `num-partitions`: its identity claims a federation of HUGE_NUM_PARTITIONS nodes;
- `client-id`: its identity claims another node's client id (partition 0, or 1 for 0);
- `num-examples`: its train and evaluate replies claim CLAIMED_EXAMPLES examples (its
  importance is left as it is: an honest node scales importance by the samples its round
  processed, K x B, whatever data it holds, so the count does not weigh it);
- `values`: its kept values are multiplied by POISON_SCALE (finite, huge, sign flipped);
- `importance`: its importance is POISON_IMPORTANCE on the STEER_FRACTION of each layer's
  positions that its own honest importance ranks lowest, and 0 elsewhere: it tries to make
  the server keep what the data says is useless.

`flwr run` takes the ClientApp from the project's pyproject.toml, so `hostile_project`
writes a copy of the project whose pyproject names this module's `app`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

import clients.client_app as honest
from clients.node_state import held_mask
from fedprune import protocol as P
from fedprune.codec import CodecError, decode_update, encode_update
from fedprune.data import data_shape
from fedprune.importance_code import ImportanceCode, ImportanceUpload
from fedprune.models import build_model, param_shapes
from fedprune.settings import Settings, parse_attacks

HUGE_NUM_PARTITIONS = 1_000_000
CLAIMED_EXAMPLES = 999_999_999  # the most that the reply checks alone believe (10^9)
POISON_SCALE = -1e6  # sign flipped: a positively scaled ReLU net keeps its argmax
POISON_IMPORTANCE = 1e20
STEER_FRACTION = 0.05


def attacks_of(context: Context) -> tuple[str, ...]:
    """The attacks this node plays (none unless `simulate-attacks` names its partition)."""
    text = str(context.run_config.get("simulate-attacks", ""))
    partition_id = context.node_config.get(P.PARTITION_ID)
    return () if partition_id is None else parse_attacks(text).get(int(partition_id), ())


def attack_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: the honest reply, rewritten by this node's attacks."""
    reply = call_next(msg, context)
    attacks = attacks_of(context)
    if not attacks or reply.has_error():
        return reply
    kind = msg.metadata.message_type
    if kind == f"{MessageType.QUERY}.{P.IDENTIFY_ACTION}":
        lie_about_identity(reply, attacks, context)
    elif kind == MessageType.TRAIN:
        poison_train_reply(reply, attacks, context)
    elif kind == MessageType.EVALUATE and "num-examples" in attacks:
        reply.content[P.METRICS][P.NUM_EXAMPLES] = CLAIMED_EXAMPLES
    return reply


def lie_about_identity(reply: Message, attacks: tuple[str, ...], context: Context) -> None:
    identity = reply.content[P.IDENTITY]
    if "num-partitions" in attacks:
        identity[P.NUM_PARTITIONS] = HUGE_NUM_PARTITIONS
    if "client-id" in attacks:
        own = int(context.node_config[P.PARTITION_ID])
        identity[P.PARTITION_ID] = 1 if own == 0 else 0


def poison_train_reply(reply: Message, attacks: tuple[str, ...], context: Context) -> None:
    """Rewrite a train reply's values, importance and count (through the codec's own
    encoder, so the reply is well formed)."""
    if not {"values", "importance", "num-examples"} & set(attacks):
        return
    settings = Settings.from_run_config(context.run_config)
    num_classes, input_shape = data_shape(settings.data_spec())
    shapes = param_shapes(build_model(settings.model, num_classes, input_shape=input_shape))
    _, masks = held_mask(context, shapes)
    record, metrics = reply.content[P.ARRAYS], reply.content[P.METRICS]
    arrays = {key: record[key].numpy() for key in record}
    has_importance = P.FIXED_IMPORTANCE in metrics  # sent with every importance upload
    try:
        params, importance = decode_update(arrays, shapes, masks, has_importance)
    except CodecError:
        return  # its honest training already went wrong (a model the attack blew up)
    if importance is not None:  # coded on the wire: the attack edits its dense values
        importance = {
            name: torch.from_numpy(g.dense()).reshape(shapes[name])
            if isinstance(g, ImportanceUpload)
            else g
            for name, g in importance.items()
        }
    if "values" in attacks:
        params = {name: p * POISON_SCALE for name, p in params.items()}
    if importance is not None and "importance" in attacks:
        importance = {name: steering_importance(g) for name, g in importance.items()}
    if "num-examples" in attacks:
        metrics[P.NUM_EXAMPLES] = CLAIMED_EXAMPLES
    code = ImportanceCode() if settings.importance_code == "coded" else None
    encoded = encode_update(params, masks, importance, importance_code=code)
    reply.content[P.ARRAYS] = ArrayRecord({k: Array(v) for k, v in encoded.items()})


def steering_importance(honest_importance: torch.Tensor) -> torch.Tensor:
    """POISON_IMPORTANCE on the STEER_FRACTION of positions with the lowest honest
    importance, 0 elsewhere."""
    flat = honest_importance.reshape(-1)
    k = max(1, int(STEER_FRACTION * flat.numel()))
    out = torch.zeros_like(flat)
    out[torch.topk(flat, k, largest=False).indices] = POISON_IMPORTANCE
    return out.reshape(honest_importance.shape)


app = ClientApp(mods=[attack_mod])
app.train()(honest.train)
app.evaluate()(honest.evaluate)
app.query(P.IDENTIFY_ACTION)(honest.identify)
app.query(P.PROFILE_ACTION)(honest.profile)

PROJECT_DIR = Path(__file__).resolve().parent.parent
PACKAGES = ("fedprune", "strategies", "clients", "experiments")


def hostile_project(dest: Path) -> Path:
    """A copy of this project (its packages and pyproject.toml) whose ClientApp is `app`;
    `flwr run` on it plays `simulate-attacks`. Returns the project folder."""
    project = Path(dest) / "fedprune"
    if project.exists():
        shutil.rmtree(project)
    ignore = shutil.ignore_patterns("__pycache__", "results", "presets", "*.png", "*.pt")
    for package in PACKAGES:
        shutil.copytree(PROJECT_DIR / package, project / package, ignore=ignore)
    pyproject = (PROJECT_DIR / "pyproject.toml").read_text()
    honest_line = 'clientapp = "clients.client_app:app"'
    if honest_line not in pyproject:
        raise RuntimeError(f"pyproject.toml has no line {honest_line!r} to replace")
    hostile_line = 'clientapp = "experiments.hostile:app"'
    (project / "pyproject.toml").write_text(pyproject.replace(honest_line, hostile_line))
    (project / "README.md").write_text("A copy of fedprune with hostile nodes (test only).\n")
    return project
