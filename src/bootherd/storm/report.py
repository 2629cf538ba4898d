"""What a storm did: figures, the end-of-run table, JSON and a PNG plot."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from .node import PHASES


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(p / 100 * len(v) + 0.5)) - 1))
    return v[k]


def _dist(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99), "max": max(values) if values else None,
            "count": len(values)}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    nodes = raw["nodes"]
    up = [n for n in nodes if n["outcome"] == "up"]
    failed = [n for n in nodes if n["outcome"] != "up"]
    boot = [n["boot_time"] for n in up]
    phases = {p: _dist([n["phase_time"][p] for n in nodes if p in n["phase_time"]])
              for p in PHASES}
    retries: Counter = Counter()
    by_protocol: Counter = Counter()
    requests: Counter = Counter()
    for n in nodes:
        retries.update(n["retries"])
        by_protocol.update(n.get("retries_by_protocol", {}))
        requests.update(n["requests"])
    lat: dict[str, list[float]] = {}
    for n in nodes:
        for k, v in n.get("latency", {}).items():
            lat.setdefault(k, []).extend(v)
    reasons = Counter(f"{n['fail_phase']}: {n['reason']}" for n in failed)
    # Power-on to TBSETUP acknowledged: the node enters the files phase (or is up, without
    # one) right after the server answered its `state TBSETUP`.
    to_tbsetup = []
    for n in up:
        t = next((t for t, st in n.get("transitions", ()) if st in ("files", "up")), None)
        if t is not None and "os" in n["phase_time"]:
            to_tbsetup.append(t - n["t_on"])
    st = raw["settings"]
    return {
        "nodes": len(nodes), "profile": st["profile"], "phases": list(st["phases"]),
        "family": st.get("family", 4),
        "loss": st["loss"], "start_spread": st["start_spread"], "workers": raw.get("workers", 1),
        "reached_isup": len(up), "failed": len(failed),
        "failures": [{"node": n["node"], "phase": n["fail_phase"], "reason": n["reason"]}
                     for n in failed],
        "failure_reasons": dict(reasons.most_common()),
        "boot_time": _dist(boot),
        "to_tbsetup": _dist(to_tbsetup),
        "phase_time": phases,
        "retries": {p: retries.get(p, 0) for p in PHASES if retries.get(p, 0)} | {
            "total": sum(retries.values())},
        # Which exchange of a phase was retried ("loader/dhcp", "loader/bootinfo", ...).
        "retries_by_protocol": dict(by_protocol.most_common()),
        "requests": dict(sorted(requests.items())) | {"total": sum(requests.values())},
        "exchange_time": {k: _dist(v) for k, v in sorted(lat.items())},
        "requests_per_node": round(sum(requests.values()) / len(nodes), 2) if nodes else 0,
        "retry_percent": round(100 * sum(retries.values()) / max(1, sum(requests.values())), 2),
        "reboots": sum(n["reboots"] for n in nodes),
        "told_wait_then_swapped_in": raw.get("swapped_in", 0),
        "dropped_datagrams": raw.get("dropped", {}),
        "bytes": {"tftp": sum(n["bytes_tftp"] for n in nodes),
                  "http": sum(n["bytes_http"] for n in nodes)},
        "wall_time": raw["finished"] - raw["t0"],
        # The simulator's CPU over the storm; near `workers` x 100% it is what limits.
        "storm_cpu": {"seconds": round(raw.get("storm_cpu", 0.0), 2),
                      "percent_of_one_core": round(100 * raw.get("storm_cpu", 0.0) /
                                                   max(1e-9, raw["finished"] - raw["started"]),
                                                   1)},
        "files_created": raw.get("files_created", 0),
        # How late the simulator's loop woke for a 10 ms sleep: its timers were this late.
        "timer_lag": _dist(raw.get("timer_lag", [])),
    }


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def print_report(summary: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    s = summary
    ok = s["failed"] == 0
    what = "reached ISUP" if "files" in s["phases"] or "os" in s["phases"] else "completed"
    con.print(f"[bold]{s['reached_isup']}/{s['nodes']} nodes {what}[/], "
              f"[{'green' if ok else 'red'}]{s['failed']} failed[/] "
              f"({s['profile']} profile{', IPv6' if s.get('family') == 6 else ''}, "
              f"loss {s['loss']:.0%}, spread {s['start_spread']}s, "
              f"wall {s['wall_time']:.1f}s)")
    t = Table(title="boot times")
    for col in ("", "p50", "p95", "p99", "max", "retries"):
        t.add_column(col, justify="right" if col else "left")
    b = s["boot_time"]
    t.add_row("boot (power-on to ISUP)", _s(b["p50"]), _s(b["p95"]), _s(b["p99"]), _s(b["max"]),
              str(s["retries"]["total"]))
    tb = s["to_tbsetup"]
    if tb["count"]:
        t.add_row("power-on to TBSETUP", _s(tb["p50"]), _s(tb["p95"]), _s(tb["p99"]),
                  _s(tb["max"]), "")
    for p in PHASES:
        d = s["phase_time"][p]
        if d["count"]:
            t.add_row(f"  {p}", _s(d["p50"]), _s(d["p95"]), _s(d["p99"]), _s(d["max"]),
                      str(s["retries"].get(p, 0)))
    for k, d in s["exchange_time"].items():
        t.add_row(f"  one {k} exchange", _s(d["p50"]), _s(d["p95"]), _s(d["p99"]), _s(d["max"]), "")
    con.print(t)
    r = Table(title="requests sent")
    r.add_column("protocol")
    r.add_column("requests", justify="right")
    r.add_column("per node", justify="right")
    for k, v in s["requests"].items():
        r.add_row(k, str(v), f"{v / max(1, s['nodes']):.1f}")
    con.print(r)
    if s["retries_by_protocol"]:
        con.print("retries by phase/protocol: " + ", ".join(
            f"{k} {v}" for k, v in s["retries_by_protocol"].items()))
    extra = [f"reboots: {s['reboots']}",
             f"simulator CPU: {s['storm_cpu']['seconds']:.1f} s "
             f"({s['storm_cpu']['percent_of_one_core']:.0f}% of one core, "
             f"{s['workers']} worker{'s' if s['workers'] > 1 else ''})"]
    lag = s.get("timer_lag") or {}
    if lag.get("count"):
        extra.append(f"simulator timer lag: p99 {lag['p99'] * 1000:.0f} ms, max "
                     f"{lag['max'] * 1000:.0f} ms")
    if s["told_wait_then_swapped_in"]:
        extra.append(f"told WAIT then swapped in: {s['told_wait_then_swapped_in']}")
    d = s["dropped_datagrams"]
    if d.get("sent") or d.get("received"):
        extra.append(f"injected drops: {d['sent']} sent, {d['received']} received")
    con.print(", ".join(extra))
    if s["failures"]:
        f = Table(title="failures")
        f.add_column("count", justify="right")
        f.add_column("phase: reason")
        for reason, n in list(s["failure_reasons"].items())[:15]:
            f.add_row(str(n), reason)
        con.print(f)


def write_json(path: str | Path, summary: dict[str, Any], raw: dict[str, Any]) -> None:
    per_node = [{k: v for k, v in n.items() if k not in ("transitions", "latency")}
                for n in raw["nodes"]]
    Path(path).write_text(json.dumps({"summary": summary, "timeline": timeline(raw),
                                      "nodes": per_node}, indent=1, default=str))


def timeline(raw: dict[str, Any], step: float | None = None) -> dict[str, Any]:
    """How many nodes are in each phase over time (seconds after t0)."""
    t0 = raw["t0"]
    end = raw["finished"] - t0
    step = step or max(0.05, end / 400)
    names = ("off",) + PHASES + ("up", "failed")
    times = [i * step for i in range(int(end / step) + 2)]
    series = {n: [0] * len(times) for n in names}
    for node in raw["nodes"]:
        tr = [(t - t0, s) for t, s in node["transitions"]]
        k = 0
        cur = "off"
        for i, t in enumerate(times):
            while k < len(tr) and tr[k][0] <= t:
                cur = tr[k][1]
                k += 1
            series[cur][i] += 1
    return {"t": times, "step": step, "series": series}


def plot(path: str | Path, summary: dict[str, Any], raw: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = timeline(raw)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    labels = [n for n in tl["series"] if any(tl["series"][n])]
    a1.stackplot(tl["t"], *[tl["series"][n] for n in labels], labels=labels)
    a1.set_xlabel("seconds since power-on of the first node")
    a1.set_ylabel("nodes")
    a1.set_title(f"{summary['nodes']} nodes by phase ({summary['profile']}, "
                 f"loss {summary['loss']:.0%})")
    a1.legend(loc="center right", fontsize=8)
    boots = [n["boot_time"] for n in raw["nodes"] if n["boot_time"] is not None]
    if boots:
        a2.hist(boots, bins=min(60, max(10, len(boots) // 20)), color="tab:green")
        for q, style in (("p50", "--"), ("p99", ":")):
            v = summary["boot_time"][q]
            if v is not None:
                a2.axvline(v, color="k", linestyle=style, label=f"{q} {v:.2f}s")
        a2.legend()
    a2.set_xlabel("boot time, power-on to ISUP (s)")
    a2.set_ylabel("nodes")
    a2.set_title(f"{summary['reached_isup']} booted, {summary['failed']} failed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
