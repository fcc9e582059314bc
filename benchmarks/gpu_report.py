"""``make gpu-check``'s report: the table of its rows, and issue 18's GPU targets judged from them (no GPU needed:
tested on made-up rows)."""

from __future__ import annotations


def _rate(x: float) -> str:
    """A rate to read at a glance: thousands separated, decimals only below 10 (a CPU smoke run's images/s)."""
    return f"{x:,.0f}" if x >= 10 else f"{x:.2f}"


def row_line(r: dict, peak: float) -> str:
    """One training row as it is printed when done (``peak``: the measured bf16 matmul rate, TFLOP/s)."""
    head = f"{r['arch']:6s} {r['kind']:14s} compile={r['compile']!s:5s} ckpt={r['checkpointing']!s:5s}"
    if "images_per_s" not in r:
        return f"{head} {r.get('error') or r.get('skipped')}"
    return (f"{head} {r['images_per_s']:8.1f} img/s  MFU {100 * r['tflops'] / peak:5.1f}%  "
            f"peak {r['peak_gib']:.1f} GiB (selfflow plan: {r['plan_gib']:.1f})")


def print_table(result: dict, peak: float) -> None:
    """FM vs Self-Flow per (model, compile, checkpointing), then sampling; cases without numbers say why."""
    rows, sampling = result["train"], result["sampling"]
    print(f"{'model':6s} {'compile':7s} {'ckpt':5s} {'FM img/s':>9s} {'SF img/s':>9s} {'SF/FM time':>10s} "
          f"{'FM MFU':>7s} {'SF MFU':>7s} {'FM GiB':>7s} {'SF GiB':>7s}")
    for fm, sf in zip(rows[::2], rows[1::2], strict=True):
        if "images_per_s" not in fm or "images_per_s" not in sf:
            print(f"{fm['arch']:6s} {fm['compile']!s:7s} {fm['checkpointing']!s:5s} (not measured: "
                  f"{fm.get('error') or fm.get('skipped') or sf.get('error') or sf.get('skipped')})")
            continue
        print(f"{fm['arch']:6s} {fm['compile']!s:7s} {fm['checkpointing']!s:5s} {fm['images_per_s']:9.1f} "
              f"{sf['images_per_s']:9.1f} {fm['images_per_s'] / sf['images_per_s']:10.2f} "
              f"{100 * fm['tflops'] / peak:6.1f}% {100 * sf['tflops'] / peak:6.1f}% "
              f"{fm['peak_gib']:7.1f} {sf['peak_gib']:7.1f}")
    print("(steps timed back to back, waiting only for the host's reads of the losses and the gradient norm, as "
          "selfflow train runs them)")
    print(f"selfflow plan vs measured peak memory (GiB; batch {rows[0]['batch'] if rows else '?'}):")
    for r in rows:
        if "peak_gib" in r:
            print(f"  {r['arch']:6s} {r['kind']:14s} compile={r['compile']!s:5s} ckpt={r['checkpointing']!s:5s} "
                  f"plan {r['plan_gib']:6.1f}  measured {r['peak_gib']:6.1f}  "
                  f"({100 * (r['plan_gib'] / r['peak_gib'] - 1):+.0f} %)")
    if any(r["compile"] and "peak_gib" in r for r in rows):
        print("  (the plan counts the eager step's activations: compiled blocks fuse some away, so for them it is "
              "an upper bound)")
    if "images_per_s" in sampling:
        print(f"SiT-XL/2 SDE {sampling['model_calls']} steps, CFG 1.5 on [0, 0.7]: {sampling['images_per_s']:.2f} img/s "
              f"({100 * sampling['ratio_to_bound']:.0f}% of the bound of its model calls alone, "
              f"{sampling['guided_calls']} of {sampling['model_calls']} guided at twice the batch)")
    else:
        print(f"SiT-XL/2 SDE sampling not measured: {sampling.get('error') or sampling.get('skipped')}")
    alternating = result.get("alternating") or {}
    if "ratio" in alternating:
        low, high = alternating["round_ratios"]
        print(f"SiT-XL/2 compiled, flow matching and Self-Flow in {alternating['rounds']} alternating rounds "
              f"(B={alternating['batch']}): {alternating['flow_matching_s'] * 1e3:.1f} vs "
              f"{alternating['self_flow_s'] * 1e3:.1f} ms a step = {alternating['ratio']:.3f}x "
              f"(rounds {low:.3f}-{high:.3f})")
    elif alternating:
        print(f"SiT-XL/2 alternating rounds not measured: {alternating.get('error') or alternating.get('skipped')}")
    pair = result.get("xl2_vs_naive") or {}
    if "ratio" in pair:
        print(f"SiT-XL/2 Self-Flow step, ours vs the naive official-class step (B={pair['batch']}, bf16): "
              f"{pair['ours_s'] * 1e3:.0f} vs {pair['naive_s'] * 1e3:.0f} ms = {pair['ratio']:.2f}x "
              f"(FLOP bound {pair['flop_bound']:.2f}x)")
    elif pair:
        print(f"SiT-XL/2 ours vs naive not measured: {pair.get('error') or pair.get('skipped')}")
    loader = result.get("loader") or {}
    if "per_worker" in loader:
        rates = ", ".join(f"{w} worker(s) {_rate(r)}" for w, r in loader["samples_per_s"].items())
        need = ("" if loader["workers_needed"] is None else
                f"; the fastest SiT-XL/2 step consumes {_rate(loader['step_images_per_s'])} images/s: "
                f"{loader['workers_needed']} worker(s) per GPU keep it fed")
        print(f"data loader (ImageNet latent shards, flip, {'pinned → GPU' if loader['pinned'] else 'no pinning'}), "
              f"samples/s: {rates}{need}")
    elif loader:
        print(f"data loader not measured: {loader.get('error') or loader.get('skipped')}")


