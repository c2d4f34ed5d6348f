"""SimVQ (Zhu et al. 2024, arXiv:2411.02038): the codebook is a frozen Gaussian
basis C (std d^-0.5) times a learnable linear map W, so every code moves with
W even when it is never selected; that is what keeps the whole codebook alive.

W starts small (uniform in [-1/K, 1/K]), so the codes start near the origin,
inside the latents, as VQ's do: the nearest code is then the best-aligned one,
not merely the shortest (which is what quiet audio latents otherwise pick).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vqtrain.quantizers.base import check_positive_int, check_weight
from vqtrain.quantizers.vq import VectorQuantizer


class SimVQ(VectorQuantizer):
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        groups: int = 1,
        learn_basis: bool = False,
        distance: str = "euclidean",
        estimator: str = "rotation",
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        transform_lr_scale: float = 1.0,
        transform_weight_decay: float = 0.0,
        chunk_elements: int | None = None,
    ):
        self.learn_basis = bool(learn_basis)
        if dim % check_positive_int("groups", groups):  # (VQ's message would suggest codebook_dim, which SimVQ lacks)
            raise ValueError(f"dim ({dim}) must be divisible by groups ({groups})")
        super().__init__(
            dim,
            codebook_size,
            groups=groups,
            distance=distance,
            learning="gradient",
            estimator=estimator,
            commitment_weight=commitment_weight,
            codebook_weight=codebook_weight,
            chunk_elements=chunk_elements,
        )
        # W uniform in [-1/K, 1/K], one per group: codes = C @ W^T then have entries of std 1/(K sqrt 3),
        # those of VQ's near-origin init, so first assignments go by direction at any latent scale.
        # nn.Linear's default (1/sqrt(d)) puts codes at norm ~0.6: above FSDD's latents (0.06-0.17),
        # which then all took the few smallest codes (6% of 4,096 used after 100 steps; docs/quantizers.md, SimVQ)
        bound = 1 / codebook_size
        self.transform = nn.Parameter(torch.empty(groups, self.code_dim, self.code_dim).uniform_(-bound, bound))
        self.param_options = {
            "transform": {
                "lr_scale": check_weight("transform_lr_scale", transform_lr_scale),
                "weight_decay": check_weight("transform_weight_decay", transform_weight_decay),
            }
        }

    def _init_codebook(self, codebook: Tensor) -> None:
        # the paper's frozen basis: N(0, 1/d) entries (not the VQ codebook's near-origin init it is handed)
        basis = torch.randn(codebook.shape) * self.code_dim**-0.5
        if self.learn_basis:
            self.basis = nn.Parameter(basis)
        else:
            self.register_buffer("basis", basis)

    def set_update_weight(self, weight: Tensor) -> None:
        raise NotImplementedError("SimVQ codes all move with the shared map W: single codes cannot be frozen")

    @property
    def embed(self) -> Tensor:
        return torch.bmm(self.basis, self.transform.transpose(1, 2))
