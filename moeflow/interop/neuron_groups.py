"""Read-ME-style refactoring of one dense FFN into experts: neuron groups and a router for them.

A dense FFN is a sum over its F hidden neurons: y = Σ_f act_f(x) · w_out[f]. Splitting the
neurons into E groups of F/E makes E experts whose outputs sum to y exactly; an MoE that runs
only k of them per token computes the part of y that those k groups carry. Two things decide
how much of y is kept, and both are read off activation statistics of the dense model on
calibration data:

Which neurons share an expert (`balanced_clusters`). Neurons that are active on the same tokens
should sit together, so that a token's large activations concentrate in few groups (the idea of
MoEfication and Read-ME). Each neuron is described by its |activation| over the calibration
tokens, standardised per neuron, so the cosine of two neurons' vectors is the Pearson
correlation of their activation magnitudes: their co-activation. Spherical k-means clusters
these vectors; every assignment step is balanced (each group gets exactly F/E neurons, so every
expert has the same width and an expert tensor of one shape) by giving (neuron, group) pairs in
order of decreasing similarity to groups that still have room.

How the router ranks the groups (`fit_router`). Let c_te = ‖y_e(x_t)‖, the size of group e's
share of token t's output: dropping the groups with the smallest shares loses the least. A
softmax router gives p_te ∝ exp(l_te), so routing p_te ∝ c_te^τ needs logits l_te = τ·log c_te
+ (anything constant over e for token t). The router is linear and bias-free, l = x·Wᵀ, so the
best it can do in the least-squares sense is W = argmin ‖X Wᵀ − Z‖² with Z the per-token-centred
log c (centring removes the per-token constant that softmax ignores); a small ridge term keeps
the solve well posed when features are collinear. Least squares on the log shares rather than a
"mean input direction" per group because the shares, not the inputs, are what routing must
order, and the fit uses every group's share on every token (a mean direction ignores how much
a group is active beyond its being the largest). Finally W is scaled so the logits have a
per-token standard deviation of `logit_std` (0.1 by default): the ranking, hence which experts
are chosen, does not depend on the scale, while a small one keeps the softmax near uniform, so
the combine weights E·p (moeflow.interop.upcycle) start within about ±10% of 1 and the
upcycled layer starts close to the dense sum of its chosen groups.

`group_quality` measures both on held-out calibration tokens: how often the router's first
choice is the largest share, and the relative error ‖y − Σ_{chosen} y_e‖² / ‖y‖² with the
router's choice, the best possible (oracle) choice and a random choice of k groups.

Legend: T calibration tokens, D model dim, F ffn neurons, E groups (experts), K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.ops.activation import apply_activation


def ffn_activations(fc_in_w: torch.Tensor, fc_in_b: torch.Tensor | None, x_TD: torch.Tensor,
                    activation: str) -> torch.Tensor:
    """act_TF: the hidden activations of a dense FFN (after GELU, or SwiGLU's silu(gate)·up)."""
    h = x_TD @ fc_in_w.t()
    if fc_in_b is not None:
        h = h + fc_in_b
    return apply_activation(h, activation)


def group_outputs(act_TF: torch.Tensor, fc_out_w: torch.Tensor, groups_EG: torch.Tensor
                  ) -> torch.Tensor:
    """y_TED: each group's share of the FFN output (without the output bias); fc_out_w [D, F]."""
    return torch.stack([act_TF[:, g] @ fc_out_w[:, g].t() for g in groups_EG], dim=1)


def coactivation_features(act_TF: torch.Tensor) -> torch.Tensor:
    """feat_FT: unit vectors whose dot products are the neurons' correlations of |activation|."""
    mag = act_TF.abs().double()
    mag = mag - mag.mean(0, keepdim=True)
    return torch.nn.functional.normalize(mag.t(), dim=1)


def balanced_assign(scores_FE: torch.Tensor) -> torch.Tensor:
    """group_F: every neuron in one group, F/E per group, pairs taken by decreasing score."""
    F_, E = scores_FE.shape
    size = F_ // E
    room = [size] * E
    group = torch.full((F_,), -1, dtype=torch.int64)
    done = 0
    for flat in torch.argsort(scores_FE.flatten(), descending=True, stable=True).tolist():
        f, e = divmod(flat, E)
        if group[f] < 0 and room[e]:
            group[f] = e
            room[e] -= 1
            done += 1
            if done == F_:
                break
    return group


def balanced_clusters(feat_FT: torch.Tensor, num_groups: int, iters: int = 25,
                      seed: int = 0) -> torch.Tensor:
    """groups_EG: neuron indices of each group (sorted), by balanced spherical k-means."""
    F_ = feat_FT.shape[0]
    if F_ % num_groups:
        raise ValueError(f"{num_groups} groups do not divide {F_} neurons")
    gen = torch.Generator().manual_seed(seed)
    # k-means++ seeding on cosine distance: spread the first centroids over the neurons.
    seeds = [int(torch.randint(F_, (1,), generator=gen))]
    for _ in range(1, num_groups):
        dist = (1 - feat_FT @ feat_FT[seeds].t()).clamp_min(0).min(1).values
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full_like(dist, 1 / F_)
        seeds.append(int(torch.multinomial(probs.float(), 1, generator=gen)))
    cent_ET = feat_FT[seeds]
    group = None
    for _ in range(iters):
        new = balanced_assign(feat_FT @ cent_ET.t())
        if group is not None and torch.equal(new, group):
            break
        group = new
        cent_ET = torch.zeros_like(cent_ET).index_add_(0, group, feat_FT)
        cent_ET = torch.nn.functional.normalize(cent_ET, dim=1)
    return torch.stack([torch.nonzero(group == e).flatten() for e in range(num_groups)])


def fit_router(x_TD: torch.Tensor, shares_TE: torch.Tensor, logit_std: float = 0.1,
               ridge: float = 1e-3) -> torch.Tensor:
    """w_ED: the bias-free linear router whose logits best fit the centred log shares."""
    X = x_TD.double()
    Z = shares_TE.double().clamp_min(1e-12).log()
    Z = Z - Z.mean(1, keepdim=True)
    gram = X.t() @ X
    reg = ridge * gram.diagonal().mean().clamp_min(1e-12)
    W_DE = torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype), X.t() @ Z)
    logits = X @ W_DE
    spread = (logits - logits.mean(1, keepdim=True)).std()
    if spread > 0:
        W_DE = W_DE * (logit_std / spread)
    return W_DE.t().to(x_TD.dtype).contiguous()


