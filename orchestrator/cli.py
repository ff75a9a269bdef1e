"""The `edgeweave` command: quantize, eval, generate, plan, serve, up, demo, moe-sim."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from quant.config import METHODS, QuantConfig  # light: no torch

__all__ = ["main"]


def _load_any(name_or_dir: str):
    """A quantized checkpoint directory, or a model (full precision). -> (model, tokenizer, label)."""
    from quant.checkpoint import is_checkpoint, load_checkpoint
    from quant.models import load_float_model

    if is_checkpoint(name_or_dir):
        model, tok, manifest = load_checkpoint(name_or_dir)
        m = manifest.method
        return model, tok, f"{m['method']} W{m['w_bits']}A{m['a_bits']} {m['act_scheme']}"
    model, tok = load_float_model(name_or_dir)
    return model, tok, "fp32"


def _luc_options(text: str) -> tuple[tuple, ...]:
    """"8,8:0.5,4,4:0.5,4:0:128" -> ((8, 0.0), (8, 0.5), (4, 0.0), (4, 0.5), (4, 0.0, 128))."""
    out: list[tuple] = []
    for item in text.split(","):
        bits, _, rest = item.strip().partition(":")
        sp, _, group = rest.partition(":")
        try:
            out.append((int(bits), float(sp or 0), *((int(group),) if group else ())))
        except ValueError as e:
            raise SystemExit(f"edgeweave quantize: --luc-options item {item!r} is not BITS, BITS:SPARSITY or "
                             f"BITS:SPARSITY:GROUP") from e
    return tuple(out)


def _byte_count(text: str) -> int:
    """"67MB", "512KiB", "1000000" -> bytes (quant.manifest.parse_bytes, as an argparse type)."""
    from quant.manifest import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count (e.g. 67MB, 64MiB, 70000000)") from e


def quant_config(a: argparse.Namespace):
    """The QuantConfig `edgeweave quantize` runs with these arguments (SystemExit with the reason
    when they do not combine)."""
    from quant.config import CalibConfig
    from quant.methods import method_traits

    calib = CalibConfig(path=a.calib, samples=a.calib_samples, seq_len=a.calib_len)
    t = method_traits(a.method)  # the method's own defaults
    scheme = t.only_scheme or a.act_scheme
    try:
        return QuantConfig(method=a.method, w_bits=a.w_bits, a_bits=a.a_bits, act_scheme=scheme, calib=calib,
                           tender_groups=a.groups, w_group=t.default_w_group if a.w_group is None else a.w_group,
                           mq_epochs=a.epochs, mq_lr_transform=a.lr_transform, mq_lr_clip=a.lr_clip,
                           mq_lr_range=a.lr_range, target_bytes=a.target_bytes, target_ratio=a.target_ratio,
                           avg_sparsity=a.avg_sparsity, luc_options=_luc_options(a.luc_options), w_asym=a.w_asym,
                           rotate_down=t.rotates_down_by_default if a.rotate_down is None else a.rotate_down,
                           rotate_all=a.rotate_all, rotate_residual=a.rotate_residual, gptq_refit=a.refit_scales,
                           kd_steps=a.kd_steps, kd_lr=a.kd_lr, kd_data=a.kd_data)
    except ValueError as e:
        raise SystemExit(f"edgeweave quantize: {e}") from e


def cmd_quantize(a: argparse.Namespace) -> int:
    import torch

    from quant.calibration import calibration_windows
    from quant.sources import SourceError, open_source
    from quant.stream import peak_rss_bytes, quantize_streaming, whole_model_reason

    cfg = quant_config(a)
    torch.manual_seed(0)
    t0 = time.time()
    try:
        source = open_source(a.model)
        tok = source.tokenizer()
        ids = calibration_windows(tok, cfg.calib)
        print(f"calibrating on {ids.shape[0]} x {ids.shape[1]} tokens from {cfg.calib.path or 'the C4 sample'}",
              file=sys.stderr)
        why = whole_model_reason(cfg)
        if why is None:  # layer by layer: about one float layer in memory at a time
            out = quantize_streaming(source, cfg, ids, a.out).path
        else:
            out = _quantize_whole(a, cfg, ids, why, 4 * source.parameters())
    except (SourceError, ValueError) as e:
        raise SystemExit(f"edgeweave quantize: {e}") from e
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    print(f"wrote {out} ({size:,} bytes of tensors) in {time.time() - t0:.0f}s; "
          f"peak memory {peak_rss_bytes() / 1e9:.2f} GB", file=sys.stderr)
    return 0


def _quantize_whole(a: argparse.Namespace, cfg, ids, why: str, float_bytes: int):
    """The methods that need every float weight at once: refused above --whole-model-limit."""
    from quant.checkpoint import save_checkpoint
    from quant.models import load_float_model
    from quant.pipeline import quantize

    if float_bytes > a.whole_model_limit:
        raise SystemExit(f"edgeweave quantize: {why}, which needs about {float_bytes / 1e9:.1f} GB of float32 weights "
                         f"in memory (over --whole-model-limit {a.whole_model_limit / 1e9:.1f} GB); use a layer-wise "
                         f"method (rtn, haq, tender) or raise the limit on a machine that holds it")
    model, tok = load_float_model(a.model)
    report = quantize(model, cfg, ids)
    return save_checkpoint(model, tok, cfg, report, a.out)


def cmd_eval(a: argparse.Namespace) -> int:
    from quant.calibration import SHARED_DATA, read_text
    from quant.evaluate import perplexity, tokenize_for_eval

    text_path = a.text or SHARED_DATA / "wikitext2" / "test.txt"
    text = read_text(text_path)
    model, tok, label = _load_any(a.model)
    ids = tokenize_for_eval(tok, text)
    if a.vote_exits:
        from quant.voting import voting_perplexity

        exits = tuple(int(e) for e in a.vote_exits.split(","))
        res = voting_perplexity(model, ids, a.ctx, a.windows or ids.numel() // a.ctx, exits)
        label += f", voting over exits {exits}"
    else:
        res = perplexity(model, ids, ctx=a.ctx, windows=a.windows)
    print(f"{a.model} [{label}] perplexity {res.ppl:.4f} on {res.windows} windows x {res.ctx} tokens of {text_path}")
    if a.json:
        Path(a.json).write_text(json.dumps({**res.to_dict(), "model": a.model, "text": str(text_path), "label": label}, indent=1))
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    import torch

    from quant.calibration import calibration_windows, read_text
    from quant.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint
    from quant.config import CalibConfig
    from quant.evaluate import tokenize_for_eval
    from quant.layerwise import QuantReport
    from quant.tune import TuneConfig, tune

    if not is_checkpoint(a.checkpoint):
        raise ValueError(f"{a.checkpoint} is not a quantized checkpoint: run edgeweave quantize first")
    torch.manual_seed(0)
    model, tok, manifest = load_checkpoint(a.checkpoint)
    # held out: the text's first windows; training windows are drawn from its end
    held = tokenize_for_eval(tok, read_text(a.text, max_chars=a.held_out * a.seq_len * 12))
    n_held = min(a.held_out, held.numel() // a.seq_len)
    if n_held < 1:
        raise ValueError(f"{a.text} has fewer than {a.seq_len} tokens; use a smaller --seq-len")
    eval_ids = held[: n_held * a.seq_len].view(n_held, a.seq_len)
    train_ids = calibration_windows(tok, CalibConfig(path=a.text, samples=a.samples, seq_len=a.seq_len, seed=1))
    cfg = TuneConfig(window=a.window, steps=a.steps, batch=a.batch, lr=a.lr)
    r = tune(model, train_ids, eval_ids, cfg)
    report = QuantReport(choices={**manifest.choices, "tune": {**r.to_dict(), "text": str(a.text), **cfg.__dict__}},
                         config=QuantConfig.from_dict(manifest.method))
    out = save_checkpoint(model, tok, report.config, report, a.out)  # type: ignore[arg-type]
    print(f"tuned {r.windows} windows of {a.window} layers: held-out loss {r.loss_before:.4f} -> {r.loss_after:.4f}; "
          f"tuning memory {r.peak_window_bytes / 2**20:.1f} MiB per window vs {r.full_model_bytes / 2**20:.1f} MiB for "
          f"the whole model; wrote {out}")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from quant.generate import SamplingConfig
    from workers.decode import stream_text

    if a.server:
        if a.prompt is not None:
            raise ValueError("with --server give only the prompt (the server already holds the model)")
        return _generate_remote(a.server, a.model, a)
    if a.model is None or a.prompt is None:
        raise ValueError("give a model or checkpoint directory and a prompt, or --server HOST:PORT and a prompt")
    cfg = SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    model, tok, _ = _load_any(a.model)
    sys.stdout.write(a.prompt)
    for piece in stream_text(model, tok, a.prompt, cfg):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _generate_remote(address: str, prompt: str | None, a: argparse.Namespace) -> int:
    import grpc

    from orchestrator.client import stream_generate

    if not prompt:
        raise ValueError("give the prompt")
    sys.stdout.write(prompt)
    try:
        for r in stream_generate(address, prompt, a.max_new_tokens, tuple(a.stop), a.temperature, a.top_p, a.seed,
                                 timeout_s=a.timeout):
            sys.stdout.write(r.text)
            sys.stdout.flush()
    except grpc.RpcError as e:
        sys.stdout.write("\n")
        raise ValueError(f"server {address}: {e.code().name}: {e.details()}") from e
    sys.stdout.write("\n")
    return 0


def _serve_options(a: argparse.Namespace):
    from orchestrator.controller import ServeOptions
    from protos.security import Security
    from quant.checkpoint import read_manifest

    read_manifest(a.checkpoint)  # a clear error before any process starts
    sec = Security.from_env()  # TLS and token: EDGEWEAVE_* variables (docs/security.md)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not (sec.token and sec.tls):
        print(f"warning: serving on {a.host} without TLS and a token; anyone who can reach the port can use "
              f"the model (docs/security.md)", file=sys.stderr)
    return ServeOptions(checkpoint=str(Path(a.checkpoint).resolve()), host=a.host, port=a.port, context=a.context,
                        batch=a.batch, prefill_chunk=a.prefill_chunk, quantize_wire=a.int8_wire, stream_steps=not a.unary_steps,
                        relay=not a.star, pipeline_depth=a.pipeline_depth, keep_awake=not a.no_keep_awake, pool=a.pool,
                        fast_slots=a.fast_slots, remote_experts=a.remote_experts, redis_url=a.redis_url or "",
                        prefetch=not a.no_prefetch, security=sec)


def _report_and_wait(actor, address: str) -> None:
    import signal
    import threading

    import ray

    from orchestrator.planner import Placement, format_placement

    print(format_placement(Placement.from_dict(ray.get(actor.placement_dict.remote()))), file=sys.stderr)
    print(f"edgeweave: serving on {address}; stream with: edgeweave generate --server {address} \"Hello\"",
          file=sys.stderr)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("edgeweave: shutting down", file=sys.stderr)
    ray.get(actor.shutdown.remote(), timeout=30)


def cmd_plan(a: argparse.Namespace) -> int:
    from orchestrator.planner import PlanOptions, format_placement, plan
    from workers.profile import load_profiles
    from quant.checkpoint import is_checkpoint, read_manifest
    from workers.shard import check_servable

    if not is_checkpoint(a.model):
        raise ValueError(f"{a.model} is not a quantized checkpoint; plan places quantized checkpoints "
                         f"(run `edgeweave quantize {a.model} --out DIR` first)")
    manifest = read_manifest(a.model)
    check_servable(manifest)
    p = plan(manifest, load_profiles(a.nodes), PlanOptions(a.context, a.batch, a.prefill_chunk, a.hop_ms, fast_slots=a.fast_slots, remote_experts=a.remote_experts), a.model)
    print(format_placement(p))
    if a.json:
        Path(a.json).write_text(json.dumps(p.to_dict(), indent=1))
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    import ray

    from orchestrator.controller import start_controller

    opts = _serve_options(a)
    ray.init(address=a.address, logging_level=logging.WARNING)
    try:
        actor, address = start_controller(opts)
        _report_and_wait(actor, address)
    finally:
        ray.shutdown()
    return 0


def _local_nodes(a: argparse.Namespace):
    from orchestrator.local import LocalNode
    from quant.manifest import parse_bytes

    mems = [parse_bytes(m) for m in a.node_memory.split(",")] if a.node_memory else []
    if mems and len(mems) != a.nodes:
        raise ValueError(f"--node-memory lists {len(mems)} sizes for --nodes {a.nodes}")
    if a.nodes < 1:
        raise ValueError("--nodes must be at least 1")
    return [LocalNode(mems[i] if mems else parse_bytes("1GB")) for i in range(a.nodes)]


def cmd_up(a: argparse.Namespace) -> int:
    from orchestrator.controller import start_controller
    from orchestrator.local import LocalCluster

    if not a.local:
        raise ValueError("`up` starts a local cluster (--local); for machines use `ray up cluster.yaml`, "
                         "then `edgeweave serve DIR --address auto` on the head")
    opts, nodes = _serve_options(a), _local_nodes(a)
    print(f"edgeweave: starting a local Ray cluster of {len(nodes)} nodes", file=sys.stderr)
    with LocalCluster(nodes):
        actor, address = start_controller(opts)
        _report_and_wait(actor, address)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """The README's main job: quantize the default model if needed, serve it on a local 3-node
    cluster, stream a reply through the service, shut down."""
    from orchestrator.client import stream_generate
    from orchestrator.controller import start_controller
    from orchestrator.local import LocalCluster
    from orchestrator.planner import Placement, format_placement
    from quant.checkpoint import is_checkpoint

    if not is_checkpoint(a.out):
        print(f"quantizing {a.model} with HAQ W8A8 into {a.out} (once; about 5-10 minutes on 2 cores)", file=sys.stderr)
        q = build_parser().parse_args(["quantize", a.model, "--method", "haq", "--out", a.out])
        if cmd_quantize(q) != 0:
            return 1
    import ray

    a.checkpoint = a.out
    opts, nodes = _serve_options(a), _local_nodes(a)
    print(f"edgeweave: starting a local Ray cluster of {len(nodes)} nodes ({a.node_memory})", file=sys.stderr)
    with LocalCluster(nodes):
        actor, address = start_controller(opts)
        print(format_placement(Placement.from_dict(ray.get(actor.placement_dict.remote()))), file=sys.stderr)
        print(f"edgeweave: serving on {address}; streaming a reply:", file=sys.stderr)
        sys.stdout.write(a.prompt)
        for r in stream_generate(address, a.prompt, a.max_new_tokens):
            sys.stdout.write(r.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        ray.get(actor.shutdown.remote(), timeout=30)
    print("edgeweave: cluster stopped", file=sys.stderr)
    return 0


def cmd_moe_sim(a: argparse.Namespace) -> int:
    from .experts import load_trace, token_routes
    from .moesim import SimConfig, format_sim, run_sim

    tokens = token_routes(load_trace(a.trace))
    pick = lambda ids: [t for t in tokens if t.sequence in ids]  # noqa: E731
    evaluate = pick(set(a.sequences)) if a.sequences else tokens
    warm = pick(set(a.warm_sequences)) if a.warm_sequences else []
    if set(a.sequences or ()) & set(a.warm_sequences or ()):
        raise ValueError("--warm-sequences and --sequences overlap: the report would be fitted to its answer")
    policies = tuple(p for x in a.policy for p in x.split(",") if p) or ("lru", "lfu", "stats", "belady")
    rep = run_sim(evaluate, SimConfig(slots=a.slots, policies=policies, hidden=a.hidden, inter=a.inter), warm)
    rep["trace"] = str(a.trace)
    print(format_sim(rep))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rep, indent=1))
    return 0


def _placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=int, default=1024, help="most tokens per session (prompt + generated)")
    p.add_argument("--batch", type=int, default=8, help="concurrent sessions (KV cache reserved for each)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="most prompt tokens per step and session")
    p.add_argument("--fast-slots", type=int, default=0, help="MoE: experts per layer in each fast tier (default: half)")
    p.add_argument("--remote-experts", type=int, default=0,
                   help="MoE: experts per layer placed on another node than their layer (ExpertForward RPC)")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address the inference service binds (default: loopback only)")
    p.add_argument("--port", type=int, default=50051)
    _placement_args(p)
    p.add_argument("--int8-wire", action="store_true",
                   help="send hidden states between nodes as per-token int8 (4x fewer bytes, not bit-exact)")
    p.add_argument("--unary-steps", action="store_true",
                   help="one unary Forward call per step and stage instead of one long-lived stream per stage")
    p.add_argument("--star", action="store_true",
                   help="the front end calls each stage in turn (2 messages per stage and step) instead of the stages "
                        "passing each step on to the next, the last one answering (N + 1 messages; docs/runtime.md)")
    p.add_argument("--pipeline-depth", type=int, default=0,
                   help="relayed steps in flight at once, each for a different group of the concurrent sessions, so "
                        "that the stages compute at the same time (default 0: one per stage, but no more than this machine's "
                        "cores for the stages on it; 1: one step for all)")
    p.add_argument("--pool", default="",
                   help="serve only on the Ray nodes labelled edgeweave-pool=POOL (ray start --labels), so that several "
                        "services share one cluster; default: every node")
    p.add_argument("--no-keep-awake", action="store_true",
                   help="let the nodes' cores halt between steps (default: while steps arrive, each worker keeps its "
                        "node's cores awake, which makes a pipeline faster and burns more power; docs/runtime.md)")
    p.add_argument("--redis-url", default=None,
                   help="MoE statistics go here (redis:// or rediss://, password in the URL); default: "
                        "$EDGEWEAVE_REDIS_URL, else a private Redis server started and stopped by edgeweave")
    p.add_argument("--no-prefetch", action="store_true", help="MoE: do not move up the experts predicted next")


def _add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="post-training quantization to an int8 checkpoint")
    q.add_argument("model", help="smollm2-135m, a Hugging Face model directory, or a .gguf file")
    q.add_argument("--method", choices=METHODS, default="haq",
                   help="haq: smoothing + Hessian-aware rounding; rtn: round to nearest; tender: power-of-two "
                        "channel groups for activations (--groups), RTN weights; mobilequant: transforms, weight clips "
                        "and static activation ranges learned end to end (integer-only, static scales); luc: per-layer bits "
                        "and sparsity chosen by measured sensitivity under a budget (--target-bytes, --target-ratio "
                        "or --avg-sparsity)")
    q.add_argument("--w-bits", type=int, default=8, help="8, or 4 (packed two per byte; rtn, haq and mobilequant)")
    q.add_argument("--w-group", type=int, default=None,
                   help="W4: input columns per weight scale (128 = group-128); 0: one scale per output channel "
                        "(default 0; 128 for luc)")
    q.add_argument("--w-asym", action="store_true",
                   help="W4: a zero point per weight-scale group (16 levels over [min, max] instead of 15 over "
                        "[-max, max]; one more byte per group); rtn, haq, luc")
    q.add_argument("--rotate-down", action=argparse.BooleanOptionalAction, default=None,
                   help="let each layer rotate the MLP down-projection's input by a block Hadamard at run time where "
                        "that beats smoothing it (spreads the few massive activations there over many channels); "
                        "rtn, haq; default: on for haq, off otherwise")
    q.add_argument("--rotate-all", action="store_true",
                   help="let every linear group's input (q/k/v, o, gate/up, down) be rotated the same way, each "
                        "group choosing by its output error; mostly for 4-bit weights; rtn, haq")
    q.add_argument("--rotate-residual", action="store_true",
                   help="first rotate the residual stream by a random orthogonal matrix folded into the weights (norms "
                        "folded into the linears, embeddings untied; the float model is unchanged), so no channel "
                        "carries outliers; mostly for 4-bit weights; rtn, haq, luc; llama, mistral, mixtral")
    q.add_argument("--refit-scales", type=int, default=0, metavar="ROUNDS",
                   help="after GPTQ's rounding, refit each weight row's scales by least squares to its integer codes, "
                        "and round again to them, this many times (mostly for 4-bit weights; default 0); haq, luc")
    q.add_argument("--a-bits", type=int, default=8)
    q.add_argument("--act-scheme", choices=("token", "tensor"), default="token",
                   help="token: per-token dynamic activation scales; tensor: static per-tensor scales "
                        "(tender and mobilequant set their own)")
    q.add_argument("--groups", type=int, default=4, help="tender: channel groups, scales a power of two apart")
    _quantize_method_args(q)
    q.add_argument("--calib", default=None, help="calibration text (.txt or .jsonl); default: the C4 sample")
    q.add_argument("--calib-samples", type=int, default=64)
    q.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence")
    q.add_argument("--out", required=True, help="output checkpoint directory (written to a temporary directory "
                                                "beside it and renamed when complete)")
    q.add_argument("--whole-model-limit", type=_byte_count, default=_default_whole_limit(),
                   help="float32 bytes a whole-model method (mobilequant, --kd-steps, --rotate-residual, luc's "
                        "search) may load; layer-wise methods stream and need about one layer (default: a third "
                        "of this machine's memory)")
    q.set_defaults(fn=cmd_quantize)


def _default_whole_limit() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 3


def _quantize_method_args(q: argparse.ArgumentParser) -> None:
    """The options of one method each: distillation, MobileQuant's learning rates, LUC's budget."""
    qd = QuantConfig()
    q.add_argument("--kd-steps", type=int, default=0, metavar="STEPS",
                   help="after quantizing, distill every quantized linear's weight scales and the norm weights end to "
                        "end against the float model for this many steps, one calibration window each (mostly for "
                        "4-bit weights; about 8 s a step for SmolLM2 on 2 cores; default 0: off); rtn, haq, luc")
    q.add_argument("--kd-lr", type=float, default=qd.kd_lr, help="--kd-steps: Adam learning rate of the scales (norms: a tenth)")
    q.add_argument("--kd-data", choices=("calib", "mixed"), default=qd.kd_data,
                   help="--kd-steps: train on the calibration windows, or on them alternating with windows sampled "
                        "from the float model (mixed: text of no one domain)")
    q.add_argument("--epochs", type=int, default=qd.mq_epochs, help="mobilequant: passes over the calibration windows")
    q.add_argument("--lr-transform", type=float, default=qd.mq_lr_transform, help="mobilequant: transform scales")
    q.add_argument("--lr-clip", type=float, default=qd.mq_lr_clip, help="mobilequant: weight clipping factors")
    q.add_argument("--lr-range", type=float, default=qd.mq_lr_range,
                   help="mobilequant: activation ranges (log-scale and offset, in initial quantization steps)")
    q.add_argument("--target-bytes", type=_byte_count, default=0,
                   help="luc: the checkpoint's tensor bytes (e.g. 70MB); per-layer bits and sparsity are chosen to fit")
    q.add_argument("--target-ratio", type=float, default=0.0,
                   help="luc: the decoder layers' weight bytes as a fraction of uniform W8 (e.g. 0.5)")
    q.add_argument("--avg-sparsity", type=float, default=0.0,
                   help="luc: mean fraction of decoder weights pruned (bits stay at --w-bits)")
    q.add_argument("--luc-options", default=",".join(f"{b}:{sp:g}" if sp else str(b) for b, sp in qd.luc_options),
                   help="luc: per-layer choices, BITS, BITS:SPARSITY or BITS:SPARSITY:GROUP (a W4 option's own "
                        "weight-scale group, 0: per channel; default --w-group), comma-separated")


def _add_model_commands(sub) -> None:
    """eval, tune and generate: one process, a model or a checkpoint."""
    e = sub.add_parser("eval", help="perplexity of a model or checkpoint (METHODS.md section 6)")
    e.add_argument("model")
    e.add_argument("--text", default=None, help="default: ../shared/data/wikitext2/test.txt")
    e.add_argument("--ctx", type=int, default=2048)
    e.add_argument("--windows", type=int, default=None, help="first N windows (default: all)")
    e.add_argument("--json", default=None, help="write {ppl, windows, ctx, tokens, ...} here")
    e.add_argument("--vote-exits", default=None,
                   help="voting: average the predictions after these layers, e.g. 28,30 (30 = the model's output); off by default")
    e.set_defaults(fn=cmd_eval)

    t = sub.add_parser("tune", help="adaptive layer tuning of a quantized checkpoint on your text (a window of layers at a time)")
    t.add_argument("checkpoint")
    t.add_argument("--text", required=True, help="the text to adapt to (.txt or .jsonl)")
    t.add_argument("--out", required=True, help="where the tuned checkpoint goes")
    t.add_argument("--window", type=int, default=2, help="layers tuned together (back-propagation depth)")
    t.add_argument("--steps", type=int, default=16, help="optimizer steps per window")
    t.add_argument("--batch", type=int, default=2, help="text windows per step (at most 4)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--samples", type=int, default=32, help="training windows drawn from the text")
    t.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    t.add_argument("--held-out", type=int, default=4, help="windows from the text's start scoring the loss before/after")
    t.set_defaults(fn=cmd_tune)

    g = sub.add_parser("generate", help="stream text from a model, a checkpoint, or a server (--server)")
    g.add_argument("model", nargs="?", help="model or checkpoint directory (with --server: the prompt)")
    g.add_argument("prompt", nargs="?")
    g.add_argument("--server", default=None, help="HOST:PORT of an edgeweave inference service")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable; --server only)")
    g.add_argument("--timeout", type=float, default=300.0, help="deadline of the whole stream in seconds (--server)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)


def _add_cluster_commands(sub) -> None:
    """plan, serve, up, demo and moe-sim: placement and serving on Ray nodes."""
    pl = sub.add_parser("plan", help="print the placement of a checkpoint on nodes, starting nothing")
    pl.add_argument("model", help="quantized checkpoint directory")
    pl.add_argument("--nodes", required=True,
                    help='JSON list of nodes: [{"node_id": "a", "tier": "cpu", "budget_bytes": "300MB", "int8_gops": 4.0}]')
    _placement_args(pl)
    pl.add_argument("--hop-ms", type=float, default=1.0, help="estimated cost of one more stage per token")
    pl.add_argument("--json", default=None, help="also write the placement here")
    pl.set_defaults(fn=cmd_plan)

    sv = sub.add_parser("serve", help="serve a checkpoint on an existing Ray cluster")
    sv.add_argument("checkpoint")
    sv.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    _serve_args(sv)
    sv.set_defaults(fn=cmd_serve)

    up = sub.add_parser("up", help="start a local Ray cluster of N nodes and serve a checkpoint on it")
    up.add_argument("checkpoint")
    up.add_argument("--local", action="store_true", help="nodes are processes on this machine")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--node-memory", default=None, help="budget of each node, e.g. 300MB,200MB,120MB (default 1GB each)")
    _serve_args(up)
    up.set_defaults(fn=cmd_up)

    d = sub.add_parser("demo", help="quantize the default model if needed, serve it on a local 3-node cluster, "
                                    "stream a reply, shut down")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--out", default="checkpoints/smollm2-135m-haq-w8a8")
    d.add_argument("--prompt", default="The three most useful things to know about edge computing are")
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.add_argument("--nodes", type=int, default=3)
    d.add_argument("--node-memory", default="300MB,200MB,120MB")
    _serve_args(d)
    d.set_defaults(fn=cmd_demo, port=0)

    ms = sub.add_parser("moe-sim", help="replay an MoE routing trace through the fast-tier policies")
    ms.add_argument("--trace", required=True, help="JSONL: layer, token_idx, experts (and problem_id) per line")
    ms.add_argument("--slots", type=int, default=4, help="experts per layer in the fast tier")
    ms.add_argument("--policy", action="append", default=[], help="lru,lfu,stats,belady (default: all)")
    ms.add_argument("--sequences", type=int, nargs="*", default=None, help="problem ids to report (default: all)")
    ms.add_argument("--warm-sequences", type=int, nargs="*", default=None,
                    help="problem ids whose statistics the stats policy has before the run (earlier traffic)")
    ms.add_argument("--hidden", type=int, default=4096, help="expert input size, for bytes (default: Mixtral-8x7B)")
    ms.add_argument("--inter", type=int, default=14336, help="expert intermediate size (default: Mixtral-8x7B)")
    ms.add_argument("--json", default=None, help="also write the report here")
    ms.set_defaults(fn=cmd_moe_sim)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeweave", description="Quantize, place and serve LLMs on edge clusters.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_model_commands(sub)
    _add_cluster_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as e:  # ModelNotFound, CheckpointError, PlacementError, bad options
        print(f"edgeweave {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
