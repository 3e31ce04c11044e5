"""`raytune-ft bench ...`: the training, Tune and serving benchmarks' commands and their tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from raytune_ft.cli.common import (
    EXIT_CONFIG,
    EXIT_RUNTIME,
    ConfigArg,
    OverridesArg,
    app,
    err,
    fail,
    load_experiment,
    num,
    out,
)


def write_json(path: Path | None, result: dict) -> None:
    """--json PATH: the figures as JSON (values JSON has no type for as text)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    err.print(f"wrote {path}", highlight=False)


bench_app = typer.Typer(
    help="Benchmarks: training throughput, start-up and ZeRO memory; Tune overhead and search quality.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.command("train")
def bench_train(
    config: ConfigArg,
    overrides: OverridesArg = None,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Optimizer steps per loop (first one untimed).")] = 20,
    zero_stages: Annotated[
        str | None, typer.Option("--zero-stages", help="Also measure memory per worker of ZeRO stages, e.g. 0,2,3.")
    ] = None,
    memory_model: Annotated[
        str, typer.Option("--memory-model", help="Llama shape for the memory runs: 130m, 350m, 1b or tiny.")
    ] = "130m",
    skip_throughput: Annotated[
        bool, typer.Option("--memory-only", help="Only the ZeRO memory runs (needs --zero-stages).")
    ] = False,
    peak_tflops: Annotated[
        float | None, typer.Option("--peak-tflops", help="Accelerator peak for MFU when its name is not known.")
    ] = None,
    packing: Annotated[
        bool,
        typer.Option(
            "--packing",
            help="Chat experiments: instead of the bare-loop comparison, the Ray Train + DeepSpeed loop on packed "
            "and on padded rows (data.chat.packing true/false): tokens/s, conversations/s, rows/s, fill.",
        ),
    ] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """Bare PyTorch loop vs the Ray Train + DeepSpeed loop on the same model, data and global batch; with
    --packing, packed against padded chat rows."""
    from raytune_ft.bench import MEMORY_MODELS, bench_memory, bench_throughput
    from raytune_ft.bench.train import bench_packing
    from raytune_ft.data import DataError
    from raytune_ft.model_source import ModelSourceError

    cfg = load_experiment(config, overrides)
    try:
        stages = [int(s) for s in zero_stages.split(",")] if zero_stages else []
    except ValueError:
        fail(f"--zero-stages: expected numbers such as 0,2,3, got '{zero_stages}'", EXIT_CONFIG)
    if any(s not in (0, 1, 2, 3) for s in stages):
        fail(f"--zero-stages: ZeRO stages are 0, 1, 2 and 3, got '{zero_stages}'", EXIT_CONFIG)
    if memory_model not in MEMORY_MODELS:
        fail(f"--memory-model: expected one of {', '.join(MEMORY_MODELS)}, got '{memory_model}'", EXIT_CONFIG)
    if skip_throughput and not stages:
        fail("--memory-only needs --zero-stages", EXIT_CONFIG)
    if packing and cfg.model.task != "chat":
        fail(
            f"--packing compares packed and padded chat rows, so it needs model.task: chat; {config} has "
            f"model.task '{cfg.model.task}'",
            EXIT_CONFIG,
        )
    if packing and skip_throughput:
        fail("--packing runs training loops; --memory-only runs none", EXIT_CONFIG)
    log = lambda m: err.print(m, highlight=False)  # noqa: E731
    result: dict[str, Any] = {}
    try:
        if packing:
            result = bench_packing(cfg, steps, log=log)
            _print_packing(result)
        elif not skip_throughput:
            result = bench_throughput(cfg, steps, log=log, peak_tflops=peak_tflops)
            _print_throughput(result)
        if stages:
            result["memory"] = bench_memory(cfg, stages, memory_model, log=log)
            _print_memory(result["memory"])
    except (DataError, ModelSourceError, ValueError) as exc:
        fail(str(exc), EXIT_RUNTIME)
    write_json(json_path, result)


def _print_throughput(r: dict[str, Any]) -> None:
    table = Table(
        title=f"{r['experiment']}: {r['steps']} steps x {r['global_batch']} samples, {r['workers']} worker(s), "
        f"ZeRO-{r['zero_stage']}, {r['finetune']}, {r['device']} {r['precision']}",
        title_justify="left",
    )
    for col in ("", "bare PyTorch", "Ray Train + DeepSpeed", "ratio"):
        table.add_column(col, justify="left" if not col else "right")
    for key in ("samples_per_s", "tokens_per_s", "time_to_first_step_s", "peak_rss_mb"):
        table.add_row(key, num(r["bare"][key]), num(r["ray"][key]), num(r["ratios"][key], 3))
    out.print(table)
    out.print(
        f"no-op TorchTrainer time to first step: {r['noop_time_to_first_step_s']:.1f} s; "
        f"this loop's is {num(r['startup_vs_noop'], 2)}x that "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in r['ray']['startup_s'].items())})",
        highlight=False,
        soft_wrap=True,
    )
    if r["ray"].get("mfu") is not None:
        out.print(f"model FLOPs utilisation: {r['ray']['mfu']:.1%}", highlight=False)


