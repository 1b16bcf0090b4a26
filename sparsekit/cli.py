"""The ``sparsekit`` command.

    sparsekit info               versions, device, backends per op, CUDA extension status
    sparsekit bench [ARGS...]    microbenchmarks (see ``sparsekit bench --help``)
    sparsekit compress --workload minilm|digits --scheme 2:4 --method sparsegpt --out DIR
                                 compress a bundled workload; writes DIR/model.safetensors, DIR/report.json
"""
from __future__ import annotations

import argparse
import platform
import sys

# ops whose backends `info` lists (those not registered in this build are skipped)
KNOWN_OPS = ("sparse24_linear", "sparse24_grad_input", "sparse24_grad_values", "sparse24_int8_linear",
             "block_sparse_linear", "int4_linear", "int8_linear", "w4a8_linear", "per_token_quant",
             "sparse24_int4_linear", "draft_attention", "triple_gate_conv2d")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsekit",
                                description="sparsekit: kernels for sparse and low-bit neural networks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="print versions, the CUDA device, backends per op and the CUDA extension status")
    sub.add_parser("bench", help="run the microbenchmarks (CPU correctness sweep without CUDA); "
                                 "`sparsekit bench --help` for its options", add_help=False)
    c = sub.add_parser("compress", help="compress a bundled workload (minilm or digits) and report its quality")
    c.add_argument("--workload", choices=("minilm", "digits"), required=True)
    c.add_argument("--scheme", choices=("2:4", "block", "int4", "2:4+int4"), default="2:4")
    c.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt", "rtn", "gptq", "awq"), default=None,
                   help="default: sparsegpt for 2:4, magnitude for block, gptq for int4")
    c.add_argument("--out", default=None, help="directory for model.safetensors and report.json")
    c.add_argument("--sparsity", type=float, default=0.5, help="block scheme: fraction of blocks dropped")
    c.add_argument("--group-size", type=int, default=None, help="int4 group size (default: largest fitting)")
    c.add_argument("--progress", action="store_true", help="show calibration progress bars")
    return p


def compress_cmd(args, out=None) -> int:
    out = out or sys.stdout
    import json
    import os

    from sparsekit.compress import compress, save_compressed
    from sparsekit.workloads import load_workload

    wl = load_workload(args.workload)
    try:
        opts = {"sparsity": args.sparsity} if args.scheme == "block" else {}
        model, report = compress(wl.model, wl.calib, scheme=args.scheme, method=args.method,
                                 quality_fn=wl.quality_fn, dense_quality=wl.dense_quality,
                                 group_size=args.group_size, progress=args.progress, **opts)
    except (NotImplementedError, ValueError) as e:
        print(f"sparsekit compress: {e}", file=sys.stderr)
        return 2
    report = {"workload": wl.name, "metric": wl.metric, **report}
    if args.out:
        wpath, rpath = save_compressed(model, os.path.join(args.out, "model.safetensors"), report)
        report["files"] = [wpath, rpath]
    shown = {k: v for k, v in report.items() if k != "layers"}
    print(json.dumps(shown, indent=2, default=str), file=out)
    return 0


def _cuda_extension_status() -> str:
    try:
        from sparsekit.ops import _cuda
    except ImportError as e:
        return f"not available (sparsekit.ops._cuda missing: {e})"
    try:
        if _cuda.available():
            return "built (sparsekit._C loaded)"
        why = getattr(_cuda, "unavailable_reason", None)
        return "not built" + (f": {why()}" if callable(why) else "")
    except Exception as e:
        return f"not available ({type(e).__name__}: {e})"


def info(out=None) -> int:
    out = out or sys.stdout
    import sparsekit

    def pr(k, v):
        print(f"{k:<18} {v}", file=out)

    pr("sparsekit", getattr(sparsekit, "__version__", "unknown"))
    pr("python", platform.python_version())
    try:
        import torch
        pr("torch", f"{torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build'})")
    except ImportError as e:
        pr("torch", f"not importable: {e}")
        return 1
    try:
        import triton
        pr("triton", triton.__version__)
    except ImportError:
        pr("triton", "not installed")
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        pr("cuda device", f"{torch.cuda.get_device_name(idx)} (sm_{props.major}{props.minor}, "
                          f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)")
        device = "cuda"
    else:
        pr("cuda device", "none")
        device = "cpu"
    pr("cuda extension", _cuda_extension_status())
    try:
        import torch.backends.cusparselt as csl
        pr("cusparselt", f"available (version {csl.version()})" if csl.is_available() else "not available")
    except Exception:
        pr("cusparselt", "unknown")
    try:
        from sparsekit import ops
        available = ops.available_backends
    except Exception as e:  # a broken install should still print what it can
        pr("backends", f"unavailable: {type(e).__name__}: {e}")
        return 1
    print(f"backends on {device}:", file=out)
    for op in KNOWN_OPS:
        try:
            bks = available(op, device)
        except ValueError:
            continue  # op not in this build
        except Exception as e:
            bks = [f"error: {type(e).__name__}: {e}"]
        chosen = ""
        try:
            from sparsekit.ops import dispatch
            chosen = dispatch.resolve(op, device, None, 1)
        except Exception:
            pass
        print(f"  {op:<24} {', '.join(bks) or '-'}" + (f"   (auto at M=1: {chosen})" if chosen else ""), file=out)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `bench` hands every remaining argument to the benchmark runner untouched
    if argv and argv[0] == "bench":
        from sparsekit.bench.run import main as bench_main
        return int(bench_main(argv[1:]) or 0)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "compress":
        return compress_cmd(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
