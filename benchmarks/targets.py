"""Issue 5's performance targets, checked against the JSON that bench_chunk_kda.py writes.

Why: the benchmark prints times and FLA/ours ratios per configuration, but whether each of issue
5's targets is met, and by how much one is missed, was worked out by hand. This script does that
arithmetic from the benchmark's --json output, so the answer is reproducible and the same every
time:

  python benchmarks/bench_chunk_kda.py --preset targets --copy-rate --first-call-impls ours --json bench.json
  python benchmarks/targets.py bench.json [more.json ...] [--out targets.md] [--png targets.png]

It prints a markdown table (target, required, kda_ext, FLA, the measure the target is stated in,
what is still needed, met?) and a line naming the card.

Rules it keeps:
- A ratio is FLA time / our time (> 1: we are faster), and both times come from one row, that is
  one run in one process on one card, never from two files.
- Files from different devices are refused (the error names both).
- Where several rows hold the same (shape, mode) (several files), the last one in the order given
  that has the needed values is used; with none, the last one's error is shown, else the target
  says "not measured in these runs".
- The HBM-floor target needs the card's copy rate, measured in a run on the same device
  (bench_chunk_kda.py --copy-rate, the JSON's "copy_gbps"); without one it is "not measured".

Pure Python and json: it runs without torch or a GPU (tests/test_benchmarks.py runs it on a CPU).
"""
import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

MAIN_SHAPE = "2x8192x32x128"
MAIN_DIMS = (2, 8192, 32, 128)  # (B, T, H, K = V) of MAIN_SHAPE, as in bench_chunk_kda.SHAPES
NOT_MEASURED = "not measured in these runs"


@dataclass(frozen=True)
class Target:
    number: int
    label: str
    kind: str  # "ratio", "first_call", "memory" or "floor": which evaluate_* function applies
    required: float
    shape: Optional[str] = None
    mode: Optional[str] = None
    metric: Optional[str] = None  # the benchmark's key: "fwd", "fwdbwd" or "peak_mib"


TARGETS = [
    Target(1, "forward, kimi, 2x8192x32x128", "ratio", 3.0, MAIN_SHAPE, "kimi", "fwd"),
    Target(2, "forward+backward, kimi, 2x8192x32x128", "ratio", 2.5, MAIN_SHAPE, "kimi", "fwdbwd"),
    Target(3, "forward+backward, softplus, 2x8192x32x128", "ratio", 2.0, MAIN_SHAPE, "softplus", "fwdbwd"),
    Target(4, "forward, kimi, 1x1024x16x128", "ratio", 5.0, "1x1024x16x128", "kimi", "fwd"),
    Target(5, "forward+backward, kimi, 1x32768x16x128", "ratio", 2.5, "1x32768x16x128", "kimi", "fwdbwd"),
    Target(6, "forward+backward, kimi, varlen16x32768x16x128", "ratio", 2.5,
           "varlen16x32768x16x128", "kimi", "fwdbwd"),
    Target(7, "first forward+backward in a fresh process (worst row)", "first_call", 1.0),
    Target(8, "peak extra memory of forward+backward, kimi, 2x8192x32x128", "memory", 0.6,
           MAIN_SHAPE, "kimi", "peak_mib"),
    Target(9, "forward vs the HBM floor, kimi, 2x8192x32x128", "floor", 2.0, MAIN_SHAPE, "kimi", "fwd"),
]


@dataclass
class Result:
    """One table row's measured cells (the target and required cells come from the Target)."""
    ours: str = "-"
    fla: str = "-"
    measure: str = "-"
    still_needed: str = NOT_MEASURED
    met: str = "-"  # "yes", "no", "error", or "-" when not measured


class DeviceMismatch(ValueError):
    pass


# ---- the HBM floor ---------------------------------------------------------------------------