def _print_packing(r: dict[str, Any]) -> None:
    """The --packing table: each figure padded and packed, and packed/padded for the rates."""
    table = Table(
        title=f"{r['experiment']}: packed vs padded, {r['steps']} steps x {r['global_batch']} rows of up to "
        f"{r['block_size']} tokens, {r['workers']} worker(s), ZeRO-{r['zero_stage']}, {r['finetune']}, "
        f"{r['device']} {r['precision']}",
        title_justify="left",
    )
    for col in ("", "padded", "packed", "packed/padded"):
        table.add_column(col, justify="left" if not col else "right")
    for key in ("tokens_per_s", "conversations_per_s", "samples_per_s"):
        table.add_row(key, num(r["padded"][key]), num(r["packed"][key]), num(r["speedup"][key], 3))
    for key, digits in (("batch_fill", 3), ("time_to_first_step_s", 1), ("peak_rss_mb", 0)):
        table.add_row(key, num(r["padded"][key], digits), num(r["packed"][key], digits), "")
    out.print(table)
    f = r["fill"]
    out.print(
        f"fill of {r['block_size']}-token rows over the {f['examples']} training conversations ({f['tokens']} "
        f"tokens): packed {f['fill_packed']:.3f} in {f['rows_packed']} rows, padded {f['fill_padded']:.3f} in "
        f"{f['rows_padded']} rows; batch_fill is that of the timed steps' batches (padded to their longest row)",
        highlight=False,
        soft_wrap=True,
    )


def _print_memory(m: dict[str, Any]) -> None:
    table = Table(
        title=f"ZeRO memory per worker: {m['model']} ({m['params'] / 1e6:.1f}M params), {m['workers']} worker(s), "
        f"block {m['block_size']}",
        title_justify="left",
    )
    for col in ("ZeRO stage", "model states MB", "DeepSpeed estimator MB", "peak RSS MB", "peak device MB"):
        table.add_column(col, justify="right")
    for stage, s in m["stages"].items():
        table.add_row(
            stage,
            num(s["model_state_mb"], 0),
            num(s["estimator_mb"], 0),
            num(s["peak_rss_mb"], 0),
            num(s["peak_device_mb"], 0),
        )
    out.print(table)
    if "zero3_vs_zero0" in m:
        out.print(
            f"ZeRO-3 / ZeRO-0 model states per worker: measured {m['zero3_vs_zero0']:.2f}, "
            f"DeepSpeed estimator {m['estimator_zero3_vs_zero0']:.2f} (peak RSS {m['zero3_vs_zero0_peak_rss']:.2f})",
            highlight=False,
        )


