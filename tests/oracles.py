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