@dataclass(frozen=True)
class GroupQuality:
    """Held-out measurements of one layer's groups and router (see the module docstring)."""

    router_top1_is_largest: float  # router's first choice = the group with the largest share
    rel_error_router: float  # ‖y − Σ_{router's top-k} y_e‖² / ‖y‖², mean over tokens
    rel_error_oracle: float  # the same with the k largest shares
    rel_error_random: float  # the same with k groups drawn at random
    coactivation_within: float  # mean correlation of |act| between neurons of one group
    coactivation_random_split: float  # the same for a random balanced split

    def to_dict(self) -> dict:
        return {k: round(v, 5) for k, v in self.__dict__.items()}


def _rel_error(y_TED: torch.Tensor, chosen_TK: torch.Tensor) -> float:
    full_TD = y_TED.sum(1)
    kept_TD = y_TED.gather(1, chosen_TK[..., None].expand(-1, -1, y_TED.shape[2])).sum(1)
    err_T = (full_TD - kept_TD).pow(2).sum(1) / full_TD.pow(2).sum(1).clamp_min(1e-12)
    return float(err_T.mean())


def _within(feat_FT: torch.Tensor, groups_EG: torch.Tensor) -> float:
    vals = []
    for g in groups_EG:
        sim = feat_FT[g] @ feat_FT[g].t()
        n = len(g)
        vals.append(float((sim.sum() - sim.diagonal().sum()) / max(n * (n - 1), 1)))
    return sum(vals) / len(vals)


def group_quality(x_TD: torch.Tensor, act_TF: torch.Tensor, fc_out_w: torch.Tensor,
                  groups_EG: torch.Tensor, w_ED: torch.Tensor, top_k: int, seed: int = 0
                  ) -> GroupQuality:
    gen = torch.Generator().manual_seed(seed)
    y_TED = group_outputs(act_TF, fc_out_w, groups_EG).double()
    shares_TE = y_TED.norm(dim=2)
    logits_TE = x_TD.double() @ w_ED.double().t()
    T, E = shares_TE.shape
    router_TK = torch.sort(logits_TE, dim=1, descending=True, stable=True).indices[:, :top_k]
    oracle_TK = torch.sort(shares_TE, dim=1, descending=True, stable=True).indices[:, :top_k]
    random_TK = torch.argsort(torch.rand(T, E, generator=gen), dim=1)[:, :top_k]
    feat_FT = coactivation_features(act_TF)
    random_split = torch.randperm(feat_FT.shape[0], generator=gen).view(E, -1)
    return GroupQuality(
        router_top1_is_largest=float((router_TK[:, 0] == oracle_TK[:, 0]).double().mean()),
        rel_error_router=_rel_error(y_TED, router_TK),
        rel_error_oracle=_rel_error(y_TED, oracle_TK),
        rel_error_random=_rel_error(y_TED, random_TK),
        coactivation_within=_within(feat_FT, groups_EG),
        coactivation_random_split=_within(feat_FT, random_split),
    )
