"""Markdown tables for benches/percore.sh: one per shape, a row per target.

Arguments: one "shape variant rps cpu_pct p50_us p99_us hwm_kib" string per run, and one
"idle variant rss_before_kib rss_idle_kib still_open" string per idle test. CPU µs per request is
the proxy's CPU share over the 64-connection run divided by the requests it served; each figure is
the median over the rounds, with the min–max spread of the CPU cost. The ratios are paired: the
median, over the rounds, of the ratio between two targets measured a few seconds apart in the same
round, which cancels most of a shared machine's drift.
"""

import statistics
import sys


def main(args):
    runs, idle = {}, []
    for a in args:
        if a.startswith("idle "):
            idle.append(a.split()[1:])
            continue
        shape, name, rps, cpu, p50, p99, hwm = a.split()
        rps, cpu = float(rps), float(cpu)
        us = cpu / 100.0 / rps * 1e6 if rps and cpu else None
        runs.setdefault(shape, {}).setdefault(name, []).append(
            (us, rps, int(p50), int(p99), int(hwm)))
    for shape, targets in runs.items():
        med = statistics.median

        def cpu_of(name):
            us = [r[0] for r in targets.get(name, []) if r[0] is not None]
            return med(us) if us else None

        def lat_of(name, i):
            return med([r[i] for r in targets[name]]) if name in targets else None

        def paired(name, ref):
            pairs = [a[0] / b[0] for a, b in zip(targets.get(name, []), targets.get(ref, []))
                     if a[0] is not None and b[0] is not None]
            return med(pairs) if pairs else None

        d50, d99 = lat_of("direct", 2), lat_of("direct", 3)
        print()
        print(f"**{shape}**")
        print()
        print("| target | CPU µs per request (median; min–max) | ÷ bare Pingora (paired) "
              "| ÷ nginx (paired) | req/s per core | ÷ nginx (paired) | added p50 at 1 conn (µs) | added p99 at 1 conn (µs) "
              "| peak RSS, 64 conns (MiB) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, rs in targets.items():
            m = cpu_of(name)
            p50, p99 = lat_of(name, 2), lat_of(name, 3)
            added = (f"{p50 - d50:.0f} | {p99 - d99:.0f}" if d50 is not None and name != "direct"
                     else f"({p50:.0f}) | ({p99:.0f})")
            if m is None:
                print(f"| {name} | — | — | — | {med([r[1] for r in rs]):,.0f} req/s | — | {added} | — |")
                continue
            us = [r[0] for r in rs if r[0] is not None]
            per_core = 1e6 / m
            to_bare, to_nginx = paired(name, "bare"), paired(name, "nginx")
            rb = f"{to_bare:.2f}×" if to_bare else "—"
            rn = f"{to_nginx:.2f}×" if to_nginx else "—"
            rc = f"{1 / to_nginx:.2f}×" if to_nginx else "—"
            hwm = max(r[4] for r in rs) / 1024.0
            print(f"| {name} | {m:.1f} ({min(us):.1f}–{max(us):.1f}) | {rb} | {rn} "
                  f"| {per_core:,.0f} | {rc} | {added} | {hwm:.1f} |")
    if idle:
        print()
        print("**idle keep-alive connections** (each served one request, then left open)")
        print()
        print("| target | connections still open | RSS before (MiB) | RSS with them (MiB) "
              "| KiB per connection |")
        print("|---|---|---|---|---|")
        for name, before, after, still in idle:
            before, after, still = int(before), int(after), int(still)
            per = (after - before) / still if still else float("nan")
            print(f"| {name} | {still:,} | {before / 1024:.1f} | {after / 1024:.1f} | {per:.1f} |")
    print()
    print("Direct rows give the mock's own req/s (wrk on the load core) and, in brackets, its "
          "p50/p99 at one connection; the proxies' latency is given as added to those.")


if __name__ == "__main__":
    main(sys.argv[1:])
