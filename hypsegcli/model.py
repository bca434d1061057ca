"""The 3D VAE of the paper (Hsu, Gu et al. 2021, Sec. 3.2), one class for all Table 2 rows.

:class:`HypVAE` is switched by :class:`~hypsegcli.config.ModelConfig`:

============================  ===========  =========  ========
Table 2 row                   geometry     gyroconv   triplet
============================  ===========  =========  ========
Euclidean base                euclidean    (ignored)  False
Euclidean + triplet           euclidean    (ignored)  True
hyperbolic base               hyperbolic   False      False
hyperbolic + gyroconv         hyperbolic   True       False
hyperbolic + triplet          hyperbolic   False      True
hyperbolic + gyroconv+triplet hyperbolic   True       True
============================  ===========  =========  ========

Encoder. ``self.encoder`` is a stack of ``Conv3d`` (``cfg.channels``, ``cfg.kernels``,
``cfg.paddings``, stride 1, ReLU after each); its output side for an m^3 patch
(m = ``cfg.patch_size``) is ``S = cfg.trunk_output_size()``. The fully connected head
is written as convolutions: ``enc_fc = Conv3d(C_last, hidden, S)`` (+ ReLU), then
``enc_mu`` and ``enc_scale`` are 1x1x1 convolutions to the latent dimension d. The
mean is ``mu = proj(expmap0(raw))`` on the Poincaré ball of curvature -c
(hyperbolic) or ``mu = raw`` (Euclidean); the scale is ``softplus(raw) + 1e-5``.

Because the head is convolutional, :meth:`HypVAE.encode_dense` runs the very same
modules over a volume of any side >= m and returns one (mu, scale) per m^3 window:
output position (i, j, k) sees exactly the input window ``[i:i+m, j:j+m, k:k+m]``.
With VALID paddings (all ``cfg.paddings`` zero, the default) every layer is
translation equivariant and has no border effect inside the window, so
``encode_dense(x)[..., i, j, k] == encode(x[..., i:i+m, j:j+m, k:k+m])`` exactly
(up to float summation order); :attr:`HypVAE.dense_exact` says whether that holds.
With non-zero paddings (the authors' layout) the per-patch encoder zero-pads every
patch while the dense pass only pads the volume's border, so the two differ.

Decoder. Hyperbolic with gyroconv: ``GyroplaneConv3d(1, C_last, kernel_size=S,
dim=d, padding=S-1)`` on z viewed as a 1x1x1 grid with one ball-point channel,
giving (C_last, S, S, S) where every output position sees z through a different
kernel offset (Eq. 7 used "transposed"). Otherwise ``Linear(d, C_last*S^3)`` on
``logmap0(z)`` (hyperbolic) or z (Euclidean), reshaped. Then ReLU and
``ConvTranspose3d`` layers mirroring the trunk (reverse channels, same kernels and
paddings, stride 1; ReLU between, none after the last, which outputs 1 channel).
With stride 1 a transposed convolution exactly inverts its convolution's size
arithmetic, so the decoder returns m^3.

Distributions. Posterior q(z|x): WrappedNormal(mu, scale) (hyperbolic) or
Normal(mu, scale) (Euclidean), diagonal. Prior p(z): WrappedNormal(0, 1) or
Normal(0, 1) of the same dimension d. Likelihood p(x|z): Normal(x_hat, 1) per voxel.
See :meth:`HypVAE.loss` for the objective and its reductions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import geometry
from .config import ModelConfig
from .errors import BadInputError
from .layers import GyroplaneConv3d

#: Added to softplus so that the posterior scale never reaches 0.
SCALE_FLOOR = 1e-5
#: Added to softplus so that a learned voxel scale never reaches 0.
SIGMA_FLOOR = 1e-3
#: Initial learned voxel scale (the bias of the decoder's scale channel).
SIGMA_INIT = 0.1

#: Hidden units of the texture head (``cfg.texture_weight > 0``).
TEXTURE_HIDDEN = 32
#: Added to a patch's standard deviation before the log (texture statistic).
TEXTURE_EPS = 1e-3

_LOG_2PI = math.log(2.0 * math.pi)


def patch_texture(x: Tensor) -> Tensor:
    """Texture statistic of patches ``x`` (N, 1, m, m, m): log(std over the voxels + 1e-3), (N,)."""
    return torch.log(x.flatten(1).std(dim=1) + TEXTURE_EPS)


def _decoder_out_channels(cfg: ModelConfig) -> tuple[int, ...]:
    """Output channels of the decoder's transposed convolutions, indexed like the trunk's
    layers: the trunk's input channels, except that the last transposed convolution
    (index 0) also outputs the voxel scales with a learned likelihood."""
    return (2 if cfg.likelihood == "learned" else 1, *cfg.channels[:-1])


def _trunk_sizes(cfg: ModelConfig) -> list[int]:
    """Spatial side after each trunk convolution for an m^3 input, m first."""
    sizes = [cfg.patch_size]
    for k, p in zip(cfg.kernels, cfg.paddings, strict=True):
        sizes.append(sizes[-1] + 2 * p - k + 1)
    return sizes


class HypVAE(nn.Module):
    """3D convolutional VAE with a Poincaré-ball (or Euclidean) latent space.

    Parameters
    ----------
    cfg:
        The architecture and loss switches; see the module docstring for how they
        map to the six rows of the paper's Table 2.

    Raises
    ------
    BadInputError
        If an intermediate trunk size drops below 1 or the decoder does not mirror
        back to ``cfg.patch_size``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        m = cfg.patch_size
        d = cfg.latent_dim
        sizes = _trunk_sizes(cfg)
        for i, size in enumerate(sizes[1:]):
            if size < 1:
                raise BadInputError(
                    f"patch_size={m} with kernels={cfg.kernels} and paddings={cfg.paddings} "
                    f"should keep every encoder layer's output side >= 1, got {size} after layer {i + 1}"
                )
        S = sizes[-1]
        self.trunk_size = S
        c_in = (1, *cfg.channels[:-1])
        c_last = cfg.channels[-1]

        # --- encoder trunk and convolutional head
        trunk: list[nn.Module] = []
        for ci, co, k, p in zip(c_in, cfg.channels, cfg.kernels, cfg.paddings, strict=True):
            trunk += [nn.Conv3d(ci, co, k, padding=p), nn.ReLU()]
        self.encoder = nn.Sequential(*trunk)
        self.enc_fc = nn.Conv3d(c_last, cfg.hidden, S)
        self.enc_mu = nn.Conv3d(cfg.hidden, d, 1)
        self.enc_scale = nn.Conv3d(cfg.hidden, d, 1)
        # PyTorch's default initialisation everywhere. It does not pile the initial
        # means up at the ball's boundary: for random patches in [0, 1], ‖mu‖ is
        # ~0.04-0.08 (nearly the same point for all patches, spread ~1e-3, which
        # training separates; tests check ‖mu‖ < 0.9) and the scales ~0.7.

        # --- decoder: first layer to (C_last, S, S, S), then mirrored trunk
        if cfg.uses_gyroconv:
            self.dec_first: nn.Module = GyroplaneConv3d(
                1,
                c_last,
                kernel_size=S,
                dim=d,
                padding=S - 1,
                c=cfg.curvature,
                p_init_std=cfg.gyroplane_init,
            )
        else:
            self.dec_first = nn.Linear(d, c_last * S**3)
        layers: list[nn.Module] = [nn.ReLU()]
        n = len(cfg.channels)
        size = S
        c_out = _decoder_out_channels(cfg)
        for i in reversed(range(n)):
            k, p = cfg.kernels[i], cfg.paddings[i]
            layers.append(nn.ConvTranspose3d(cfg.channels[i], c_out[i], k, padding=p))
            size = size + k - 1 - 2 * p
            if size < 1:
                raise BadInputError(
                    f"kernels={cfg.kernels} and paddings={cfg.paddings} do not mirror back: "
                    f"decoder side {size} < 1 at transposed layer {n - i}"
                )
            if i > 0:
                layers.append(nn.ReLU())
        if size != m:
            raise BadInputError(
                f"kernels={cfg.kernels} and paddings={cfg.paddings} should mirror back to "
                f"patch_size={m}, the decoder gives {size}"
            )
        self.decoder = nn.Sequential(*layers)
        if cfg.texture_weight > 0:
            self.dec_texture = nn.Sequential(
                nn.Linear(d, TEXTURE_HIDDEN), nn.ReLU(), nn.Linear(TEXTURE_HIDDEN, 1)
            )
            # start near the texture of 1-99 percentile scaled data (std ~0.1): from
            # 0, the first steps' errors of ~2.3 (x w) threw the means to the edge
            with torch.no_grad():
                self.dec_texture[-1].bias.fill_(math.log(SIGMA_INIT))
        if cfg.likelihood == "learned":
            # Start the voxel scales near the noise of 1-99 percentile scaled data
            # (~0.1) rather than softplus(0) = 0.69: Adam moves a bias by about lr
            # per step, so from 0.69 the scales would need thousands of steps to
            # reach the data and could not depend on z meanwhile.
            last = layers[-1]
            assert isinstance(last, nn.ConvTranspose3d) and last.bias is not None
            with torch.no_grad():
                last.bias[1] = math.log(math.expm1(SIGMA_INIT - SIGMA_FLOOR))

    # ------------------------------------------------------------------ helpers
    @property
    def dense_exact(self) -> bool:
        """True when :meth:`encode_dense` equals per-window :meth:`encode` (VALID paddings)."""
        return all(p == 0 for p in self.cfg.paddings)

    def num_parameters(self) -> int:
        """Number of scalar parameters (encoder, heads, decoder, gyroplane p and a)."""
        return sum(p.numel() for p in self.parameters())

    def _check_volume(self, x: Tensor, name: str, exact: bool) -> None:
        m = self.cfg.patch_size
        if x.dim() != 5 or x.shape[1] != 1:
            raise BadInputError(f"{name} should have shape (N, 1, X, Y, Z), got {tuple(x.shape)}")
        spatial = tuple(x.shape[2:])
        if exact and spatial != (m, m, m):
            raise BadInputError(f"{name} should have spatial shape {(m, m, m)}, got {spatial}")
        if not exact and min(spatial) < m:
            raise BadInputError(
                f"{name} should have every spatial side >= patch_size={m}, got {spatial}"
            )

    # ------------------------------------------------------------------ encoder
    def encode_dense(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Encode every m^3 window of ``x`` (N, 1, X, Y, Z), all sides >= m.

        Returns ``mu_map`` and ``scale_map`` of shape (N, d, X-m+1, Y-m+1, Z-m+1):
        position (i, j, k) is the encoding of ``x[..., i:i+m, j:j+m, k:k+m]``
        (exactly so when :attr:`dense_exact`). Hyperbolic means are
        ``proj(expmap0(raw))`` computed channel-last, returned channel-first.
        """
        self._check_volume(x, "x", exact=False)
        h = F.relu(self.enc_fc(self.encoder(x)))
        raw_mu = self.enc_mu(h)
        scale = F.softplus(self.enc_scale(h)) + SCALE_FLOOR
        if self.cfg.hyperbolic:
            c = self.cfg.curvature
            mu = geometry.project(geometry.expmap0(raw_mu.movedim(1, -1), c=c), c=c).movedim(-1, 1)
        else:
            mu = raw_mu
        return mu, scale

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Encode patches ``x`` (N, 1, m, m, m) to ``mu`` (N, d) and ``scale`` (N, d).

        Same modules as :meth:`encode_dense`; ``mu`` lies strictly inside the ball
        (hyperbolic) or in R^d (Euclidean); ``scale = softplus(raw) + 1e-5``.
        """
        self._check_volume(x, "x", exact=True)
        mu, scale = self.encode_dense(x)
        return mu.flatten(1), scale.flatten(1)

    # ------------------------------------------------------------------ decoder
    def decode(self, z: Tensor) -> Tensor:
        """Decode latents ``z`` (..., d) to voxel means x_hat (..., 1, m, m, m)."""
        return self.decode_params(z)[0]

    def decode_params(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """Decode ``z`` (..., d) to the likelihood's means and scales, each (..., 1, m, m, m).

        The scales are ``softplus(raw) + 1e-3`` with ``cfg.likelihood == "learned"``
        and None with the unit-variance likelihood.
        """
        cfg = self.cfg
        d, S, m = cfg.latent_dim, self.trunk_size, cfg.patch_size
        if z.shape[-1] != d:
            raise BadInputError(
                f"z should have last dimension latent_dim={d}, got {tuple(z.shape)}"
            )
        lead = z.shape[:-1]
        zf = z.reshape(-1, d)
        if cfg.uses_gyroconv:
            h = self.dec_first(zf.view(-1, 1, 1, 1, 1, d))
        else:
            if cfg.hyperbolic:
                zf = geometry.logmap0(zf, c=cfg.curvature)
            h = self.dec_first(zf).view(-1, cfg.channels[-1], S, S, S)
        out = self.decoder(h)
        if cfg.likelihood == "learned":
            mean, raw = out.split(1, dim=1)
            sigma = F.softplus(raw) + SIGMA_FLOOR
            return mean.reshape(*lead, 1, m, m, m), sigma.reshape(*lead, 1, m, m, m)
        return out.reshape(*lead, 1, m, m, m), None

    def decode_texture(self, z: Tensor) -> Tensor:
        """Predicted texture statistic (:func:`patch_texture`) of latents ``z`` (..., d): (...).

        A small MLP on the tangent vector at the origin (hyperbolic) or on ``z``
        (Euclidean); only with ``cfg.texture_weight > 0``.
        """
        if self.cfg.texture_weight <= 0:
            raise BadInputError("this model has no texture head (texture_weight = 0)")
        if self.cfg.hyperbolic:
            z = geometry.logmap0(z, c=self.cfg.curvature)
        return self.dec_texture(z).squeeze(-1)

    # ------------------------------------------------------------ distributions
    def _sample_posterior(
        self, mu: Tensor, scale: Tensor, k: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``k`` reparameterised samples z (k, N, d); return z, log q(z|x) and the
        prior's log p(z) (k, N each).

        Hyperbolic: sampled and scored in float64 (where the device has it), z
        returned in that dtype too. In float32 the ball keeps points only within
        1 - 4e-3 of its edge, and a sample projected back there was scored as if
        it had been drawn there: for wide posteriors near the edge the Monte
        Carlo KL came out tens of nats low (d = 8, scale 3 at ‖mu‖ = 0.99: 33
        instead of 99), a hole training can fall into (a d = 8 run reached a
        mean KL of -151). float64 moves the edge to 1 - 1e-5 (d(0, z) ~12/√c)
        and costs little (k x N x d numbers); the samples it still moves (wide
        posteriors: the KL had stopped growing with the scale, and fell in
        d = 8) are scored as drawn, from their tangent vectors
        (:meth:`~hypsegcli.geometry.WrappedNormal.log_prob_tangent`,
        :func:`~hypsegcli.geometry.sample_dist0`); the others, as before, from z.
        """
        if self.cfg.hyperbolic:
            if mu.dtype != torch.float64 and mu.device.type != "mps":
                mu, scale = mu.double(), scale.double()
            c = self.cfg.curvature
            q = geometry.WrappedNormal(mu, scale, c=c)
            drawn, v = q.rsample_tangent(torch.Size((k,)), generator=generator, projected=False)
            z = geometry.project(drawn, c=c)
            log_q, log_p = q.log_prob(z), self.prior_log_prob(z)
            moved = (z != drawn).any(-1)
            if bool(moved.any()):
                d0 = geometry.sample_dist0(mu, v, c=c)
                sqrt_c_d0 = math.sqrt(c) * d0
                d = self.cfg.latent_dim
                prior = -0.5 * d0.square() - 0.5 * d * _LOG_2PI
                prior = prior - (d - 1) * geometry.log_sinhc(sqrt_c_d0)
                log_q = torch.where(moved, q.log_prob_tangent(v), log_q)
                log_p = torch.where(moved, prior, log_p)
            return z, log_q, log_p
        eps = torch.randn((k, *mu.shape), generator=generator, dtype=mu.dtype, device=mu.device)
        z = mu + scale * eps
        log_q = torch.distributions.Normal(mu, scale, validate_args=False).log_prob(z).sum(-1)
        return z, log_q, self.prior_log_prob(z)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log p(z) of the prior WrappedNormal(0, 1) / Normal(0, 1), summed over d: z.shape[:-1]."""
        zero = torch.zeros(self.cfg.latent_dim, dtype=z.dtype, device=z.device)
        one = torch.ones_like(zero)
        if self.cfg.hyperbolic:
            return geometry.WrappedNormal(zero, one, c=self.cfg.curvature).log_prob(z)
        return torch.distributions.Normal(zero, one, validate_args=False).log_prob(z).sum(-1)

    # --------------------------------------------------------------------- loss
    def latent_distance(self, x: Tensor, y: Tensor) -> Tensor:
        """Distance of the latent space, (...): Poincaré d_c(x, y) or Euclidean ‖x - y‖.

        Poincaré distances are computed in float64 (where the device has it) and
        returned in the inputs' dtype: in float32 the Möbius sum (-x) ⊕ y of two close
        points near the edge (‖x‖ 0.95-0.996) loses most of its digits, and the
        triplet term's distance came out up to 56x too large, its gradient pointing
        elsewhere. The cost is N x d numbers.
        """
        if self.cfg.hyperbolic:
            if x.dtype != torch.float64 and x.device.type != "mps":
                return geometry.dist(x.double(), y.double(), c=self.cfg.curvature).to(x.dtype)
            return geometry.dist(x, y, c=self.cfg.curvature)
        return torch.linalg.vector_norm(x - y, dim=-1)

    def triplet_loss(self, mu_a: Tensor, mu_p: Tensor, mu_n: Tensor) -> Tensor:
        """Hierarchical triplet loss, Eq. 8, averaged over the batch.

        mean_i max(0, d(mu_a, mu_p) - d(mu_a, mu_n) + margin), where d is the
        Poincaré distance (2/√c) artanh(√c ‖(-x) ⊕ y‖) (hyperbolic) or the
        Euclidean distance; ``cfg.triplet_distance == "squared"`` uses d² instead
        (as the authors' code did; the paper's Eq. 8 uses the plain d).
        """
        d_ap = self.latent_distance(mu_a, mu_p)
        d_an = self.latent_distance(mu_a, mu_n)
        if self.cfg.triplet_distance == "squared":
            d_ap, d_an = d_ap.square(), d_an.square()
        return (d_ap - d_an + self.cfg.margin).clamp_min(0.0).mean()

    def loss(
        self,
        anchor: Tensor,
        positive: Tensor,
        negative: Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Training objective on a batch of triplets, each (N, 1, m, m, m).

        Returns scalar tensors (all means over the batch, i.e. per triplet):

        - ``recon``: -log p(x|z) = Σ_voxels [½(x - x_hat)² + ½ log 2π] for the anchor
          (with a learned likelihood Σ_voxels [½((x - x_hat)/σ)² + log σ + ½ log 2π]),
          averaged over K = ``cfg.mc_samples`` posterior samples and the batch.
        - ``kl``: Monte Carlo KL over the same K samples, mean of
          log q(z|x) - log p(z) (for both geometries, so that rows are comparable).
        - ``triplet``: Eq. 8 on the encoder MEANS mu of anchor, positive and
          negative (:meth:`triplet_loss`), averaged over the batch. Reported even
          when ``cfg.triplet`` is False, then detached (monitoring only).
        - ``texture``: ½ (head(z) - :func:`patch_texture`(anchor))² averaged over
          the samples and the batch (0 when ``cfg.texture_weight`` is 0).
        - ``total``: recon + kl + beta * triplet (the triplet term only when
          ``cfg.triplet``), i.e. the negative ELBO (Eq. 9) plus Eq. 10's term,
          plus ``texture_weight * texture``.

        The ELBO terms use only the anchor (the authors' choice): positives and
        negatives serve the triplet term only. The three inputs are encoded in one
        batched pass (when ``cfg.triplet`` is False, positive and negative are
        encoded without gradients). Unlike the authors' code, which summed the ELBO
        over the batch and averaged the triplet, both are averaged here, so
        ``beta`` weighs the triplet against the per-patch ELBO.

        ``generator`` seeds the reparameterisation noise (global RNG if None).
        """
        for name, t in (("anchor", anchor), ("positive", positive), ("negative", negative)):
            self._check_volume(t, name, exact=True)
        n = anchor.shape[0]
        if positive.shape[0] != n or negative.shape[0] != n:
            raise BadInputError(
                f"anchor, positive and negative should hold the same number of patches, got "
                f"{n}, {positive.shape[0]} and {negative.shape[0]}"
            )
        cfg = self.cfg
        if cfg.triplet:
            mu, scale = self.encode(torch.cat([anchor, positive, negative]))
            mu_a, mu_p, mu_n = mu.split(n)
            scale_a = scale[:n]
        else:
            mu_a, scale_a = self.encode(anchor)
            with torch.no_grad():
                mu_pn, _ = self.encode(torch.cat([positive, negative]))
            mu_p, mu_n = mu_pn.split(n)

        z, log_q, log_p = self._sample_posterior(mu_a, scale_a, cfg.mc_samples, generator)
        kl = (log_q - log_p).mean().to(anchor.dtype)
        z = z.to(anchor.dtype)
        x_hat, sigma = self.decode_params(z)  # (K, N, 1, m, m, m)
        texture_pred = self.decode_texture(z) if cfg.texture_weight > 0 else None
        return self._objective(anchor, x_hat, sigma, kl, (mu_a, mu_p, mu_n), texture_pred)

    def _objective(
        self,
        anchor: Tensor,
        x_hat: Tensor,
        sigma: Tensor | None,
        kl: Tensor,
        means: tuple[Tensor, Tensor, Tensor],
        texture_pred: Tensor | None,
    ) -> dict[str, Tensor]:
        """:meth:`loss`'s terms from the decoded means ``x_hat`` (K, N, 1, m, m, m) and
        scales (None: unit variance), the KL, the encoder means of anchor, positive and
        negative (the anchor's with gradients only when ``cfg.triplet``), and the texture
        head's prediction (K, N) (None when ``cfg.texture_weight`` is 0)."""
        cfg = self.cfg
        mu_a, mu_p, mu_n = means
        n_vox = anchor[0].numel()
        if sigma is None:
            sq = (x_hat - anchor.unsqueeze(0)).square().flatten(2).sum(-1)  # (K, N)
            recon = 0.5 * sq.mean() + 0.5 * n_vox * _LOG_2PI
        else:
            r = (x_hat - anchor.unsqueeze(0)) / sigma
            nll = (0.5 * r.square() + sigma.log()).flatten(2).sum(-1)  # (K, N)
            recon = nll.mean() + 0.5 * n_vox * _LOG_2PI

        if cfg.triplet:
            triplet = self.triplet_loss(mu_a, mu_p, mu_n)
            total = recon + kl + cfg.beta * triplet
        else:
            triplet = self.triplet_loss(mu_a.detach(), mu_p, mu_n)
            total = recon + kl
        texture = torch.zeros((), dtype=anchor.dtype, device=anchor.device)
        if texture_pred is not None:
            texture = 0.5 * (texture_pred - patch_texture(anchor)).square().mean()
            total = total + cfg.texture_weight * texture
        return {"total": total, "recon": recon, "kl": kl, "triplet": triplet, "texture": texture}

    # --------------------------------------------------------------------- cost
    def flops_per_patch(self, part: str = "encoder") -> int:
        """Analytic floating point operations for one m^3 patch, forward only.

        Counts 2 FLOPs per multiply-accumulate of every convolution, transposed
        convolution and linear layer, as their GEMMs compute them (padded zeros
        included; a transposed convolution as in_positions * k^3 * C_in * C_out);
        biases, activations and the exp/log maps are ignored. The gyroplane layer
        is estimated at 12 d + 30 FLOPs per (plane, in-bounds position) evaluation.

        ``part``: "encoder" (trunk + head, what inference costs per patch),
        "decoder", or "total" (encoder + decoder).
        """
        if part not in ("encoder", "decoder", "total"):
            raise BadInputError(f"part={part!r} should be 'encoder', 'decoder' or 'total'")
        cfg = self.cfg
        sizes = _trunk_sizes(cfg)
        S, d, c_last = self.trunk_size, cfg.latent_dim, cfg.channels[-1]
        c_in = (1, *cfg.channels[:-1])
        enc = 0
        for i, (ci, co, k) in enumerate(zip(c_in, cfg.channels, cfg.kernels, strict=True)):
            enc += sizes[i + 1] ** 3 * co * ci * k**3
        enc += cfg.hidden * c_last * S**3 + 2 * d * cfg.hidden
        dec = 0
        c_out = _decoder_out_channels(cfg)
        for i in range(len(cfg.channels)):
            ci, co, k = cfg.channels[i], c_out[i], cfg.kernels[i]
            dec += sizes[i + 1] ** 3 * k**3 * ci * co
        first = 0
        if cfg.uses_gyroconv:
            first = c_last * S**3 * (12 * d + 30)
        else:
            dec += d * c_last * S**3
        macs = {"encoder": enc, "decoder": dec, "total": enc + dec}[part]
        flops = 2 * macs
        if part != "encoder":
            flops += first
        return int(flops)
