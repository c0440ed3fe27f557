"""Train a small model with every fusedoptim optimizer and torch.optim.AdamW; print loss and step time.

A stand-in for the main job until the benchmark harness lands: it exercises each optimizer end to end on
whatever device is here (Triton kernels on CUDA, the reference path on CPU) and reports, per optimizer,
the loss after training and the median optimizer-step time, measured in one process.

    python benchmarks/demo.py [--steps 200] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fusedoptim import AdaBelief, Adan, AdEMAMix

OPTIMIZERS = {
    "torch AdamW (fused)": lambda p, dev: torch.optim.AdamW(p, lr=3e-3, fused=True),
    "AdaBelief": lambda p, dev: AdaBelief(p, lr=3e-3),
    "Adan": lambda p, dev: Adan(p, lr=3e-3, weight_decay=0.02),
    "AdEMAMix": lambda p, dev: AdEMAMix(p, lr=3e-3, alpha=2.0, alpha_warmup=100, beta3_warmup=100),
}


def make_data(device: torch.device, n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=gen)
    y = (x[:, :8].sin().sum(1, keepdim=True) + 0.1 * x[:, 8:16].pow(2).sum(1, keepdim=True))
    return x.to(device), y.to(device)


def make_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                               torch.nn.GELU(), torch.nn.Linear(256, 1)).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    x, y = make_data(device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} steps={args.steps}")
    print(f"{'optimizer':<22} {'backend':<10} {'loss@0':>8} {'loss@end':>9} {'step ms (median)':>17}")
    for name, make in OPTIMIZERS.items():
        model = make_model(device)
        opt = make(model.parameters(), device)
        backend = "torch" if name.startswith("torch") else ("triton" if device.type == "cuda" else "reference")
        times, first = [], None
        for step in range(args.steps):
            batch = slice((step * 256) % x.shape[0], (step * 256) % x.shape[0] + 256)
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            first = loss.item() if first is None else first
        final = torch.nn.functional.mse_loss(model(x), y).item()
        print(f"{name:<22} {backend:<10} {first:>8.4f} {final:>9.4f} {1e3 * statistics.median(times[5:]):>17.3f}")


if __name__ == "__main__":
    main()
