"""Summarises bench_overlap runs (bench/overlap.sh): the PROBE and LAYER
lines of every run given, grouped by rank count and single-copy mechanism,
as two markdown tables of the per-run medians: median (min-max) over the
runs. Standard library only.

    python3 bench/overlap_summary.py OUT/p*.txt
"""
import json
import statistics
import sys
from collections import defaultdict


def spread(values, digits=2):
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def overlap(run, total):
    """(T_x + T_c - T_o) / min(T_x, T_c) of one run's medians, in %."""
    x, c = run["t_x"], run["t_c"]
    return 100 * (x + c - run[total]) / min(x, c)


def read(paths):
    probes, layers = defaultdict(list), defaultdict(list)
    for path in paths:
        with open(path) as file:
            for line in file:
                if line.startswith("PROBE "):
                    run = json.loads(line[6:])
                    probes[(run["ranks"], run["single_copy"], run["rank"])].append(run)
                elif line.startswith("LAYER "):
                    run = json.loads(line[6:])
                    key = (run["ranks"], run["single_copy"], run["variant"], run["chunks"])
                    layers[key].append(run)
    return probes, layers


def probe_table(probes):
    print("| P | single copy | rank | runs | T_x | T_c | T_o | wait | T_o - T_c | overlap "
          "| T_o+test | wait | in tests | T_o+test - T_c | overlap+test |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: "
          "| ---: | ---: | ---: | ---: | ---: |")
    for (ranks, copy, rank), runs in sorted(probes.items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][2] < 0, kv[0][2])):
        cells = [spread([r[k] for r in runs]) for k in ("t_x", "t_c", "t_o", "wait_o",
                                                        "exposed_o")]
        cells.append(spread([overlap(r, "t_o") for r in runs], 0) + " %")
        cells += [spread([r[k] for r in runs]) for k in ("t_ot", "wait_ot", "in_tests_ot",
                                                         "exposed_ot")]
        cells.append(spread([overlap(r, "t_ot") for r in runs], 0) + " %")
        label = "slowest" if rank < 0 else str(rank)
        print(f"| {ranks} | {copy} | {label} | {len(runs)} | " + " | ".join(cells) + " |")


def layer_table(layers):
    print("| P | single copy | variant | chunks | runs | layer ms | change vs blocking, ms "
          "| change, % of the layer |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for (ranks, copy, variant, chunks), runs in layers.items():
        cells = [spread([r["median_ms"] for r in runs]), spread([r["change_ms"] for r in runs]),
                 spread([r["change_pct"] for r in runs], 1)]
        print(f"| {ranks} | {copy} | {variant} | {chunks} | {len(runs)} | "
              + " | ".join(cells) + " |")


def main():
    probes, layers = read(sys.argv[1:])
    if not probes and not layers:
        sys.exit("overlap_summary.py: no PROBE or LAYER lines in the files given")
    probe_table(probes)
    print()
    layer_table(layers)


if __name__ == "__main__":
    main()