def forward_floor_bytes(B, T, H, K, n_seqs=None, chunk=64, elt=2, state_elt=4):
    """Bytes the forward must move at (B, T, H, K = V): the numerator of the HBM floor.

        reads   q, k, v, g             4 * B*T*H*K * elt
                beta                   B*T*H * elt
                initial state          N*H*K*K * state_elt    (fp32; N = n_seqs, default B)
        writes  o                      B*T*H*K * elt
                final state            N*H*K*K * state_elt
                Aqk, Akk (saved for    2 * B*T*H*chunk * elt
                the backward)

    elt = 2 for bf16. At (2, 8192, 32, 128) this is 814,743,552 bytes = 777 MiB (the same sum as
    benchmarks/profile_kernels.floors; the items docs/perf-notes.md lists add up to this too,
    though its total reads "~773 MiB"); at 3.0 TB/s that is 0.27 ms.
    """
    n = B if n_seqs is None else n_seqs
    tokens = B * T * H
    inputs = 4 * tokens * K * elt + tokens * elt
    states = 2 * n * H * K * K * state_elt
    output = tokens * K * elt
    saved = 2 * tokens * chunk * elt
    return inputs + states + output + saved


def floor_ms(nbytes, copy_gbps):
    """Milliseconds to move nbytes at the copy rate copy_gbps (GB/s, 1e9 bytes/s, read + write)."""
    return nbytes / (copy_gbps * 1e9) * 1e3


# ---- reading and merging runs ----------------------------------------------------------------

def load_runs(paths):
    """[(path, parsed JSON)] for each file, in the order given."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append((path, json.load(f)))
    return runs


def check_one_device(runs):
    """The device all runs were measured on; DeviceMismatch if two differ."""
    first_path, first = runs[0]
    for path, run in runs:
        if "device" not in run:
            raise ValueError(f"{path} has no 'device' field: not a bench_chunk_kda.py --json file?")
        if run["device"] != first["device"]:
            raise DeviceMismatch(
                f"refusing to merge runs from different devices: {first_path} was measured on "
                f"{first['device']!r}, {path} on {run['device']!r}")
    return first["device"]


def merged_rows(runs):
    """All rows of all runs, in file order (later files last)."""
    return [row for _, run in runs for row in run.get("rows", [])]


def chart_rows(runs):
    """One row per (shape, mode), in first-seen order, each the last one given for it: the rows
    a chart of several merged runs shows (a later run replaces an earlier one, as in pick_row)."""
    last = {}
    for row in merged_rows(runs):
        last[(row.get("shape"), row.get("mode"))] = row
    return list(last.values())


def best_copy_rate(runs):
    """(highest copy_gbps over the runs, how many runs had one); (None, 0) without any.
    The highest rate gives the lowest, so the strictest, floor."""
    rates = [run["copy_gbps"] for _, run in runs if run.get("copy_gbps")]
    return (max(rates), len(rates)) if rates else (None, 0)


# ---- looking values up -----------------------------------------------------------------------

def side(row, impl, metric):
    """(value, error) of one implementation's metric in a row; (None, None) where not measured."""
    res = row.get(impl) if row else None
    if not isinstance(res, dict):
        return None, None
    if "error" in res:
        return None, str(res["error"])
    return res.get(metric), None


def pick_row(rows, shape, mode, needs):
    """The last row at (shape, mode) for which needs(row) holds; else the last row at (shape,
    mode) (so that its error can be shown); else None."""
    matching = [r for r in rows if r.get("shape") == shape and r.get("mode") == mode]
    complete = [r for r in matching if needs(r)]
    if complete:
        return complete[-1]
    return matching[-1] if matching else None


def has(impls, metric):
    """A needs() for pick_row: every impl in impls has a value for metric."""
    return lambda row: all(side(row, impl, metric)[0] is not None for impl in impls)


# ---- formatting ------------------------------------------------------------------------------