def _csv(value: str, option: str, allowed: tuple, cast: Any = str) -> list:
    try:
        items = [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        fail(f"{option}: expected a comma-separated list of {', '.join(map(str, allowed))}, got '{value}'", EXIT_CONFIG)
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        fail(f"{option}: expected values from {', '.join(map(str, allowed))}, got '{value}'", EXIT_CONFIG)
    return items


@bench_app.command("lm")
def bench_lm_command(
    size: Annotated[str, typer.Option("--size", help="Llama shape: tiny, 130m, 350m or 1b (TinyLlama-1.1B).")] = "1b",
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="Tokens per packed block.")] = 2048,
    micro_batch: Annotated[int, typer.Option("--micro-batch", min=1, help="Blocks per worker per step.")] = 4,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Optimizer steps (the first is untimed).")] = 20,
    zero_stages: Annotated[str, typer.Option("--zero-stages", help="ZeRO stages to run, e.g. 2,3.")] = "2,3",
    methods: Annotated[str, typer.Option("--methods", help="Fine-tuning methods: full, lora.")] = "full,lora",
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ray Train workers (the bare loop needs 1).")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto (GPU when there is one), gpu or cpu.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 on GPU), bf16, fp16, fp32.")] = "auto",
    attn: Annotated[str, typer.Option("--attn", help="auto, sdpa, eager or flash_attention_2.")] = "auto",
    activation_checkpointing: Annotated[
        bool, typer.Option("--activation-checkpointing", help="Recompute activations in the backward pass.")
    ] = False,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model (DeepSpeed).")] = False,
    fused_adamw: Annotated[
        bool | None, typer.Option("--fused-adamw/--no-fused-adamw", help="Default: fused on GPU.")
    ] = None,
    skip_bare: Annotated[bool, typer.Option("--no-bare", help="Only the Ray Train + DeepSpeed runs.")] = False,
    peak_tflops: Annotated[
        float | None, typer.Option("--peak-tflops", help="Accelerator peak for MFU when its name is not known.")
    ] = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="A Ray cluster running on this machine (default: an embedded local Ray)."),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """A Llama-style causal LM from a config (random weights) on packed random tokens: tokens/s, MFU, peak
    memory and time to first step, Ray Train + DeepSpeed against a bare one-process DeepSpeed loop."""
    from raytune_ft.bench.lm import LM_SIZES, bench_lm

    _csv(size, "--size", tuple(LM_SIZES))
    stages = _csv(zero_stages, "--zero-stages", (0, 1, 2, 3), int)
    method_list = _csv(methods, "--methods", ("full", "lora"))
    _csv(device, "--device", ("auto", "gpu", "cpu"))
    _csv(precision, "--precision", ("auto", "bf16", "fp16", "fp32"))
    _csv(attn, "--attn", ("auto", "sdpa", "eager", "flash_attention_2"))
    use_gpu = None if device == "auto" else device == "gpu"
    log = lambda m: err.print(m, highlight=False)  # noqa: E731
    try:
        result = bench_lm(
            size=size,
            seq_len=seq_len,
            micro_batch=micro_batch,
            steps=steps,
            stages=stages,
            methods=method_list,
            workers=workers,
            use_gpu=use_gpu,
            bare=not skip_bare,
            peak_tflops=peak_tflops,
            address=address,
            log=log,
            precision=precision,
            attn=attn,
            activation_checkpointing=activation_checkpointing,
            compile_model=compile_model,
            fused_adamw=fused_adamw,
        )
    except ValueError as exc:
        fail(str(exc), EXIT_CONFIG)
    except RuntimeError as exc:
        fail(str(exc), EXIT_RUNTIME)
    _print_lm(result)
    write_json(json_path, result)


