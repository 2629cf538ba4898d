"""Prometheus metrics shared by every service of one process.

Services keep plain integer counters on their hot paths (a dict increment or an
attribute increment is far cheaper than a prometheus_client call per packet);
the collector below reads them when /metrics is scraped.

Conventions (prometheus-client's): everything that only grows is a counter,
exported with `_total`; every service's events are one family,
`bootherd_events_total{protocol="dhcp", event="offer"}`, whichever way the
service keeps them (a Counter dict, a dataclass of ints, a writer's attribute);
gauges are `bootherd_<name>`; nodes per state are `bootherd_node_states{state}`
with state="NONE" for nodes that have none yet; the process and platform
collectors add `process_*` and `python_info`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import fields, is_dataclass
from functools import partial
from typing import Any

from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

NO_STATE = "NONE"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # protocol -> counter name -> value, e.g. counters["dhcp"]["malformed"]
        self.counters: dict[str, Counter] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        # (protocol, event) -> a function reading a count kept elsewhere
        self._counts: dict[tuple[str, str], Callable[[], float]] = {}
        self._live: Any = None
        self.registry.register(_Collector(self))
        # The host's UDP drops (every socket): a request dropped is a number, not a mystery.
        # Counts that only grow, so events (protocol "kernel"), like every service's drops.
        from .udprecv import kernel_udp_counters

        for name, key in (("udp_rcvbuf_errors", "RcvbufErrors"), ("udp_in_errors", "InErrors")):
            self.count("kernel", name, lambda k=key: kernel_udp_counters().get(k, 0))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def protocol(self, name: str) -> Counter:
        """The counter dict a protocol increments on its hot path."""
        return self.counters.setdefault(name, Counter())

    def gauge(self, name: str, fn: Callable[[], float]) -> None:
        """Register a gauge read at scrape time (queue depths, active transfers)."""
        self._gauges[name] = fn

    def count(self, protocol: str, event: str, fn: Callable[[], float]) -> None:
        """Register a count that only grows, kept elsewhere and read at scrape time;
        exported as bootherd_events_total{protocol, event} beside the Counter dicts."""
        self._counts[(protocol, event)] = fn

    def count_fields(self, protocol: str, obj: Any, gauges: Iterable[str] = ()) -> None:
        """Every int field of a dataclass of counters as an event of `protocol`; the
        fields named in `gauges` (values that go up and down) as bootherd_<protocol>_<name>."""
        assert is_dataclass(obj)
        gauges = set(gauges)
        for f in fields(obj):
            read = partial(getattr, obj, f.name)
            if f.name in gauges:
                self.gauge(f"{protocol}_{f.name}", read)
            else:
                self.count(protocol, f.name, read)

    def attach_inventory(self, live) -> None:  # noqa: ANN001
        stats = live.writer.stats
        self.gauge("inventory_write_queue", lambda: live.writer.q.qsize())
        self.gauge("inventory_snapshot_generation", lambda: live.snapshot.generation)
        self.gauge("inventory_nodes", lambda: len(live.snapshot.nodes))
        self.count("inventory", "write_batches", lambda: stats.batches)
        self.count("inventory", "write_errors", lambda: stats.errors)
        self.count("inventory", "reloads", lambda: live.reloads)
        self._live = live


class _Collector:
    def __init__(self, metrics: Metrics):
        self.m = metrics

    def collect(self) -> Iterable:
        c = CounterMetricFamily("bootherd_events", "Events of each service by kind",
                                labels=["protocol", "event"])
        rows: dict[tuple[str, str], float] = {}
        for proto, counts in self.m.counters.items():
            for event, value in counts.items():
                rows[(proto, event)] = value
        for key, fn in self.m._counts.items():
            try:
                rows[key] = rows.get(key, 0) + float(fn())
            except Exception:  # noqa: BLE001, S112 - a reading must never break a scrape
                continue
        for (proto, event), value in sorted(rows.items()):
            c.add_metric([proto, event], value)
        yield c
        for name, fn in sorted(self.m._gauges.items()):
            g = GaugeMetricFamily(f"bootherd_{name}", name.replace("_", " "))
            try:
                g.add_metric([], float(fn()))
            except Exception:  # noqa: BLE001, S112 - a gauge must never break a scrape
                continue
            yield g
        live = self.m._live
        if live is not None:
            g = GaugeMetricFamily("bootherd_node_states",
                                  f"Inventory nodes per state ({NO_STATE}: no state recorded)",
                                  labels=["state"])
            states = live.states
            counts = Counter(states[n][0] if n in states else NO_STATE
                             for n in live.snapshot.nodes)
            for state, n in sorted(counts.items()):
                g.add_metric([state], n)
            yield g
