"""Benchmarks: training throughput and start-up against a bare PyTorch loop, ZeRO memory per stage."""

from raytune_ft.bench.flops import mfu, train_flops_per_token
from raytune_ft.bench.memory import MEMORY_MODELS, bench_memory
from raytune_ft.bench.train import bench_throughput

__all__ = ["MEMORY_MODELS", "bench_memory", "bench_throughput", "mfu", "train_flops_per_token"]