def _print_lm(r: dict[str, Any]) -> None:
    first = r["runs"][0]["ray"] if r["runs"] else {}
    table = Table(
        title=f"Llama {r['size']} ({r['params'] / 1e6:.0f}M params), {r['seq_len']} tokens x {r['micro_batch']} "
        f"per worker, {r['workers']} worker(s), {first.get('device_name')} {first.get('precision')}",
        title_justify="left",
    )
    columns = ("ZeRO", "method", "tokens/s Ray", "tokens/s bare", "Ray/bare", "MFU", "MFU 6N", "peak GPU MB")
    for col in (*columns, "peak RSS MB", "first step Ray s", "first step bare s"):
        table.add_column(col, justify="right")
    for run in r["runs"]:
        ray_side, bare = run["ray"], run.get("bare", {})
        table.add_row(
            str(run["zero_stage"]),
            run["method"],
            num(ray_side["tokens_per_s"], 0),
            num(bare.get("tokens_per_s"), 0),
            num(run.get("ray_vs_bare"), 3),
            "-" if ray_side["mfu"] is None else f"{ray_side['mfu']:.1%}",
            "-" if ray_side["mfu_6n"] is None else f"{ray_side['mfu_6n']:.1%}",
            num(ray_side["peak_device_mb"], 0),
            num(ray_side["peak_rss_mb"], 0),
            num(ray_side["time_to_first_step_s"], 1),
            num(bare.get("time_to_first_step_s"), 1),
        )
    out.print(table)


