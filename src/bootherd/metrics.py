"""Prometheus metrics shared by every service of one process.

Services keep plain integer counters on their hot paths (a dict increment is
far cheaper than a prometheus_client call per packet); the collector below
reads them when /metrics is scraped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # protocol -> counter name -> value, e.g. counters["dhcp"]["malformed"]
        self.counters: dict[str, Counter] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self.registry.register(_Collector(self))
        # The host's UDP drops (every socket): a request dropped is a number, not a mystery.
        from .udprecv import kernel_udp_counters

        for name, key in (("kernel_udp_rcvbuf_errors", "RcvbufErrors"),
                          ("kernel_udp_in_errors", "InErrors")):
            self.gauge(name, lambda k=key: kernel_udp_counters().get(k, 0))

    def protocol(self, name: str) -> Counter:
        """The counter dict a protocol increments on its hot path."""
        return self.counters.setdefault(name, Counter())

    def gauge(self, name: str, fn: Callable[[], float]) -> None:
        """Register a gauge read at scrape time (queue depths, active transfers)."""
        self._gauges[name] = fn

    def attach_inventory(self, live) -> None:  # noqa: ANN001
        stats = live.writer.stats
        self.gauge("inventory_write_queue", lambda: live.writer.q.qsize())
        self.gauge("inventory_snapshot_generation", lambda: live.snapshot.generation)
        self.gauge("inventory_nodes", lambda: len(live.snapshot.nodes))
        self.gauge("inventory_write_batches", lambda: stats.batches)
        self.gauge("inventory_write_errors", lambda: stats.errors)
        self._live = live


class _Collector:
    def __init__(self, metrics: Metrics):
        self.m = metrics

    def collect(self) -> Iterable:
        c = CounterMetricFamily("bootherd_events", "Protocol events by kind",
                                labels=["protocol", "event"])
        for proto, counts in sorted(self.m.counters.items()):
            for event, value in sorted(counts.items()):
                c.add_metric([proto, event], value)
        yield c
        for name, fn in sorted(self.m._gauges.items()):
            g = GaugeMetricFamily(f"bootherd_{name}", name.replace("_", " "))
            try:
                g.add_metric([], float(fn()))
            except Exception:  # noqa: BLE001 - a gauge must never break a scrape
                continue
            yield g
        live = getattr(self.m, "_live", None)
        if live is not None:
            g = GaugeMetricFamily("bootherd_node_states", "Nodes per state", labels=["state"])
            for state, n in sorted(Counter(st for st, _ in live.states.values()).items()):
                g.add_metric([state], n)
            yield g
