"""Independent float64 transcriptions of the papers' / official codes' algorithms, one parameter at a time.

They are written from the papers and the official implementations (sail-sg/Adan, apple/ml-ademamix,
juntang-zhuang/Adabelief-Optimizer), in the style of those codes, NOT from fusedoptim's rules: they check
that the reference path computes the published algorithm, the way the parity test checks that the kernels
compute the reference.
"""

from __future__ import annotations

import math

import torch


def adabelief_oracle(param, grads, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay, maximize):
    beta1, beta2 = betas
    p = param.double().clone()
    m = torch.zeros_like(p)
    s = torch.zeros_like(p)
    s_max = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = -g.double() if maximize else g.double()
        if decoupled_weight_decay:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        s.mul_(beta2).addcmul_(g - m, g - m, value=1 - beta2).add_(eps)
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        if amsgrad:
            torch.max(s_max, s, out=s_max)
            denom = (s_max.sqrt() / math.sqrt(bc2)).add_(eps)
        else:
            denom = (s.sqrt() / math.sqrt(bc2)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)
    return p


def adan_oracle(param, grads, lr, betas, eps, weight_decay, amsgrad, no_prox, maximize):
    beta1, beta2, beta3 = betas
    p = param.double().clone()
    exp_avg, exp_avg_diff, exp_avg_sq = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    max_exp_avg_sq = torch.zeros_like(p)  # amsgrad on n is our option; the official code has none
    pre_grad = None
    for t, g in enumerate(grads, start=1):
        g = -g.double() if maximize else g.double()
        if pre_grad is None:
            pre_grad = g.clone()
        diff = g - pre_grad
        update = g + beta2 * diff
        exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
        exp_avg_diff.mul_(beta2).add_(diff, alpha=1 - beta2)
        exp_avg_sq.mul_(beta3).addcmul_(update, update, value=1 - beta3)
        if amsgrad:
            torch.max(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        n = max_exp_avg_sq if amsgrad else exp_avg_sq
        denom = (n.sqrt() / math.sqrt(1 - beta3**t)).add_(eps)
        step = exp_avg / (1 - beta1**t) / denom + beta2 * exp_avg_diff / (1 - beta2**t) / denom
        if no_prox:
            p.mul_(1 - lr * weight_decay).add_(step, alpha=-lr)
        else:
            p.add_(step, alpha=-lr).div_(1 + lr * weight_decay)
        pre_grad = g.clone()
    return p


def ademamix_oracle(param, grads, lr, betas, alpha, eps, weight_decay, alpha_warmup, beta3_warmup, maximize):
    beta1, beta2, beta3_final = betas

    def f(beta):  # half-life minus one
        return math.log(0.5) / math.log(beta) - 1

    def f_inv(h):
        return math.pow(0.5, 1 / (h + 1))

    p = param.double().clone()
    m1, m2, nu = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = -g.double() if maximize else g.double()
        alpha_t = alpha * t / alpha_warmup if alpha_warmup is not None and t < alpha_warmup else alpha
        if beta3_warmup is not None and t < beta3_warmup:
            a = t / beta3_warmup
            beta3 = f_inv((1 - a) * f(beta1) + a * f(beta3_final))
        else:
            beta3 = beta3_final
        m1.mul_(beta1).add_(g, alpha=1 - beta1)
        m2.mul_(beta3).add_(g, alpha=1 - beta3)
        nu.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (nu.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        update = (m1 / (1 - beta1**t) + alpha_t * m2) / denom + weight_decay * p
        p.add_(-lr * update)
    return p


def _clamp(x, lo, hi):
    return min(max(x, lo), hi)


def lars_oracle(param, grads, lr, momentum, dampening, weight_decay, nesterov, scale_clip, trust_coefficient,
                maximize):
    """LARS as in the paper (Alg. 1) and timm: the local LR scales g + λθ before it enters torch-SGD momentum."""
    lo, hi = scale_clip or (0.0, 10.0)
    p = param.double().clone()
    buf = None
    for g in grads:
        g = -g.double() if maximize else g.double()
        w_norm, g_norm = p.norm().item(), g.norm().item()
        if w_norm == 0 or g_norm == 0:
            local_lr = 1.0
        else:
            local_lr = trust_coefficient * _clamp(w_norm, lo, hi) / (g_norm + weight_decay * w_norm)
        d = local_lr * (g + weight_decay * p)
        if momentum:
            buf = d.clone() if buf is None else buf.mul_(momentum).add_(d, alpha=1 - dampening)
            d = d + momentum * buf if nesterov else buf
        p.add_(d, alpha=-lr)
    return p


def lamb_oracle(param, grads, lr, betas, eps, weight_decay, scale_clip, bias_correction, maximize):
    """LAMB, Algorithm 2 of You et al. (2019), with φ = clamp(‖θ‖, scale_clip)."""
    beta1, beta2 = betas
    lo, hi = scale_clip or (0.0, 10.0)
    p = param.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = -g.double() if maximize else g.double()
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m_hat, v_hat = (m / (1 - beta1**t), v / (1 - beta2**t)) if bias_correction else (m, v)
        r = m_hat / (v_hat.sqrt() + eps) + weight_decay * p
        phi, r_norm = _clamp(p.norm().item(), lo, hi), r.norm().item()
        ratio = 1.0 if phi == 0 or r_norm == 0 else phi / r_norm
        p.add_(r, alpha=-lr * ratio)
    return p


def ralars_oracle(param, grads, lr, betas, eps, weight_decay, force_adaptive_momentum, scale_clip, maximize):
    """holocron's RaLars (README.md#semantics): RAdam moments, ρ_t > 4, then LAMB's trust ratio."""
    beta1, beta2 = betas
    lo, hi = scale_clip or (0.0, 10.0)
    rho_inf = 2 / (1 - beta2) - 1
    p = param.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = -g.double() if maximize else g.double()
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        rho_t = rho_inf - 2 * t * beta2**t / bc2
        if rho_t > 4:
            r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            u = r_t * (m / bc1) / ((v / bc2).sqrt() + eps)
        elif force_adaptive_momentum:
            u = (m / bc1) / ((v / bc2).sqrt() + eps)
        else:
            u = m / bc1
        u = u + weight_decay * p
        phi, u_norm = _clamp(p.norm().item(), lo, hi), u.norm().item()
        ratio = 1.0 if phi == 0 or u_norm == 0 else phi / u_norm
        p.add_(u, alpha=-lr * ratio)
    return p


def tadam_oracle(param, grads, lr, betas, eps, weight_decay, amsgrad, dof, maximize):
    """TAdam as in the official Mahoumaru/TAdam code (k_dof·d degrees of freedom written as ν = dof or d)."""
    beta1, beta2 = betas
    p = param.double().clone()
    d = p.numel()
    nu = float(d) if dof is None else float(dof)
    m, v, v_max = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    big_w = beta1 / (1 - beta1)
    for t, g in enumerate(grads, start=1):
        g = -g.double() if maximize else g.double()
        g = g + weight_decay * p
        s = ((g - m) ** 2 / (v + eps)).sum().item()
        w = 1.0 if math.isinf(nu) else (nu + d) / (nu + s)
        m.mul_(big_w / (big_w + w)).add_(g, alpha=w / (big_w + w))
        big_w = big_w * (2 * beta1 - 1) / beta1 + w
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            torch.max(v_max, v, out=v_max)
        denom = ((v_max if amsgrad else v).sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
    return p


def adamp_oracle(param, grads, lr, betas, eps, weight_decay, amsgrad, delta, wd_ratio, nesterov, maximize):
    """AdamP as in the official clovaai/AdamP code (channel view, then layer view; |cos|; ndim > 1 only;
    decoupled decay scaled by wd_ratio when projected), plus amsgrad on v."""
    beta1, beta2 = betas
    p = param.double().clone()
    m, v, v_max = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)

    def cosine(x, y):  # torch.nn.functional.cosine_similarity(x, y, dim=1, eps=eps).abs()
        return (x * y).sum(1).abs() / (x.norm(dim=1).clamp(min=eps) * y.norm(dim=1).clamp(min=eps))

    for t, g in enumerate(grads, start=1):
        g = -g.double() if maximize else g.double()
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            torch.max(v_max, v, out=v_max)
        denom = ((v_max if amsgrad else v).sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        perturb = (beta1 * m + (1 - beta1) * g) / denom if nesterov else m / denom
        ratio = 1.0
        if p.dim() > 1:
            for view in (lambda x: x.reshape(x.shape[0], -1), lambda x: x.reshape(1, -1)):
                if cosine(view(g), view(p)).max() < delta / math.sqrt(view(p).shape[1]):
                    p_n = view(p) / (view(p).norm(dim=1, keepdim=True) + eps)
                    perturb = (view(perturb) - p_n * (p_n * view(perturb)).sum(1, keepdim=True)).reshape(p.shape)
                    ratio = wd_ratio
                    break
        if weight_decay > 0:
            p.mul_(1 - lr * weight_decay * ratio)
        p.add_(perturb, alpha=-lr / (1 - beta1**t))
    return p
