"""RMT cross-domain meta-memory (Wang et al., CVPR 2022): a bank of source style statistics (channel means
and stds) with FAISS-indexed top-k reads, similarity-weighted EMA writes and memory-based feature restyling.

The memory contract (as built): the bank is a SUBMODULE of the model (`model.memory.bank`, its items are
buffers), and its write happens INSIDE `forward`, in training mode only, once per training step, after the
step's reads; the write gathers the batch statistics from every DDP rank (`distributed.all_gather_cat`, the
one collective allowed inside `forward`) so every rank applies the same EMA update. Evaluation never writes.
`train_step` knows nothing of the memory. A test double of the memory must follow the same contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fssmeta import distributed
from fssmeta.config import MemoryConfig
from fssmeta.episode import Episode
from fssmeta.losses import cross_entropy
from fssmeta.models.ops import masked_average_pool

IndexKind = Literal["flat", "ivf", "torch"]

# Added to the variance before the square root, so constant feature maps give a finite std and f_norm.
STD_EPS = 1e-5


def instance_stats(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> per-instance channel mean and std, each (B, C); std = sqrt(biased var + 1e-5)."""
    mu = feat.mean(dim=(2, 3))
    sigma = (feat.var(dim=(2, 3), unbiased=False) + STD_EPS).sqrt()
    return mu, sigma


