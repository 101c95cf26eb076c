"""FedRTS: the Thompson-sampling topology adjustment on plain tensors (rewards, posterior,
sampled action), and the method through the strategy and the ClientApp: nodes upload only
top-gradient positions of pruned links, the density holds, the mask changes."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array

from fedprune import protocol as P
from fedprune.codec import CodecError
from fedprune.costs import named_profile
from fedprune.masks import density
from fedprune.models import build_model, prunable_names
from fedprune.settings import Settings
from fedprune.thompson import (
    LinkPosterior,
    decode_votes,
    encode_votes,
    rewards,
    sampled_topology,
    swap_count,
    top_gradient_positions,
)
from strategies.fedrts import FedRTS
from tests.inprocess import Federation

MASK = {"w": torch.tensor([True, True, True, True, False, False, False, False, False, False])}
WEIGHTS = {"w": torch.tensor([0.9, -0.1, 0.5, 0.05, 0, 0, 0, 0, 0, 0])}


def test_rewards_fuse_the_global_model_for_kept_links_and_client_votes_for_pruned_ones():
    votes = {"w": torch.tensor([0, 0, 0, 0, 3, 1, 0, 0, 0, 2])}
    r = rewards(WEIGHTS, MASK, votes, voters=4, fraction=0.5)["w"]
    # Two of four kept links may go: the two largest |w| survive (reward 1), the others 0.
    assert r[:4].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert r[4:].tolist() == pytest.approx([0.75, 0.25, 0, 0, 0, 0.5])
    no_votes = rewards(WEIGHTS, MASK, {"w": torch.zeros(10)}, voters=0, fraction=0.5)["w"]
    assert no_votes[4:].sum() == 0


def test_the_posterior_accumulates_rewards_across_adjustments():
    post = LinkPosterior.from_masks(MASK)
    assert post.alpha["w"][:4].tolist() == [2.0] * 4 and post.beta["w"][4:].tolist() == [2.0] * 6
    r = torch.linspace(0, 1, 10)
    post.observe({"w": r})
    post.observe({"w": r})
    assert torch.allclose(post.alpha["w"], 1 + MASK["w"].float() + 2 * r)
    assert torch.allclose(post.beta["w"], 1 + (~MASK["w"]).float() + 2 * (1 - r))
    with pytest.raises(ValueError, match="outside"):
        post.observe({"w": r + 1})


def test_the_sampled_topology_keeps_the_count_and_changes_at_most_the_fraction():
    rng = np.random.default_rng(0)
    for _ in range(50):
        theta = {"w": torch.from_numpy(rng.random(10))}
        new = sampled_topology(theta, MASK, 0.5)["w"]
        assert int(new.sum()) == 4
        assert int((new & ~MASK["w"]).sum()) <= swap_count(4, 10, 0.5) == 2
    # A confident posterior decides: the two strongest kept links stay, the two strongest
    # pruned links replace the weak kept ones.
    theta = {"w": torch.tensor([0.9, 0.1, 0.8, 0.2, 0.95, 0.3, 0.0, 0.0, 0.0, 0.7])}
    new = sampled_topology(theta, MASK, 0.5)["w"]
    assert new.nonzero().squeeze(1).tolist() == [0, 2, 4, 9]


def test_growth_goes_to_links_with_evidence_not_to_the_largest_of_a_million_priors():
    # 100 kept links, 1 M pruned ones at their prior Beta(1, 2); clients voted for 10.
    mask = torch.zeros(1_000_100, dtype=torch.bool)
    mask[:100] = True
    votes = torch.zeros(mask.numel(), dtype=torch.int32)
    voted = torch.arange(500_000, 500_010)
    votes[voted] = 1
    weights = torch.zeros(mask.numel())
    weights[:100] = torch.linspace(1, 2, 100)
    post = LinkPosterior.from_masks({"w": mask})
    post.observe(rewards({"w": weights}, {"w": mask}, {"w": votes}, voters=1, fraction=0.1))
    evidence = post.evidence()["w"]
    assert evidence.nonzero().squeeze(1).tolist() == list(range(100)) + voted.tolist()
    theta = post.sample(np.random.default_rng(0))
    grown = lambda new: set((new & ~mask).nonzero().squeeze(1).tolist())  # noqa: E731
    # Over all pruned links, the 10 free slots go to unvoted links: the maximum of 1 M
    # prior samples beats a voted link's Beta(2, 2) sample.
    assert not grown(sampled_topology(theta, {"w": mask}, 0.1)["w"]) & set(voted.tolist())
    new = sampled_topology(theta, {"w": mask}, 0.1, post.evidence())["w"]
    assert int(new.sum()) == 100
    assert grown(new) and grown(new) <= set(voted.tolist())


def test_nodes_vote_for_their_largest_gradients_among_pruned_links_only():
    importance = {"w": torch.tensor([9.0, 9, 9, 9, 1, 5, 2, 7, 0, 3])}
    chosen = top_gradient_positions(importance, MASK, 0.5)
    assert chosen["w"].tolist() == [5, 7]
    back = decode_votes(encode_votes(chosen), MASK, 0.5)
    assert back["w"].tolist() == [5, 7]
    with pytest.raises(CodecError, match="kept link"):
        decode_votes(encode_votes({"w": torch.tensor([0, 5])}), MASK, 0.5)
    with pytest.raises(CodecError, match="at most 2"):
        decode_votes(encode_votes({"w": torch.tensor([5, 6, 7])}), MASK, 0.5)
    with pytest.raises(CodecError, match="unexpected key"):
        decode_votes({"gp/zz": np.zeros(1, np.uint8)}, MASK, 0.5)


def test_fedrts_adjusts_the_mask_from_votes_at_constant_density():
    cfg = Settings(
        method="fedrts",
        target_density=0.2,
        model="small-cnn",
        cost_profile="paper-uniform",
        local_steps=2,
        batch_size=10,
        clients_per_round=3,
        reconfig_interval=2,
    )
    model = build_model("small-cnn", seed=0)
    from strategies.server_app import starting_inputs

    masks, _ = FedRTS.starting_point(cfg, starting_inputs(cfg))
    strategy = FedRTS(
        params={n: p.detach().clone() for n, p in model.named_parameters()},
        masks=masks,
        profile=named_profile("paper-uniform", prunable_names(model)),
        clients_per_round=3,
        **FedRTS.options(cfg),
    )
    strategy.importance.num_rounds = 5
    fed = Federation(cfg, 3)
    start = density(strategy.masks)
    messages, replies, _ = fed.train_round(strategy, 1)  # no adjustment: no votes asked
    assert all(P.TOP_GRADIENTS not in m.content[P.CONFIG] for m in messages)
    assert all(not any(k.startswith("gp/") for k in r.content[P.ARRAYS]) for r in replies)
    before = {k: m.clone() for k, m in strategy.masks.items()}
    messages, replies, _ = fed.train_round(strategy, 2)
    fraction = float(messages[0].content[P.CONFIG][P.TOP_GRADIENTS])
    for reply in replies:
        record = reply.content[P.ARRAYS]
        votes = {k: record[k].numpy() for k in record if k.startswith("gp/")}
        assert votes, "an adjustment round's reply carries top-gradient positions"
        positions = decode_votes(votes, before, fraction)  # only pruned links, bounded
        count = sum(len(p) for p in positions.values())
        limit = sum(swap_count(int(m.sum()), m.numel(), fraction) for m in before.values())
        assert 0 < count <= limit
        # Positions, not dense gradients: a few bytes per vote.
        assert sum(a.nbytes for a in votes.values()) <= 5 * count
    assert strategy.stats[2].replies == 3 and strategy._voters == 3
    assert strategy.mask_version == 1
    changed = sum(int((strategy.masks[k] ^ before[k]).sum()) for k in before)
    assert changed > 0
    assert density(strategy.masks) == pytest.approx(start)
    for k, m in strategy.masks.items():
        assert int(m.sum()) == int(before[k].sum()), k
        grown = int((m & ~before[k]).sum())
        assert grown <= math.floor(fraction * int(before[k].sum())), k

    # A round that did not ask refuses positions: that reply is dropped, the others count.
    def tamper(replies):
        replies[0].content[P.ARRAYS]["gp/fc1.weight"] = Array(np.zeros(1, np.uint8))
        return replies

    fed.train_round(strategy, 3, tamper=tamper)
    assert strategy.stats[3].replies == 2 and strategy.stats[3].dropped == 1