@bench_app.command("tune")
def bench_tune(
    config: ConfigArg,
    overrides: OverridesArg = None,
    trials: Annotated[int, typer.Option("--trials", min=2, help="Trials of the overhead runs.")] = 20,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Steps per trial of the engine overhead run.")] = 8,
    compare: Annotated[
        str | None, typer.Option("--compare", help="Also search with these algorithms, e.g. random,optuna,pbt.")
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="--compare: seeds per algorithm.")] = 3,
    samples: Annotated[int, typer.Option("--samples", min=1, help="--compare: trials per search.")] = 4,
    skip_overhead: Annotated[bool, typer.Option("--compare-only", help="Only the --compare searches.")] = False,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Where the searches go, refused if not empty (default OUTPUT_DIR/NAME/bench-tune)."),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """Tune's overhead (trivial trainable and the real engine: trials/min, gaps, memory per trial) and, with
    --compare, the best validation metric each search algorithm finds at equal compute."""
    from raytune_ft.bench.tune import bench_compare, bench_engine, bench_trivial
    from raytune_ft.data import DataError
    from raytune_ft.model_source import ModelSourceError
    from raytune_ft.train.ray_cluster import ensure_ray
    from raytune_ft.tune import MissingExtraError
    from raytune_ft.tune.search import require_extra

    cfg = load_experiment(config, overrides)
    algorithms = [a.strip() for a in compare.split(",") if a.strip()] if compare else []
    from raytune_ft.config.algorithms import NAMES

    if any(a not in NAMES for a in algorithms):
        fail(f"--compare: algorithms are {', '.join(NAMES)}, got '{compare}'", EXIT_CONFIG)
    if skip_overhead and not algorithms:
        fail("--compare-only needs --compare", EXIT_CONFIG)
    if algorithms and (cfg.tune is None or not cfg.tune.search_space):
        fail(f"{config}: --compare needs a tune.search_space to search", EXIT_CONFIG)
    try:
        for algorithm in algorithms:
            require_extra(algorithm)
    except MissingExtraError as exc:
        fail(str(exc), EXIT_CONFIG)
    root = (out_dir or cfg.run_dir / "bench-tune").resolve()
    if root.exists() and any(root.iterdir()):
        fail(f"{root} is not empty; pass another --out", EXIT_CONFIG)
    log = lambda m: err.print(m, highlight=False)  # noqa: E731
    result: dict[str, Any] = {"experiment": cfg.name}
    try:
        ensure_ray(cfg)
        if not skip_overhead:
            import ray

            log(f"trivial trainable: {trials} trials")
            concurrent = max(1, int(ray.cluster_resources().get("CPU", 1)))
            result["trivial"] = bench_trivial(trials, root / "trivial", concurrent)
            log(f"the engine: {trials} trials of {steps} steps")
            result["engine"] = bench_engine(cfg, trials, steps, root / "engine", log)
            _print_tune_overhead(result)
        if algorithms:
            seeds_list = [cfg.seed + i for i in range(seeds)]
            result["compare"] = bench_compare(cfg, algorithms, seeds_list, samples, root / "compare", log)
            _print_compare(result["compare"])
    except (DataError, ModelSourceError, ValueError, RuntimeError) as exc:
        fail(str(exc), EXIT_RUNTIME)
    write_json(json_path, result)


def _print_tune_overhead(r: dict[str, Any]) -> None:
    table = Table(title="Tune overhead", title_justify="left")
    for col in ("run", "trials", "wall s", "trials/min", "gap s (mean)", "gap s (max)"):
        table.add_column(col, justify="left" if col == "run" else "right")
    rows = [(f"trivial, {k}", v) for k, v in r["trivial"].items()] + [("engine, sequential", r["engine"])]
    for name, v in rows:
        gap = v.get("gap_s") or {}
        table.add_row(
            name,
            str(v["trials"]),
            num(v["wall_s"]),
            num(v["trials_per_min"]),
            num(gap.get("mean"), 2),
            num(gap.get("max"), 2),
        )
    out.print(table)
    memory = r["engine"]["memory"]
    for key, label in (("driver_rss_mb", "driver RSS"), ("used_mb", "machine memory used")):
        if memory.get(key):
            m = memory[key]
            out.print(
                f"{label} after each trial: first {num(m['first'])} MB, last {num(m['last'])} MB, "
                f"growth {num(m['growth_per_trial'], 2)} MB/trial",
                highlight=False,
            )
    if memory.get("worker_peak_rss_mb"):
        w = memory["worker_peak_rss_mb"]
        out.print(f"worker peak RSS: first trial {num(w['first'])} MB, last {num(w['last'])} MB", highlight=False)


def _print_compare(r: dict[str, Any]) -> None:
    table = Table(title=f"Best {r['metric']} at equal compute ({r['samples']} trials each)", title_justify="left")
    for col in ("algorithm", "seeds", "mean", "std", "min", "max", "steps trained (mean)", "wall s (mean)"):
        table.add_column(col, justify="left" if col == "algorithm" else "right")
    for name, a in r["algorithms"].items():
        b = a["best"]
        n = max(1, len(a["runs"]))
        wall = sum(run["wall_s"] for run in a["runs"]) / n
        steps = sum(run.get("steps_trained", 0) for run in a["runs"]) / n
        row = [num(b[k], 4) for k in ("mean", "std", "min", "max")]
        table.add_row(name, str(b["n"]), *row, num(steps, 0), num(wall))
    out.print(table)


# What both HTTP load commands (serve, soak) take
ServedUrlArg = Annotated[str, typer.Argument(help="The served app, e.g. http://127.0.0.1:8000.", show_default=False)]
TextsOption = Annotated[
    Path | None, typer.Option("--texts", help="Request texts, one per line (default: built-in sentences).")
]
ApiKeyEnvOption = Annotated[str | None, typer.Option("--api-key-env", help="Environment variable holding the API key.")]


@bench_app.command("serve")
def bench_serve(
    url: ServedUrlArg,
    concurrency: Annotated[str, typer.Option("--concurrency", help="Closed-loop client counts.")] = "1,4,16,64",
    rates: Annotated[str, typer.Option("--rates", help="Open-loop request rates (Poisson), e.g. 20,50.")] = "",
    requests: Annotated[int, typer.Option("--requests", min=1, help="Measured requests per level.")] = 200,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Unmeasured requests before each level.")] = 20,
    texts_file: TextsOption = None,
    api_key_env: ApiKeyEnvOption = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Export for the in-process floor (default: the server's).")
    ] = None,
    baseline_noop: Annotated[
        bool, typer.Option("--baseline-noop", help="Also deploy and time a no-op Ray Serve app.")
    ] = False,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster of the server.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures to this JSON file.")] = None,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Latency-vs-throughput plot (PNG).")] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Generation server: max_tokens of each streamed request.")
    ] = 64,
    adapters: Annotated[
        str | None,
        typer.Option(
            "--adapters",
            help="Generation server: LoRA adapter ids to time cold and warm (default: every adapter /v1/models lists).",
        ),
    ] = None,
    adapter_requests: Annotated[
        int, typer.Option("--adapter-requests", min=1, help="Warm requests per adapter after its first.")
    ] = 10,
    ignore_eos: Annotated[
        bool,
        typer.Option("--ignore-eos", help="Generation: every answer --max-tokens long, so levels do equal work."),
    ] = False,
) -> None:
    """Load-test a served model over HTTP: closed loop per concurrency, open loop per rate; p50/p90/p99/max,
    requests/s and errors per level, the in-process floor, serving overhead and batching gain. A causal-LM or chat
    server is measured streaming (closed loop): time to first token, inter-token latency, output tokens/s, the
    in-process engine's floor, and each LoRA adapter's cold and warm latency."""

    from raytune_ft.bench.serve import BenchServeError, plot

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
        rate_list = [float(r) for r in rates.split(",") if r.strip()]
    except ValueError:
        fail(f"--concurrency takes integers and --rates numbers, got '{concurrency}' and '{rates}'", EXIT_CONFIG)
    if not levels and not rate_list or any(c < 1 for c in levels) or any(r <= 0 for r in rate_list):
        fail("--concurrency levels must be >= 1 and --rates > 0, at least one level in all", EXIT_CONFIG)
    texts, key = request_texts(texts_file), api_key_from(api_key_env)
    from raytune_ft.bench.generation import bench_served

    log = lambda m: err.print(m, highlight=False)  # noqa: E731
    try:
        result = bench_served(
            url,
            concurrency=levels,
            rates=rate_list,
            requests=requests,
            warmup=warmup,
            api_key=key,
            texts=texts,
            model=model,
            baseline_noop=baseline_noop,
            address=address,
            max_tokens=max_tokens,
            adapters=[a.strip() for a in adapters.split(",") if a.strip()] if adapters else None,
            adapter_requests=adapter_requests,
            ignore_eos=ignore_eos,
            log=log,
        )
    except BenchServeError as exc:
        fail(str(exc), EXIT_RUNTIME)
    if result.get("benchmark") == "generation":
        _print_generation(result)
    else:
        _print_serve(result)
    if plot_path is not None:
        log(f"plot: {plot(result, plot_path)}")
    write_json(json_path, result)


def request_texts(texts_file: Path | None) -> list[str]:
    from raytune_ft.bench.serve import SENTENCES

    if texts_file is None:
        return SENTENCES
    if not texts_file.is_file():
        fail(f"--texts: {texts_file} does not exist", EXIT_CONFIG)
    texts = [line.strip() for line in texts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        fail(f"--texts: {texts_file} has no non-empty line", EXIT_CONFIG)
    return texts


def api_key_from(api_key_env: str | None) -> str | None:
    from raytune_ft.serve.deploy import ServeError, api_key_in

    try:
        return api_key_in(api_key_env, "--api-key-env")
    except ServeError as exc:
        fail(str(exc), EXIT_CONFIG)


@bench_app.command("soak")
def bench_soak(
    url: ServedUrlArg,
    rate: Annotated[float, typer.Option("--rate", min=0.1, help="Requests per second, on a fixed schedule.")] = 20.0,
    duration: Annotated[float, typer.Option("--duration", min=1, help="Seconds of load.")] = 300.0,
    window: Annotated[float, typer.Option("--window", min=0.5, help="Seconds per reported window.")] = 10.0,
    kill_replica_at: Annotated[
        float | None,
        typer.Option("--kill-replica-at", help="SIGKILL one replica of the app this many seconds in (local server)."),
    ] = None,
    texts_file: TextsOption = None,
    api_key_env: ApiKeyEnvOption = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures to this JSON file.")] = None,
) -> None:
    """Hold a served model at a fixed request rate for a bounded time: errors, p50/p99 and the Serve replicas'
    memory per window; with --kill-replica-at, what losing a replica costs and how fast Serve replaces it."""

    from raytune_ft.bench.serve import classify_bodies
    from raytune_ft.bench.soak import soak

    if kill_replica_at is not None and not 0 < kill_replica_at < duration:
        fail(f"--kill-replica-at must fall inside the run (0 < s < {duration:g}), got {kill_replica_at:g}", EXIT_CONFIG)
    bodies = classify_bodies(request_texts(texts_file))
    log = lambda m: err.print(m, highlight=False)  # noqa: E731
    log(f"{rate:g} requests/s for {duration:g} s ({int(rate * duration)} requests) against {url}")
    result = soak(url, bodies, rate, duration, window, kill_replica_at, api_key_from(api_key_env), log)
    _print_soak(result)
    write_json(json_path, result)
    if result["requests"] and result["errors"] == result["requests"]:
        fail(f"every request failed ({result['error_kinds']}): is the server at {url} up?", EXIT_RUNTIME)


def _print_soak(r: dict[str, Any]) -> None:
    table = Table(title=f"soak at {r['rate']:g} req/s for {r['duration_s']:g} s", title_justify="left")
    for col in ("from s", "requests", "errors", "p50 ms", "p99 ms", "max ms", "replicas", "replica RSS MB"):
        table.add_column(col, justify="right")
    for w in r["windows"]:
        row = [num(w[k], 1) for k in ("p50_ms", "p99_ms", "max_ms")]
        rss = num(w["replica_rss_mb"], 0)
        counts = [str(w["requests"]), str(w["errors"])]
        table.add_row(num(w["from_s"], 0), *counts, *row, str(w["replicas_answering"]), rss)
    out.print(table)
    out.print(
        f"{r['requests']} requests, {r['errors']} errors ({100 * r['error_rate']:.2f} %), "
        f"p50 {num(r['p50_ms'])} ms, p99 {num(r['p99_ms'])} ms",
        highlight=False,
    )
    if "replica_rss_slope_mb_per_min" in r:
        out.print(
            f"replica RSS {r['replica_rss_first_mb']:.0f} -> {r['replica_rss_last_mb']:.0f} MB "
            f"(max {r['replica_rss_max_mb']:.0f}, {r['replica_rss_slope_mb_per_min']:+.2f} MB/min)",
            highlight=False,
        )
    if "kill" in r:
        k = r["kill"]
        if "error" in k:
            out.print(f"no replica was killed: {k['error']}", highlight=False)
        else:
            out.print(
                f"killed replica pid {k['pid']} at {k['at_s']:.1f} s: {k['errors_after_kill']} errors after it; a new "
                f"replica answered {num(k['new_replica_answered_after_s'])} s later; p50/p99 before "
                f"{num(k['p50_ms_before'])}/{num(k['p99_ms_before'])} ms, after recovery "
                f"{num(k['p50_ms_after_recovery'])}/{num(k['p99_ms_after_recovery'])} ms",
                highlight=False,
            )


def _print_serve(r: dict[str, Any]) -> None:
    table = Table(title=f"{r['endpoint']} ({r['model']})", title_justify="left")
    for col in ("level", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors", "server batch (mean)"):
        table.add_column(col, justify="left" if col == "level" else "right")
    for lv in r["levels"]:
        name = f"c={lv['concurrency']}" if "concurrency" in lv else f"rate={lv['rate']:g}/s"
        row = [num(lv[k], 1) for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms")]
        table.add_row(name, *row, str(lv["errors"]), num(lv["server_batch_mean"], 1))
    out.print(table)
    if r.get("floor"):
        f = r["floor"]
        out.print(
            f"in-process floor: p50 {f['p50_ms']:.1f} ms at batch 1, {f['batched_rps']:.1f} items/s at batch "
            f"{f['batch_size']} ({f['threads']} thread(s)); serving overhead at c=1: {num(r['overhead_ms'])} ms",
            highlight=False,
        )
    if r.get("batching_gain") is not None:
        out.print(f"batching gain (req/s at the highest concurrency / at c=1): {r['batching_gain']:.2f}x")
    if r.get("breakdown_c1_ms"):
        b = r["breakdown_c1_ms"]
        out.print(
            f"c=1 p50 {b['client_p50']:.1f} ms = {b['outside_app']:.1f} outside the app (client, proxy, Serve) + "
            f"{b['app']:.1f} in it (Server-Timing: model {b['model']:.1f}, wait {b['wait']:.1f}, "
            f"middleware/FastAPI/validation/JSON {b['app_own']:.1f})",
            highlight=False,
        )
    if r.get("noop_p50_ms") is not None:
        out.print(
            f"no-op Ray Serve app p50 {r['noop_p50_ms']:.1f} ms; the app adds {num(r['app_over_noop_ms'])} ms, "
            f"of which {num(r.get('app_overhead_ms'))} ms beyond the forward pass",
            highlight=False,
        )


def _print_generation(r: dict[str, Any]) -> None:
    table = Table(title=f"{r['endpoint']} ({r['model']}, streamed, max_tokens {r['max_tokens']})", title_justify="left")
    columns = ("level", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "e2e p50", "e2e p99")
    for col in (*columns, "tokens/req", "errors"):
        table.add_column(col, justify="left" if col == "level" else "right")
    keys = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms")
    for lv in r["levels"]:
        row = [num(lv["rps"], 2), num(lv["output_tokens_per_s"], 1), *(num(lv[k], 1) for k in keys)]
        table.add_row(f"c={lv['concurrency']}", *row, num(lv["mean_output_tokens"], 1), str(lv["errors"]))
    out.print(table)
    out.print("latencies in ms; ITL: gaps between streamed text events, pooled over requests", highlight=False)
    for lv in r["levels"]:
        if lv["error_kinds"]:
            kinds = ", ".join(f"{kind} x{n}" for kind, n in lv["error_kinds"].items())
            out.print(f"c={lv['concurrency']} errors: {kinds}", highlight=False)
    if r.get("floor"):
        f = r["floor"]
        out.print(
            f"in-process floor (GenerationEngine, {f['threads']} thread(s)): TTFT p50 {num(f['ttft_p50_ms'])} ms, "
            f"{num(f['output_tokens_per_s_c1'])} tokens/s at c=1, {num(f['output_tokens_per_s_top'])} at "
            f"c={f['top_concurrency']}; serving adds {num(r['ttft_over_floor_ms'])} ms to TTFT at c=1",
            highlight=False,
        )
    if r.get("batching_gain") is not None:
        out.print(f"batching gain (output tokens/s at the highest concurrency / at c=1): {r['batching_gain']:.2f}x")
    if r.get("noop_p50_ms") is not None:
        out.print(f"no-op Ray Serve app p50 {r['noop_p50_ms']:.1f} ms", highlight=False)
    if r.get("adapters"):
        table = Table(title="LoRA adapters (serve_multiplexed_model_id)", title_justify="left")
        for col in ("adapter", "task", "loaded before", "cold ms", "warm p50 ms", "cold - warm ms", "errors"):
            table.add_column(col, justify="left" if col in ("adapter", "task") else "right")
        for a in r["adapters"]:
            loaded = "?" if a["loaded_before"] is None else "yes" if a["loaded_before"] else "no"
            errors = ", ".join(f"{kind} x{n}" for kind, n in a["error_kinds"].items()) or "0"
            cells = (num(a["cold_ms"]), num(a["warm_p50_ms"]), num(a["cold_over_warm_ms"]))
            table.add_row(a["id"], str(a["task"]), loaded, *cells, errors)
        out.print(table)