class MetaMemory(nn.Module):
    """N memory items {m_j, e_j} of C channels: m_j style means, e_j style stds (both buffers).

    A model owns its bank through `MemoryTransfer` (so the items are saved in checkpoints, moved with the model
    and served with it); in training it writes once per step with statistics gathered from every rank, so all
    ranks apply the same update. Items are updated by EMA only, never by gradients.

    Reads: the means and the stds are searched separately (instance mu against the m_j, sigma against the
    e_j) by cosine similarity. A FAISS inner-product index over the L2-normalised items returns the top_k
    item ids; the similarities of those items are recomputed in torch, so the softmax weights are exact and
    differentiable w.r.t. the query (FAISS itself is outside the graph). `index="torch"` computes the full
    similarity matrix and `torch.topk` instead: the reference the FAISS path is tested against.

    The FAISS indexes are a cache of the buffers, rebuilt lazily whenever the buffers change (a write, a
    `load_state_dict`, a `.to(device)`, or any other in-place edit: the key is the tensors' identity and
    version counters), so they never go stale and never enter the state dict.
    """

    def __init__(
        self,
        *,
        num_items: int,
        channels: int,
        momentum: float = 0.9,
        alpha: float = 0.5,
        test_alpha: float | None = None,
        init: Literal["source", "random"] = "random",
        top_k: int = 8,
        temperature: float = 1.0,
        index: IndexKind = "flat",
        nlist: int = 16,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if index not in ("flat", "ivf", "torch"):
            raise ValueError(f"index must be 'flat', 'ivf' or 'torch', got {index!r}")
        if not 0.0 <= momentum <= 1.0 or not 0.0 <= alpha <= 1.0 or not 0.0 <= (test_alpha or 0.0) <= 1.0:
            raise ValueError(f"momentum, alpha and test_alpha must lie in [0, 1], got {momentum}, {alpha} and "
                             f"{test_alpha}")
        if init not in ("source", "random"):
            raise ValueError(f"init must be 'source' or 'random', got {init!r}")
        if temperature <= 0 or top_k < 1 or num_items < 1 or nlist < 1:
            raise ValueError("temperature, top_k, num_items and nlist must be positive")
        self.num_items, self.channels = num_items, channels
        self.momentum, self.alpha, self.temperature = momentum, alpha, temperature
        self.test_alpha = test_alpha  # alpha in eval mode; None = alpha
        self.top_k = min(top_k, num_items)
        self.index_kind: IndexKind = index
        # IVF needs at least one training point per list; nprobe = nlist keeps the search exhaustive.
        self.nlist = min(nlist, num_items)
        self.register_buffer("means", torch.randn(num_items, channels, generator=generator))  # (N, C)
        # Stds start in [0.5, 1.5): positive, and not all equal so the items are distinguishable.
        self.register_buffer("stds", torch.rand(num_items, channels, generator=generator) + 0.5)  # (N, C)
        # False until the first write when the items start from source statistics (`init: source`): that
        # write fills them (`_fill`) instead of blending into random items. Saved, so a resumed run keeps it.
        self.register_buffer("filled", torch.tensor(init == "random"))
        self._indexes: tuple[faiss.Index, faiss.Index] | None = None
        self._index_key: tuple | None = None
        self._gpu_resources: faiss.StandardGpuResources | None = None

    instance_stats = staticmethod(instance_stats)
    # Buffers added after checkpoints already existed, with the value such a checkpoint means (its bank was
    # trained): checkpoint.load_model_state fills them in when a state dict lacks them.
    legacy_buffers = {"filled": True}

    def __getstate__(self) -> dict:
        # SWIG index objects neither pickle nor deepcopy; they are rebuilt from the buffers on the next read.
        state = self.__dict__.copy()
        state.update(_indexes=None, _index_key=None, _gpu_resources=None)
        return state

    # ------------------------------------------------------------------ FAISS index (a cache of the buffers)

    def _buffers_key(self) -> tuple:
        return tuple((id(t), t._version, t.device, t.dtype) for t in (self.means, self.stds))

    def _build_index(self, items: torch.Tensor) -> faiss.Index:
        vectors = np.ascontiguousarray(F.normalize(items.detach().float(), dim=1).cpu().numpy())
        C = vectors.shape[1]
        if self.index_kind == "ivf":
            quantizer = faiss.IndexFlatIP(C)
            index = faiss.IndexIVFFlat(quantizer, C, self.nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = self.nlist
        else:
            index = faiss.IndexFlatIP(C)
        index.add(vectors)
        if items.is_cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, items.device.index or 0, index)
        return index

    def _current_indexes(self) -> tuple[faiss.Index, faiss.Index]:
        key = self._buffers_key()
        if self._indexes is None or key != self._index_key:
            self._indexes = (self._build_index(self.means), self._build_index(self.stds))
            self._index_key = key
        return self._indexes

    # ------------------------------------------------------------------ read

    def _retrieve(self, query: torch.Tensor, items: torch.Tensor, index: faiss.Index | None) -> torch.Tensor:
        """Softmax-weighted sum of the top_k items most cosine-similar to each query row. (B, C) -> (B, C)."""
        q = F.normalize(query, dim=1)  # (B, C)
        if index is None:
            _, ids = (q @ F.normalize(items.to(query.dtype), dim=1).t()).topk(self.top_k, dim=1)  # (B, k)
        else:
            q_np = np.ascontiguousarray(q.detach().float().cpu().numpy())
            _, ids_np = index.search(q_np, self.top_k)
            if (ids_np < 0).any():
                raise RuntimeError("FAISS returned fewer than top_k items; is nprobe too small?")
            ids = torch.from_numpy(ids_np).to(query.device)  # (B, k)
        picked = items[ids].to(query.dtype)  # (B, k, C): only the retrieved rows are touched
        sim = (q.unsqueeze(1) * F.normalize(picked, dim=-1)).sum(-1)  # (B, k), in torch: gradients reach `query`
        weights = (sim / self.temperature).softmax(dim=1)
        return (weights.unsqueeze(-1) * picked).sum(1)  # (B, C)

    def read(self, mu: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory style for each instance: (B, C) mean and std -> (mu_mem, sigma_mem), each (B, C)."""
        if self.index_kind == "torch":
            means_index = stds_index = None
        else:
            means_index, stds_index = self._current_indexes()
        return self._retrieve(mu, self.means, means_index), self._retrieve(sigma, self.stds, stds_index)

    # ------------------------------------------------------------------ write

    def _write_weights(self, stats: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, C) instance stats -> (N, B) write weights, each item's row summing to 1.

        docs/methods.md (RMT): s^{jb} are "softmax similarity weights of instance b over memory items", so the softmax
        runs over the items j for each instance b (each instance spreads a unit of mass over the bank). The
        update then needs each item's weights over the batch to sum to 1, or items would shrink or grow with
        the batch size; so each item's row is normalised over b. Dense over all N items (no top-k): writes
        run under no_grad and N is small.
        """
        sim = F.normalize(stats, dim=1) @ F.normalize(items, dim=1).t()  # (B, N)
        s = (sim / self.temperature).softmax(dim=1).t()  # (N, B): softmax over items j, per instance b
        return s / s.sum(dim=1, keepdim=True)

    @torch.no_grad()
    def write(
        self,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """EMA update m_j <- lambda m_j + (1 - lambda) sum_b s^{jb} mu_b (and e_j likewise with sigma).

        `mu`, `sigma` are (B, C). `gather` maps a local (B, C) batch to the global (B_total, C) one; under
        DDP pass an all-gather that concatenates every rank's batch, so every rank writes the same update.
        The default (identity) is the one-process case. The FAISS indexes follow on the next read.
        """
        gather = gather or (lambda t: t)
        mu = gather(mu.detach()).to(self.means)
        sigma = gather(sigma.detach()).to(self.stds)
        if not bool(self.filled):
            self._fill(mu, sigma)
            return
        lam = self.momentum
        new_means = lam * self.means + (1 - lam) * self._write_weights(mu, self.means) @ mu
        new_stds = lam * self.stds + (1 - lam) * self._write_weights(sigma, self.stds) @ sigma
        # In place, so the buffers' version counters move and the cached indexes are rebuilt.
        self.means.copy_(new_means)
        self.stds.copy_(new_stds)

    @torch.no_grad()
    def _fill(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        """Items from the first (B, C) source statistics: item j = instance j mod B, spread by a fixed
        deterministic jitter (0.1 x the batch's per-channel spread; identical on every rank, which all hold
        the same gathered batch) so that items repeated from one instance stay distinguishable."""
        B = mu.shape[0]
        pick = torch.arange(self.num_items, device=mu.device) % B
        noise = torch.randn(2, self.num_items, self.channels, generator=torch.Generator().manual_seed(0))
        noise = noise.to(mu)
        spread_mu = mu.std(0, unbiased=False) if B > 1 else mu.abs().mean(0)
        self.means.copy_(mu[pick] + 0.1 * spread_mu * noise[0])
        self.stds.copy_((sigma[pick] * (1 + 0.1 * noise[1])).clamp_min(STD_EPS))
        self.filled.fill_(True)

    # ------------------------------------------------------------------ orthogonality and restyling

    def orthogonality_loss(self) -> torch.Tensor:
        """L_orth = 1/(2 N^2) (sum_ij h_M^{ij} + sum_ij h_E^{ij}), h^{ij} = cos(item_i, item_j)^2 for i != j.

        Squared cosine (not |cos|) so the diagonal's constant 1 is left out and the value is 0 exactly for
        mutually orthogonal items and (N - 1) / N when all items coincide. The items are buffers moved only
        by the EMA write, so this is a diagnostic to log (no gradient can reach them): it measures the
        diversity the paper's loss encourages without changing what the write does.
        """
        N = self.num_items
        off_diagonal = ~torch.eye(N, dtype=torch.bool, device=self.means.device)
        total = self.means.new_zeros(())
        for items in (self.means, self.stds):
            keys = F.normalize(items, dim=1)
            total = total + ((keys @ keys.t()) ** 2)[off_diagonal].sum()
        return (total / (2 * N * N)).detach()

    def enhance(self, feat: torch.Tensor) -> torch.Tensor:
        """Memory-based restyling: f_norm * v_mix + mu_mix, (B, C, H, W) -> (B, C, H, W). Reads, never writes.

        mu_mix = alpha mu_b + (1 - alpha) mu_mem and v_mix = alpha sigma_b + (1 - alpha) sigma_mem, with f_norm
        the instance-normalised feature; alpha = 1 returns the input. In eval mode alpha is `test_alpha`
        when set (model.memory.test_alpha: how far target features move to the stored source styles).
        """
        alpha = self.alpha if self.training or self.test_alpha is None else self.test_alpha
        mu, sigma = instance_stats(feat)  # (B, C) each
        mu_mem, sigma_mem = self.read(mu, sigma)
        f_norm = (feat - mu[..., None, None]) / sigma[..., None, None]
        mu_mix = alpha * mu + (1 - alpha) * mu_mem
        sigma_mix = alpha * sigma + (1 - alpha) * sigma_mem
        return f_norm * sigma_mix[..., None, None] + mu_mix[..., None, None]

    def extra_repr(self) -> str:
        return (
            f"num_items={self.num_items}, channels={self.channels}, momentum={self.momentum}, "
            f"alpha={self.alpha}, test_alpha={self.test_alpha}, top_k={self.top_k}, temperature={self.temperature}, index={self.index_kind!r}"
        )


def category_contrast_loss(raw_fg: torch.Tensor, styled_fg: torch.Tensor, raw_bg: torch.Tensor,
                           styled_bg: torch.Tensor, class_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """RMT's L_cont = 1/(2|B|) sum_i -log(pos(i) / (pos(i) + neg(i))) over both views as anchors.

    Each argument is (B, D) prototypes of the query: its class (fg) and its background (bg), from the raw and
    the memory-restyled feature. Anchor raw_fg[i]: the positive is styled_fg[i] (same category, other style);
    the negatives are styled_fg[j] of every episode of another class and styled_bg[i] (so a batch of one still
    has a negative); then the same with the views swapped. Cosine similarity / temperature.
    Approximate: the paper gives the form, not which prototypes form the negatives.
    """
    B = raw_fg.shape[0]
    other_class = (class_ids[:, None] != class_ids[None, :]).to(raw_fg.dtype)  # (B, B)
    terms = []
    for anchor, fg, bg in ((raw_fg, styled_fg, styled_bg), (styled_fg, raw_fg, raw_bg)):
        a = F.normalize(anchor, dim=1)
        pos = (a * F.normalize(fg, dim=1)).sum(1) / temperature  # (B,)
        cross = a @ F.normalize(fg, dim=1).t() / temperature  # (B, B)
        own_bg = (a * F.normalize(bg, dim=1)).sum(1) / temperature  # (B,)
        # log(exp(pos) + sum_neg exp(neg)) over [pos, own bg, other-class fgs]; masked-out pairs get -inf.
        masked = cross.masked_fill(other_class == 0, float("-inf"))
        logits = torch.cat([pos[:, None], own_bg[:, None], masked], 1)  # (B, 2 + B)
        terms.append(torch.logsumexp(logits, dim=1) - pos)
    return torch.cat(terms).sum() / (2 * B)


class MemoryTransfer(nn.Module):
    """The RMT memory as a model part: restyles mid-level features, writes source statistics in training and
    computes the category contrastive loss. Any PFENet-family model holds one (or None) as `self.memory`.

    In training every forward writes the instance statistics of the RAW (unstyled) query and support features,
    gathered over ranks (`distributed.all_gather_cat`), so all DDP ranks hold identical banks (the contract in
    the module docstring). In eval mode the bank is only read: target-domain features are restyled towards
    the stored source styles.
    """

    def __init__(self, cfg: MemoryConfig, channels: int) -> None:
        super().__init__()
        self.bank = MetaMemory(num_items=cfg.items, channels=channels, momentum=cfg.momentum, alpha=cfg.alpha,
                               test_alpha=cfg.test_alpha, init=cfg.init,
                               top_k=cfg.top_k, temperature=cfg.temperature, index=cfg.index, nlist=cfg.nlist)
        self.contrast_weight = cfg.contrast_weight
        self.contrast_temperature = cfg.contrast_temperature
        self.prototype_weight = cfg.prototype_weight
        self.prototype_scale = cfg.prototype_scale
        self.scope = cfg.restyle  # "mid" | "backbone": what `family.meta_inputs` restyles

    def restyle(self, feat: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, C, h, w) memory-restyled (alpha mixing of own and memory styles)."""
        return self.bank.enhance(feat)

    @torch.no_grad()
    def observe(self, *feats: torch.Tensor) -> None:
        """Write the per-instance statistics of (N_i, C, h, w) source features; a no-op in eval mode."""
        self.observe_stats([instance_stats(f.detach().float()) for f in feats])

    @torch.no_grad()
    def observe_stats(self, stats: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write (mu, sigma) pairs of (N_i, C) instance statistics, gathered over ranks; a no-op in eval mode."""
        if not self.training or not stats:
            return
        mu = torch.cat([m for m, _ in stats])
        sigma = torch.cat([s for _, s in stats])
        self.bank.write(mu, sigma, gather=distributed.all_gather_cat)

    def contrast_loss(self, raw: torch.Tensor, styled: torch.Tensor, labels: torch.Tensor,
                      class_ids: torch.Tensor) -> torch.Tensor:
        """Weighted L_cont from (B, D, h, w) raw / restyled query features and (B, H, W) 0/1/255 labels."""
        fg, bg = (labels == 1).to(raw.dtype), (labels == 0).to(raw.dtype)
        loss = category_contrast_loss(masked_average_pool(raw, fg), masked_average_pool(styled, fg),
                                      masked_average_pool(raw, bg), masked_average_pool(styled, bg),
                                      class_ids, self.contrast_temperature)
        return self.contrast_weight * loss

    def step_losses(self, episode: Episode, down_query: nn.Module, raw_query_mid: torch.Tensor,
                    query_feat: torch.Tensor, supp_feat: torch.Tensor, supp_fg: torch.Tensor,
                    ) -> dict[str, torch.Tensor]:
        """The weighted training terms of one step, as every host computes them (empty in eval mode):
        L_cont between the query's reduction of its RAW mid-level feature (`down_query(raw_query_mid)`) and its
        restyled reduction `query_feat`; L_pro of `query_feat` against the restyled (B*S, D, h, w) `supp_feat`
        (episode-major) under the float (B*S, H, W) support foreground `supp_fg`. The host then writes the
        step's raw statistics (`observe` / `observe_stats`), after every read."""
        losses: dict[str, torch.Tensor] = {}
        if not self.training:
            return losses
        if self.contrast_weight > 0:
            losses["memory_contrast"] = self.contrast_loss(down_query(raw_query_mid), query_feat,
                                                           episode.query_mask, episode.class_id)
        if self.prototype_weight > 0:
            supp_bg = (episode.support_masks.flatten(0, 1) == 0).to(supp_feat.dtype)
            losses["memory_prototype"] = self.prototype_loss(query_feat, supp_feat, supp_fg, supp_bg,
                                                             episode.query_mask)
        return losses

    def prototype_loss(self, query_feat: torch.Tensor, supp_feat: torch.Tensor, supp_fg: torch.Tensor,
                       supp_bg: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Weighted RMT L_pro = -1/(HW) sum Y_q log R(f_q, p): the query segmented without any learned head.

        `query_feat` (B, D, h, w) and `supp_feat` (B*S, D, h, w) are the restyled reduced features, `supp_fg` and
        `supp_bg` (B*S, H, W) the float support foreground and background (255 in neither), `labels` the (B, H, W) 0/1/255 query mask. p = the support's
        background and foreground prototypes (masked averages, mean over the shots); R = softmax over {bg, fg}
        of `prototype_scale` x cosine(f_q, p), upsampled to the mask; CE with 255 ignored. Approximate: the paper
        gives the form, not the prototypes' source or the scale (20, PANet's).
        """
        B = query_feat.shape[0]
        fg = masked_average_pool(supp_feat, supp_fg).view(B, -1, supp_feat.shape[1]).mean(1)  # (B, D)
        bg = masked_average_pool(supp_feat, supp_bg).view(B, -1, supp_feat.shape[1]).mean(1)
        protos = F.normalize(torch.stack([bg, fg], 1), dim=2)  # (B, 2, D)
        cos = torch.einsum("bkd,bdhw->bkhw", protos, F.normalize(query_feat, dim=1))  # (B, 2, h, w)
        return self.prototype_weight * cross_entropy(self.prototype_scale * cos, labels)

    def orthogonality(self) -> torch.Tensor:
        return self.bank.orthogonality_loss()


def build_memory(cfg: MemoryConfig, channels: int) -> MemoryTransfer | None:
    """The model's memory part when `model.memory.enabled`, else None."""
    return MemoryTransfer(cfg, channels) if cfg.enabled else None
