"""What the static fold's bias costs in vLLM's own ``o_proj`` kernel on this host, in process, no server.

The fold turns ``o_proj`` into a linear layer with a bias. On CPU, vLLM picks the GEMM for each linear layer at
load time (``dispatch_cpu_unquantized_gemm``: zentorch, sgl-kernel, oneDNN or torch), and the bias is an argument
of that one call. This benchmark builds an ``o_proj`` of the served model's shape, lets vLLM dispatch it, and
times the call without and with the bias, alternating the two call by call (so drift and other load hit both
alike), at the token counts of decode batches and of a prefill. It also times the fallback the plugin uses where
a kernel refuses the bias (the call without bias, then one add).

Run: python -m benchmarks.fold_cost [--model NAME_OR_DIR] [--repeats 3000]
Writes benchmarks/results/fold_cost.json and .png.
"""

from __future__ import annotations

import statistics
import time

import click
import torch

from benchmarks.common import RESULTS, write_result
from safetylock import models
from safetylock.geometry import head_geometry


class _Projection(torch.nn.Module):
    """The parts of a vLLM linear layer that its CPU GEMM dispatch reads: ``weight`` and ``bias``."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) / in_features**0.5
        self.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(out_features).to(dtype) * 0.1, requires_grad=False)


def _kernel_name(call) -> str:
    """Which GEMM vLLM's dispatch chose: the op its closure calls (zentorch, sgl-kernel, oneDNN or torch)."""
    names = getattr(getattr(call, "__code__", None), "co_names", ())
    known = ("zentorch_linear_unary", "weight_packed_linear_cpu", "onednn_mm", "linear")
    return next((name for name in known if name in names), repr(call))


def _timed(call) -> float:
    started = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - started) / 1e3


def _summary(values: list[float]) -> dict[str, float]:
    quartiles = statistics.quantiles(values, n=4)
    return {"median": statistics.median(values), "q1": quartiles[0], "q3": quartiles[2], "n": len(values)}


def _ratio_interval(plain: list[float], other: list[float], seed: int = 0, draws: int = 400) -> tuple[float, float]:
    """A 95% bootstrap interval of median(other) / median(plain) (pairs resampled together)."""
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.tensor(plain), torch.tensor(other)
    ratios = []
    for _ in range(draws):
        index = torch.randint(len(a), (len(a),), generator=generator)
        ratios.append(float(b[index].median() / a[index].median()))
    ratios.sort()
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", help="As the server is run.")
@click.option("--tokens", default="1,8,32,256", help="Rows per call: decode batch sizes and a prefill chunk.")
@click.option("--repeats", type=int, default=3000)
def main(model_name: str, dtype: str, tokens: str, repeats: int) -> None:
    from transformers import AutoConfig
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    geometry = head_geometry(AutoConfig.from_pretrained(models.resolve(model_name)))
    torch_dtype = getattr(torch, dtype)
    layer = _Projection(geometry.hidden_size, geometry.o_proj_in_features, torch_dtype)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    kernel = _kernel_name(layer.cpu_linear)
    bias = layer.bias
    rows = []
    with torch.no_grad():
        for count in [int(t) for t in tokens.split(",")]:
            x = torch.randn(count, geometry.o_proj_in_features, generator=torch.Generator().manual_seed(count)).to(torch_dtype)
            calls = {
                "plain": lambda x=x: layer.cpu_linear(x, layer.weight, None),
                "bias in kernel": lambda x=x: layer.cpu_linear(x, layer.weight, bias),
                "bias added after": lambda x=x: layer.cpu_linear(x, layer.weight, None) + bias,
            }
            for call in calls.values():  # warm-up
                for _ in range(50):
                    call()
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(repeats):
                for name, call in calls.items():
                    times[name].append(_timed(call))
            row = {"tokens": count, **{name: _summary(values) for name, values in times.items()}}
            for name in ("bias in kernel", "bias added after"):
                low, high = _ratio_interval(times["plain"], times[name])
                row[f"{name} / plain"] = {
                    "median": statistics.median(times[name]) / statistics.median(times["plain"]),
                    "ci95": [low, high],
                }
            rows.append(row)
            print(
                f"{count:>4} tokens: plain {row['plain']['median']:.1f} us, "
                + ", ".join(f"{n} x{row[f'{n} / plain']['median']:.3f} {row[f'{n} / plain']['ci95']}" for n in list(calls)[1:]),
                flush=True,
            )
    print(write_result("fold_cost", {"model": model_name, "dtype": dtype, "kernel": kernel, "repeats": repeats, "rows": rows}))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    xs = [str(r["tokens"]) for r in rows]
    for offset, name in ((-0.1, "bias in kernel"), (0.1, "bias added after")):
        med = [r[f"{name} / plain"]["median"] for r in rows]
        low = [m - r[f"{name} / plain"]["ci95"][0] for m, r in zip(med, rows)]
        high = [r[f"{name} / plain"]["ci95"][1] - m for m, r in zip(med, rows)]
        ax.errorbar([i + offset for i in range(len(xs))], med, yerr=[low, high], fmt="o", capsize=4, label=name)
    ax.set_xticks(range(len(xs)), xs)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("tokens per call")
    ax.set_ylabel("time / plain o_proj (median, 95% CI)")
    ax.set_title(f"o_proj bias cost, {dtype}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "fold_cost.png", dpi=120)


if __name__ == "__main__":
    main()
