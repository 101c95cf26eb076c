"""FedRTS's topology adjustment (TSAdj): Thompson sampling over the links of a sparse model.

FedRTS (Huang et al., "FedRTS: Federated Robust Pruning via Combinatorial Thompson
Sampling", NeurIPS 2025) casts the mask update of dynamic sparse FL as a combinatorial
multi-armed bandit: every link (prunable weight) is an arm with a Beta posterior of how
likely it belongs in a good topology. Instead of FedDST's deterministic prune-and-regrow
from one round's aggregate, the server keeps the posteriors across adjustments
("farsighted": what earlier, now unsampled, clients reported stays in them), samples from
them, and keeps the links with the largest samples ("probabilistic decisions"). The
clients upload only the positions of their largest gradients, not dense gradients.

What the paper's description fixes, and what we chose where it leaves a detail open
(the equations were not available to us; see experiments/RESULTS.md):
- a Beta(alpha, beta) posterior per link, updated with a reward r in [0, 1] as
  alpha += r, beta += 1 - r (`LinkPosterior.observe`); the prior comes from the initial
  mask (alpha = 1 + strength on kept links, beta = 1 + strength on pruned ones);
- the reward fuses the two sources that can observe a link (`rewards`): a kept link, the
  aggregated (global) model: 1 if it is among the (1 - fraction) largest-|w| kept links
  of its layer (it would survive magnitude pruning), else 0; a pruned link, the clients:
  the share of reporting clients whose top-gradient positions include it;
- when links are observed: as in a combinatorial semi-bandit, the links the current
  topology plays (the kept ones) are observed in every round whose updates were
  aggregated, from the new global model; the pruned links only at an adjustment, when
  the clients vote. A first adjustment from a fresh mask then rests on `interval`
  observations of each kept link, not one, and drops the links magnitude pruning would
  drop, nearly always, rather than one good link in five;
- the action (`sampled_topology`): per layer, sample theta ~ Beta(alpha, beta), keep the
  layer's number of links, the (1 - fraction) share of kept links with the largest theta
  stays, and the remaining slots go to the largest theta among the other kept links and
  the pruned links with evidence (`LinkPosterior.evidence`: some reward so far): at most
  `fraction` of a layer changes, as in FedDST's adjustment.

Why growth is limited to links with evidence: fc1 of Conv-2 has about 6 M pruned links,
each at its prior Beta(1, 2) until a client votes for it. The largest of 6 M samples from
even that weak prior is close to 1, so sampling over all of them regrew almost uniformly
at random, above the few hundred links the clients voted for (Beta(2, 2) at best after
one vote). From a random first mask, FedRTS then stayed at chance (0.11 on `default`,
cold, at commit 6cac097) while FedDST, which regrows the links with the largest reported
gradients, left it. A link nobody ever voted for has no posterior to speak of; Thompson
sampling explores among the arms it has observed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from fedprune.codec import CodecError
from fedprune.masks import Masks
from fedprune.topk import decode_position_list, encode_positions

VOTES = "gp"  # wire prefix: "gp/<name>", a client's top-gradient positions (varint gaps)


class LinkPosterior:
    """Beta(alpha, beta) per link of each prunable layer (float32 tensors, the layer's
    shape)."""

    def __init__(self, alpha: Mapping[str, torch.Tensor], beta: Mapping[str, torch.Tensor]):
        self.alpha = {k: v.to(torch.float32).clone() for k, v in alpha.items()}
        self.beta = {k: v.to(torch.float32).clone() for k, v in beta.items()}

    @classmethod
    def from_masks(cls, masks: Mapping[str, torch.Tensor], strength: float = 1.0):
        """The prior: Beta(1 + strength, 1) on kept links, Beta(1, 1 + strength) on pruned."""
        alpha = {k: 1.0 + strength * m.to(torch.float32) for k, m in masks.items()}
        beta = {k: 1.0 + strength * (~m.bool()).to(torch.float32) for k, m in masks.items()}
        return cls(alpha, beta)

    def observe(
        self,
        reward: Mapping[str, torch.Tensor],
        where: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """One observation per link: alpha += r, beta += 1 - r (r in [0, 1]); with `where`,
        of the links where it is True only (the others were not observed)."""
        for k, r in reward.items():
            if r.min() < 0 or r.max() > 1:
                raise ValueError(f"reward of {k!r} outside [0, 1]")
            if where is None:
                self.alpha[k].add_(r)
                self.beta[k].add_(1.0 - r)
            else:
                seen = where[k].bool()
                self.alpha[k][seen] += r[seen]
                self.beta[k][seen] += 1.0 - r[seen]

    def sample(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """theta ~ Beta(alpha, beta) per link (float64)."""
        return {
            k: torch.from_numpy(
                rng.beta(self.alpha[k].double().numpy(), self.beta[k].double().numpy())
            )
            for k in self.alpha
        }

    def evidence(self) -> dict[str, torch.Tensor]:
        """Per link, whether it has had any reward: kept in the first mask (its prior), kept
        by the aggregated model since, or voted for by a client. alpha starts at exactly 1
        on the other links and grows only by a positive reward."""
        return {k: a > 1.0 for k, a in self.alpha.items()}

    def mean(self) -> dict[str, torch.Tensor]:
        return {k: self.alpha[k] / (self.alpha[k] + self.beta[k]) for k in self.alpha}

    def state_dict(self) -> dict:
        return {"alpha": {k: v.clone() for k, v in self.alpha.items()},
                "beta": {k: v.clone() for k, v in self.beta.items()}}  # fmt: skip

    def load_state_dict(self, state: Mapping) -> None:
        if set(state["alpha"]) != set(self.alpha):
            raise ValueError("the posterior's layers are not this model's")
        self.alpha = {k: v.clone().float() for k, v in state["alpha"].items()}
        self.beta = {k: v.clone().float() for k, v in state["beta"].items()}


def swap_count(kept: int, numel: int, fraction: float) -> int:
    """Links of a layer that may change in one adjustment: `fraction` of its kept ones, no
    more than it has pruned ones to exchange them with."""
    return min(math.floor(fraction * kept), numel - kept)


def top_gradient_positions(
    importance: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], fraction: float
) -> dict[str, torch.Tensor]:
    """What a FedRTS client uploads: per layer, the flat positions (ascending, int64) of the
    `swap_count` pruned links with the largest importance (squared summed gradient, so the
    largest |gradient|)."""
    out = {}
    for name, mask in masks.items():
        flat = mask.reshape(-1)
        n = swap_count(int(flat.sum()), flat.numel(), fraction)
        if n <= 0:
            continue
        g = importance[name].reshape(-1).to(torch.float64)
        g = torch.where(flat, torch.tensor(-math.inf, dtype=torch.float64), g)
        # topk, not a full sort: this runs on the device (fc1: 0.2 s against 1.2 s).
        out[name] = torch.sort(torch.topk(g, n, sorted=False).indices).values
    return out


def rewards(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    votes: Mapping[str, torch.Tensor],
    voters: int,
    fraction: float,
) -> dict[str, torch.Tensor]:
    """This adjustment's reward per link (float32, in [0, 1]): for a kept link, 1 if the
    aggregated model keeps it among its layer's largest-|w| (1 - fraction) share, else 0;
    for a pruned link, the share of the `voters` clients whose top-gradient positions
    include it (`votes` counts them per link; 0 without voters)."""
    out = {}
    for name, mask in masks.items():
        flat = mask.reshape(-1).bool()
        kept = int(flat.sum())
        stay = kept - swap_count(kept, flat.numel(), fraction)
        # Sorting only the kept links: a round's observation costs ~0.25 M values on fc1,
        # not 6.4 M (the same order as a stable sort of all with the pruned ones last).
        where = flat.nonzero().squeeze(1)
        w = weights[name].reshape(-1)[where].abs().to(torch.float64)
        survivors = where[torch.sort(w, descending=True, stable=True).indices[:stay]]
        r = torch.zeros(flat.numel(), dtype=torch.float32)
        if voters > 0:
            r = (votes[name].reshape(-1).to(torch.float32) / voters).clamp_(0.0, 1.0)
            r[flat] = 0.0
        r[survivors] = 1.0
        out[name] = r.reshape(mask.shape)
    return out


def sampled_topology(
    theta: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    fraction: float,
    candidates: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """The sampled action: per layer, as many links as now; the kept links with the largest
    theta stay (all but `swap_count`), and the freed slots go to the largest theta among
    the other kept links and the pruned `candidates` (all pruned links if None), ties to
    the lower position. The other kept links alone fill the freed slots, so a pruned link
    outside the candidates never grows."""
    out = {}
    for name, mask in masks.items():
        flat = mask.reshape(-1).bool()
        kept = int(flat.sum())
        n = swap_count(kept, flat.numel(), fraction)
        t = theta[name].reshape(-1).to(torch.float64)
        low = torch.tensor(-math.inf, dtype=torch.float64)
        stay = torch.sort(torch.where(flat, t, low), descending=True, stable=True).indices
        stay = stay[: kept - n]
        new = torch.zeros_like(flat)
        new[stay] = True
        rest = torch.where(new, low, t)
        if candidates is not None:
            # theta is in [0, 1]: lifting the candidates by 2 ranks all of them first.
            first = flat | candidates[name].reshape(-1).bool()
            rest = torch.where(first & ~new, rest + 2.0, rest)
        new[torch.sort(rest, descending=True, stable=True).indices[:n]] = True
        out[name] = new.reshape(mask.shape)
    return out


def encode_votes(positions: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """`top_gradient_positions` as wire arrays ("gp/<name>", varint gaps as in
    `fedprune.topk`)."""
    return {f"{VOTES}/{n}": encode_positions(p.numpy()) for n, p in positions.items()}


def decode_votes(
    arrays: Mapping[str, np.ndarray], masks: Mapping[str, torch.Tensor], fraction: float
) -> dict[str, torch.Tensor]:
    """A client's untrusted "gp/" arrays as flat positions per layer: only known layers, at
    most `swap_count` positions each, all of them pruned links; CodecError naming the key
    otherwise."""
    out = {}
    for key, data in arrays.items():
        name = key.partition("/")[2]
        if not key.startswith(f"{VOTES}/") or name not in masks:
            raise CodecError(f"unexpected key {key!r}: not '{VOTES}/<prunable layer>'")
        flat = masks[name].reshape(-1)
        limit = max(swap_count(int(flat.sum()), flat.numel(), fraction), 0)
        where = torch.from_numpy(decode_position_list(key, data, limit, flat.numel()))
        if flat[where].any():
            raise CodecError(f"{key!r}: a position of a kept link (only pruned links grow back)")
        out[name] = where
    return out
