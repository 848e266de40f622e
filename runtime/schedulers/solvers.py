"""The update rules of the samplers, one small function each, in the symbols of their papers.

Arrays are float32 latents; scalars are np.float32, computed in the order of operations that
diffusers uses (it does the step arithmetic on float32 torch scalars), so that results agree to a
few float32 ulps. Transcendental functions of scalars go through float64 and are rounded once to
float32 (the correctly rounded value, which torch's float32 functions return most of the time).

Sums of scaled latents go through :func:`lincomb`, which evaluates them left to right like the
plain expression (so the rounding is the same) but in one output buffer: a 2x4x64x64 float32 latent
is exactly glibc's mmap threshold, and every fresh temporary of that size costs page faults.

Notation (variance preserving): x_t = alpha_t * x0 + sigma_t * eps with alpha_t = sqrt(alpha_bar_t),
sigma_t = sqrt(1 - alpha_bar_t), log-SNR lambda_t = log(alpha_t / sigma_t).
Notation (variance exploding, k-diffusion): x = x0 + sigma * eps, d = (x - x0) / sigma = dx/dsigma.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

F32 = np.float32

__all__ = [
    "F32",
    "lincomb",
    "sqrt",
    "exp",
    "expm1",
    "log",
    "ddim_std",
    "ddim_step",
    "ddpm_posterior_mean",
    "ddpm_posterior_variance",
    "pndm_transfer",
    "adams_bashforth_eps",
    "lms_coefficients",
    "to_d",
    "ancestral_sigmas",
    "vp_alpha_sigma",
    "log_snr",
    "dpmpp_first_order",
    "dpmpp_second_order",
    "dpmpp_third_order",
    "unipc_predictor",
    "unipc_corrector",
    "lcm_boundary_scalings",
]


# --- float32 scalars ----------------------------------------------------------------------------


def sqrt(x) -> np.float32:
    return np.sqrt(F32(x))


def exp(x) -> np.float32:
    return F32(np.exp(np.float64(x)))


def expm1(x) -> np.float32:
    return F32(np.expm1(np.float64(x)))


def log(x) -> np.float32:
    with np.errstate(divide="ignore"):
        return F32(np.log(np.float64(x)))


def lincomb(*terms) -> np.ndarray:
    """c0 * a0 + c1 * a1 + ... for (coefficient, array) pairs, summed left to right in float32.

    Identical, bit for bit, to the written-out expression (a subtraction is a term with a negated
    coefficient, x - c * y == x + (-c) * y exactly), with one new array instead of one per operation.
    """
    (c0, a0), *rest = terms
    out = c0 * a0
    for c, a in rest:
        out += c * a
    return out


# --- DDIM (Song et al. 2021) and DDPM (Ho et al. 2020) ------------------------------------------


def ddim_std(alpha_bar_t, alpha_bar_prev, eta: float) -> np.float32:
    """sigma_t of DDIM eq. 16: eta = 0 is deterministic DDIM, eta = 1 the DDPM posterior noise."""
    variance = ((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * (1 - alpha_bar_t / alpha_bar_prev)
    return F32(eta) * sqrt(variance)


def ddim_step(x0: np.ndarray, eps: np.ndarray, alpha_bar_prev, std) -> np.ndarray:
    """DDIM eq. 12: x_prev = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev - std^2) eps (+ std z)."""
    return lincomb((sqrt(alpha_bar_prev), x0), (sqrt(1 - alpha_bar_prev - std * std), eps))


def ddpm_posterior_mean(x0: np.ndarray, x_t: np.ndarray, alpha_bar_t, alpha_bar_prev) -> np.ndarray:
    """Mean of q(x_prev | x_t, x0), DDPM eq. 7."""
    beta_prod_t = 1 - alpha_bar_t
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    x0_coeff = (sqrt(alpha_bar_prev) * beta_t) / beta_prod_t
    x_t_coeff = sqrt(alpha_t) * (1 - alpha_bar_prev) / beta_prod_t
    return lincomb((x0_coeff, x0), (x_t_coeff, x_t))


def ddpm_posterior_variance(alpha_bar_t, alpha_bar_prev) -> tuple[np.float32, np.float32]:
    """(beta_tilde_t, beta_t): the posterior variance of DDPM eq. 7 (floored at 1e-20) and the
    forward variance, the "small" and "large" choices of DDPM section 3.2."""
    beta_t = 1 - alpha_bar_t / alpha_bar_prev
    beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    return max(beta_tilde, F32(1e-20)), beta_t


# --- PNDM (Liu et al. 2022) ---------------------------------------------------------------------


def pndm_transfer(x: np.ndarray, eps: np.ndarray, alpha_bar_t, alpha_bar_prev) -> np.ndarray:
    """The transfer part phi(x_t, eps, t, t_prev) of PNDM, eq. 11: a DDIM step written in alpha_bar."""
    beta_prod_t = 1 - alpha_bar_t
    beta_prod_prev = 1 - alpha_bar_prev
    x_coeff = sqrt(alpha_bar_prev / alpha_bar_t)
    eps_denominator = alpha_bar_t * sqrt(beta_prod_prev) + sqrt(alpha_bar_t * beta_prod_t * alpha_bar_prev)
    eps_term = (alpha_bar_prev - alpha_bar_t) * eps
    eps_term /= eps_denominator
    return lincomb((x_coeff, x), (-1, eps_term))


def adams_bashforth_eps(ets: Sequence[np.ndarray]) -> np.ndarray:
    """The linear multistep combination of the last 2-4 noise predictions (PNDM eq. 12), newest last."""
    if len(ets) == 2:
        out = lincomb((3, ets[-1]), (-1, ets[-2]))
        out /= 2
    elif len(ets) == 3:
        out = lincomb((23, ets[-1]), (-16, ets[-2]), (5, ets[-3]))
        out /= 12
    else:
        out = lincomb((55, ets[-1]), (-59, ets[-2]), (37, ets[-3]), (-9, ets[-4]))
        out *= 1 / 24
    return out


# --- k-diffusion samplers (Karras et al. 2022, Crowson's k-diffusion) ---------------------------


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[np.float32]:
    """Weights of the linear multistep method from sigma_i to sigma_{i+1}, newest derivative first.

    Weight j is the integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial that is 1
    at sigma_{i-j} and 0 at the other sigma_{i-k}, k < order: exact, as the integrand is a polynomial.
    """
    nodes = [float(sigmas[i - k]) for k in range(order)]
    lo, hi = float(sigmas[i]), float(sigmas[i + 1])
    weights = []
    for j in range(order):
        coeffs = [1.0]  # ascending powers of tau; degree < 4, so plain Python floats are fastest
        scale = 1.0
        for k, root in enumerate(nodes):
            if k != j:
                coeffs = [a - root * b for a, b in zip([0.0] + coeffs, coeffs + [0.0])]
                scale *= nodes[j] - root
        integral = sum(c / (p + 1) * (hi ** (p + 1) - lo ** (p + 1)) for p, c in enumerate(coeffs))
        weights.append(F32(integral / scale))
    return weights


def to_d(x: np.ndarray, x0: np.ndarray, sigma) -> np.ndarray:
    """dx/dsigma of the probability-flow ODE at (x, sigma), given the denoised x0."""
    d = x - x0
    d /= sigma
    return d


def ancestral_sigmas(sigma_from, sigma_to) -> tuple[np.float32, np.float32]:
    """(sigma_down, sigma_up): a deterministic step to sigma_down, then fresh noise of std sigma_up,
    lands on sigma_to with the variance of the DDPM posterior."""
    from_sq, to_sq = sigma_from * sigma_from, sigma_to * sigma_to
    sigma_up = sqrt(to_sq * (from_sq - to_sq) / from_sq)
    sigma_down = sqrt(to_sq - sigma_up * sigma_up)
    return sigma_down, sigma_up


# --- DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095), data-prediction form ----------------------


def vp_alpha_sigma(sigma) -> tuple[np.float32, np.float32]:
    """(alpha_t, sigma_t) of the variance-preserving process whose VE noise level is ``sigma``."""
    alpha = 1 / sqrt(sigma * sigma + 1)
    return alpha, sigma * alpha


def log_snr(alpha, sigma) -> np.float32:
    """lambda = log(alpha) - log(sigma); +inf at sigma = 0."""
    return log(alpha) - log(sigma)


def dpmpp_first_order(x, x0, alpha_t, sigma_t, sigma_s, h, noise=None) -> np.ndarray:
    """DPM-Solver++(1), i.e. DDIM in lambda (eq. 8); with ``noise`` the SDE variant (Lu et al. App. B)."""
    if noise is None:
        return lincomb((sigma_t / sigma_s, x), (-(alpha_t * (exp(-h) - 1)), x0))
    return lincomb(
        (sigma_t / sigma_s * exp(-h), x),
        (alpha_t * (1 - exp(F32(-2.0) * h)), x0),
        (sigma_t * sqrt(1 - exp(-2 * h)), noise),
    )


def dpmpp_second_order(x, m0, m1, alpha_t, sigma_t, sigma_s0, h, h_0, solver_type, noise=None) -> np.ndarray:
    """DPM-Solver++(2M) (Algorithm 2): m0, m1 are the last two x0 predictions, h, h_0 the last two
    steps in lambda; D1 is their scaled difference, used as a midpoint or Heun correction."""
    r0 = h_0 / h
    D0 = m0
    D1 = m0 - m1
    D1 *= 1 / r0
    if noise is None:
        phi = alpha_t * (exp(-h) - 1)
        if solver_type == "midpoint":
            d1_coeff = -(F32(0.5) * phi)
        else:
            d1_coeff = alpha_t * ((exp(-h) - 1) / h + 1)
        return lincomb((sigma_t / sigma_s0, x), (-phi, D0), (d1_coeff, D1))
    phi = alpha_t * (1 - exp(F32(-2.0) * h))
    if solver_type == "midpoint":
        d1_coeff = F32(0.5) * phi
    else:
        d1_coeff = alpha_t * ((1 - exp(F32(-2.0) * h)) / (F32(-2.0) * h) + 1)
    return lincomb(
        (sigma_t / sigma_s0 * exp(-h), x), (phi, D0), (d1_coeff, D1), (sigma_t * sqrt(1 - exp(-2 * h)), noise)
    )


def dpmpp_third_order(x, m0, m1, m2, alpha_t, sigma_t, sigma_s0, h, h_0, h_1, noise=None) -> np.ndarray:
    """DPM-Solver++(3M): second differences of the last three x0 predictions."""
    r0, r1 = h_0 / h, h_1 / h
    D0 = m0
    D1_0 = m0 - m1
    D1_0 *= 1 / r0
    D1_1 = m1 - m2
    D1_1 *= 1 / r1
    D2 = D1_0 - D1_1  # scaled below; first used for D1
    D1 = lincomb((1, D1_0), (r0 / (r0 + r1), D2))
    D2 *= 1 / (r0 + r1)
    if noise is None:
        return lincomb(
            (sigma_t / sigma_s0, x),
            (-(alpha_t * (exp(-h) - 1)), D0),
            (alpha_t * ((exp(-h) - 1) / h + 1), D1),
            (-(alpha_t * ((exp(-h) - 1 + h) / (h * h) - F32(0.5))), D2),
        )
    two_h = F32(2.0) * h
    return lincomb(
        (sigma_t / sigma_s0 * exp(-h), x),
        (alpha_t * (1 - exp(F32(-2.0) * h)), D0),
        (alpha_t * ((1 - exp(F32(-2.0) * h)) / (F32(-2.0) * h) + 1), D1),
        (alpha_t * ((1 - exp(F32(-2.0) * h) - two_h) / (two_h * two_h) - F32(0.5)), D2),
        (sigma_t * sqrt(1 - exp(-2 * h)), noise),
    )


# --- UniPC (Zhao et al. 2023), the B(h) variants of Algorithms 1-3 ------------------------------


def _unipc_system(rks: np.ndarray, hh, order: int, variant: str):
    """The order-by-order system R rho = b of UniPC, and the factors h*phi_1(hh) and B(hh)."""
    h_phi_1 = expm1(hh)  # h * phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1
    B_h = hh if variant == "bh1" else expm1(hh)
    factorial = 1
    b = []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - F32(1 / factorial)  # phi_{k+1}(h) = (phi_k(h) - 1/k!) / h
    R = np.stack([rks**k for k in range(order)])  # Vandermonde rows r^0, r^1, ...
    return h_phi_1, B_h, R, np.array(b, dtype=F32)


def _divided_differences(history, m0, rks) -> list[np.ndarray]:
    """D1_k = (m_k - m0) / r_k."""
    out = []
    for m, rk in zip(history, rks):
        d = m - m0
        d /= rk
        out.append(d)
    return out


def _unipc_base(x, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, predict_x0: bool):
    """The first-order (DDIM-like) part shared by predictor and corrector."""
    if predict_x0:
        return lincomb((sigma_t / sigma_s0, x), (-(alpha_t * h_phi_1), m0))
    return lincomb((alpha_t / alpha_s0, x), (-(sigma_t * h_phi_1), m0))


def unipc_predictor(x, m0, history, rks, h, alpha_t, sigma_t, alpha_s0, sigma_s0, order, predict_x0, variant):
    """UniP-p: x_t from x_s0 with the model outputs m0 (at s0) and ``history`` (at s1, s2, ...).

    ``rks`` are (lambda_si - lambda_s0) / h for the history entries, in the same order.
    """
    hh = -h if predict_x0 else h
    rks_all = np.array(list(rks) + [1.0], dtype=F32)
    h_phi_1, B_h, R, b = _unipc_system(rks_all, hh, order, variant)
    x_t = _unipc_base(x, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, predict_x0)
    scale = alpha_t if predict_x0 else sigma_t
    if not history:
        # diffusers subtracts scale * B(h) * 0 here: NaN when B(h) is infinite ("bh1" stepping to
        # sigma = 0), which is kept so that such configs fail here exactly as they do there.
        x_t -= scale * B_h * F32(0)
        return x_t
    D1s = _divided_differences(history, m0, rks)
    rhos = np.array([0.5], dtype=F32) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).astype(F32)
    x_t -= (scale * B_h) * lincomb(*zip(rhos, D1s))
    return x_t


def unipc_corrector(x, m0, m_t, history, rks, h, alpha_t, sigma_t, alpha_s0, sigma_s0, order, predict_x0, variant):
    """UniC: refine x_t (computed from x at s0) with the model output m_t evaluated at x_t itself."""
    hh = -h if predict_x0 else h
    rks_all = np.array(list(rks) + [1.0], dtype=F32)
    h_phi_1, B_h, R, b = _unipc_system(rks_all, hh, order, variant)
    x_t = _unipc_base(x, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, predict_x0)
    rhos = np.array([0.5], dtype=F32) if order == 1 else np.linalg.solve(R, b).astype(F32)
    correction = m_t - m0  # D1_t
    correction *= rhos[-1]
    if history:
        D1s = _divided_differences(history, m0, rks)
        correction += lincomb(*zip(rhos[:-1], D1s))
    scale = alpha_t if predict_x0 else sigma_t
    x_t -= (scale * B_h) * correction
    return x_t


# --- Latent Consistency Models (Luo et al. 2023) ------------------------------------------------


def lcm_boundary_scalings(timestep, timestep_scaling: float, sigma_data: float = 0.5):
    """(c_skip, c_out) of the consistency-model parameterisation f(x, t) = c_skip x + c_out x0(x, t),
    which makes f the identity at t = 0."""
    scaled = F32(timestep) * F32(timestep_scaling)
    denominator = scaled * scaled + F32(sigma_data**2)
    c_skip = (1 / denominator) * F32(sigma_data**2)  # torch evaluates ``float / tensor`` this way
    c_out = scaled / sqrt(denominator)
    return c_skip, c_out