def judge(result: dict, peak: float) -> list[dict]:
    """Issue 18's GPU targets from a result: SiT-XL/2 flow-matching MFU ≥ 40 % of the measured bf16 matmul and
    Self-Flow step ≤ 1.25× the flow-matching step (in the faster of eager / compiled, without activation
    checkpointing, which recomputes by design; the ratio from the compiled pair timed in alternating rounds when
    it was measured), sampling within 10 % of its model-call bound. ``ok`` is None when the case was not
    measured."""
    pairs = {}
    for r in result["train"]:
        if r["arch"] == "dit" and not r["checkpointing"] and "images_per_s" in r:
            pairs.setdefault(r["compile"], {})[r["kind"]] = r
    pairs = {mode: p for mode, p in pairs.items() if len(p) == 2}
    best = max(pairs, key=lambda m: pairs[m]["flow_matching"]["images_per_s"], default=None)
    mode = "" if best is None else f" ({'compiled' if best else 'eager'})"
    mfu = ratio = None
    if best is not None:
        fm, sf = pairs[best]["flow_matching"], pairs[best]["self_flow"]
        mfu, ratio = fm["tflops"] / peak, fm["images_per_s"] / sf["images_per_s"]
    alternating = result.get("alternating") or {}
    ratio_mode = mode
    if "ratio" in alternating:
        ratio, ratio_mode = alternating["ratio"], f" (compiled, {alternating['rounds']} alternating rounds)"
    sampling = result.get("sampling") or {}
    bound = sampling.get("ratio_to_bound")
    return [
        {"target": f"SiT-XL/2 flow-matching step MFU{mode}", "value": mfu, "goal": ">= 40 %",
         "ok": None if mfu is None else mfu >= 0.40},
        {"target": f"SiT-XL/2 Self-Flow step time / flow-matching step time{ratio_mode}", "value": ratio,
         "goal": "<= 1.25", "ok": None if ratio is None else ratio <= 1.25},
        {"target": "SiT-XL/2 SDE sampling / its model-call bound", "value": bound, "goal": ">= 0.90",
         "ok": None if bound is None else bound >= 0.90},
    ]


def print_targets(targets: list[dict]) -> None:
    for t in targets:
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        verdict = {True: "met", False: "NOT MET", None: "-"}[t["ok"]]
        print(f"  {t['target']}: {value} (target {t['goal']}): {verdict}")