def cell(text):
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt(value, metric):
    if value is None:
        return "-"
    if metric == "peak_mib":
        return f"{value:.0f} MiB"
    if metric == "first_call_s":
        return f"{value:.2f} s"
    return f"{value:.3f} ms"


def side_cell(value, error, metric):
    return f"error: {error}" if error else fmt(value, metric)


def two_sided(row, t):
    """(Result with the kda_ext and FLA cells filled, ours, fla) for target t's metric in row;
    its still_needed and met say why when a value is missing or errored."""
    metric = t.metric
    a, a_err = side(row, "ours", metric)
    b, b_err = side(row, "fla", metric)
    res = Result(ours=side_cell(a, a_err, metric), fla=side_cell(b, b_err, metric))
    if row is None:
        res.still_needed = f"{NOT_MEASURED} (no {t.shape} {t.mode} row)"
    elif a_err or b_err:
        res.still_needed = " and ".join(n for n, e in (("kda_ext", a_err), ("FLA", b_err)) if e) + " errored"
        res.met = "error"
    elif a is None or b is None:
        missing = " and ".join(n for n, v in (("kda_ext", a), ("FLA", b)) if v is None)
        res.still_needed = f"{NOT_MEASURED} (no {missing} {metric})"
    return res, a, b


# ---- one function per kind of target ---------------------------------------------------------

def evaluate_ratio(t, rows, runs):
    """FLA time / our time >= t.required."""
    row = pick_row(rows, t.shape, t.mode, has(("ours", "fla"), t.metric))
    res, a, b = two_sided(row, t)
    if a is None or b is None:
        return res
    ratio = b / a
    res.measure = f"{ratio:.2f}x"
    ok = ratio >= t.required
    res.met = "yes" if ok else "no"
    res.still_needed = "met" if ok else f"{t.required / ratio:.2f}x faster"
    return res


def evaluate_memory(t, rows, runs):
    """Our peak extra memory <= t.required x FLA's."""
    row = pick_row(rows, t.shape, t.mode, has(("ours", "fla"), t.metric))
    res, a, b = two_sided(row, t)
    if a is None or b is None:
        return res
    ratio = a / b
    res.measure = f"ours/FLA = {ratio:.2f}x"
    ok = ratio <= t.required
    res.met = "yes" if ok else "no"
    res.still_needed = "met" if ok else f"{a - t.required * b:.0f} MiB less ({ratio / t.required:.2f}x smaller)"
    return res


def worst_first_call(rows, impl):
    """(seconds, "shape/mode") of the slowest first call of impl over the rows that have one;
    a failed call (NaN) counts as the worst; None without any."""
    calls = []
    for r in rows:
        v, _ = side(r, impl, "first_call_s")
        if v is not None:
            calls.append((math.inf if math.isnan(v) else v, math.isnan(v), f"{r['shape']}/{r['mode']}"))
    if not calls:
        return None
    # failed calls first, then the longest
    v, failed, where = max(calls, key=lambda c: (c[1], c[0]))
    return (math.nan if failed else v), where


def evaluate_first_call(t, rows, runs):
    """The slowest first forward+backward of ours in a fresh process < t.required seconds."""
    ours, fla = worst_first_call(rows, "ours"), worst_first_call(rows, "fla")
    res = Result(fla=f"{fmt(fla[0], 'first_call_s')} ({fla[1]})" if fla else "-")
    if ours is None:
        res.still_needed = f"{NOT_MEASURED} (run the benchmark with --first-call-impls ours)"
        return res
    worst, where = ours
    n = sum(1 for r in rows if side(r, "ours", "first_call_s")[0] is not None)
    res.ours = f"{fmt(worst, 'first_call_s')} ({where})"
    res.measure = f"worst of {n} row{'s' if n != 1 else ''}: {fmt(worst, 'first_call_s')}"
    if math.isnan(worst):
        res.measure, res.still_needed, res.met = f"failed at {where}", "a first call that completes", "no"
    elif math.isinf(worst):
        res.measure = f"timed out at {where}"
        res.still_needed, res.met = "a first call that finishes in time", "no"
    elif worst < t.required:
        res.still_needed, res.met = "met", "yes"
    else:
        res.still_needed = f"{worst / t.required:.2f}x faster ({worst - t.required:.2f} s over)"
        res.met = "no"
    return res


def evaluate_floor(t, rows, runs):
    """Our forward time <= t.required x the HBM floor (forward_floor_bytes / the copy rate)."""
    row = pick_row(rows, t.shape, t.mode, has(("ours",), t.metric))
    a, a_err = side(row, "ours", t.metric)
    res = Result(ours=side_cell(a, a_err, t.metric))
    rate, _ = best_copy_rate(runs)
    if a_err:
        res.still_needed, res.met = "kda_ext errored", "error"
        return res
    if a is None or rate is None:
        missing = " and ".join(m for m, v in (("kda_ext fwd", a), ("copy rate: --copy-rate", rate)) if v is None)
        res.still_needed = f"{NOT_MEASURED} (no {missing})"
        return res
    nbytes = forward_floor_bytes(*MAIN_DIMS)
    floor = floor_ms(nbytes, rate)
    ratio = a / floor
    res.measure = (f"ours/floor = {ratio:.2f}x (floor {floor:.3f} ms: "
                   f"{nbytes / 2**20:.0f} MiB at {rate:.0f} GB/s)")
    ok = ratio <= t.required
    res.met = "yes" if ok else "no"
    res.still_needed = "met" if ok else f"{ratio / t.required:.2f}x faster"
    return res


EVALUATE = {"ratio": evaluate_ratio, "memory": evaluate_memory,
            "first_call": evaluate_first_call, "floor": evaluate_floor}


def required_text(t):
    return {"ratio": f">= {t.required:g}x FLA/ours",
            "memory": f"<= {t.required:g}x FLA's",
            "first_call": f"< {t.required:g} s",
            "floor": f"<= {t.required:g}x floor"}[t.kind]


# ---- the report ------------------------------------------------------------------------------

def evaluate_all(runs):
    """[(Target, Result)] for every target, from runs already checked to share one device."""
    rows = merged_rows(runs)
    return [(t, EVALUATE[t.kind](t, rows, runs)) for t in TARGETS]


def report(runs):
    """The markdown table and the card line for runs ([(path, parsed JSON)])."""
    device = check_one_device(runs)
    lines = ["| target | required | kda_ext | FLA | FLA/ours (or the relevant measure) | still needed | met? |",
             "|---|---|---|---|---|---|---|"]
    for t, r in evaluate_all(runs):
        cells = [f"{t.number}. {t.label}", required_text(t), r.ours, r.fla, r.measure, r.still_needed, r.met]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    rate, n_rates = best_copy_rate(runs)
    card = f"Card: {device}"
    if rate is not None:
        card += f"; device copy rate {rate:.0f} GB/s (read + write)"
        if n_rates > 1:
            card += f", the highest of {n_rates} runs"
    card += "; from " + ", ".join(path for path, _ in runs)
    return "\n".join(lines) + "\n\n" + card + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Issue 5's targets from bench_chunk_kda.py --json files.")
    ap.add_argument("files", nargs="+", help="JSON files written by bench_chunk_kda.py --json")
    ap.add_argument("--out", default=None, help="also write the table here")
    ap.add_argument("--png", default=None,
                    help="also write the FLA/ours ratio chart of every (shape, mode) here (needs matplotlib)")
    args = ap.parse_args(argv)
    try:
        runs = load_runs(args.files)
        text = report(runs)
    except (OSError, ValueError) as e:  # json.JSONDecodeError and DeviceMismatch are ValueErrors
        print(f"targets.py: error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.png:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/chart.py
        from chart import write_chart

        write_chart(chart_rows(runs), args.png, f"chunk_kda vs FLA, {check_one_device(runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
