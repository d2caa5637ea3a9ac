"""Prometheus metrics of one storage system (``/metrics``), with the official ``prometheus_client``.

Gauges are read from the live state at scrape time by :class:`StateCollector` (no background polling):
pairs by status, copy progress, bitmap dirty bytes, journal usage and qCount, UR lag, remote paths and the
kernel's byte counters of the link's TCP connections. Counters that must see every event are kept where the
events happen and read at scrape time too: NBD operations and their latency
(:class:`vspemu.volumes.nbd_common.NbdStats`, plain integers on the hot path), REST requests (a middleware) and
job durations (a :class:`Jobs` observer).
See docs/observability.md.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from vspemu.replication.bitmap import TRACK
from vspemu.replication.model import COPY, PAIR, PFUL, PFUS, PSUE, PSUS, SMPL, SSUS, SSWS
from vspemu.system.faults import KINDS as FAULT_KINDS
from vspemu.volumes import nbd_common as nbd_module

if TYPE_CHECKING:
    from vspemu.context import StorageContext
    from vspemu.jobs import Job

log = logging.getLogger(__name__)

PAIR_STATUSES = (SMPL, COPY, PAIR, PSUS, SSUS, PSUE, PFUL, PFUS, SSWS)
REPLICATION_TYPES = ("TC", "UR")
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
REST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)

# struct tcp_info (linux/tcp.h): tcpi_total_retrans at 100, tcpi_bytes_acked at 120, tcpi_bytes_received at 128
_TCP_INFO_LEN = 136
_TCP_INFO = struct.Struct("=100xI16xQQ")


def tcp_counters(sock: socket.socket | None) -> tuple[int, int, int] | None:
    """(bytes sent and acknowledged, bytes received, segments retransmitted) of a TCP socket, from the kernel."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(raw) < _TCP_INFO_LEN:
        return None
    retrans, acked, received = _TCP_INFO.unpack_from(raw)
    return acked, received, retrans


class _LinkBytes:
    """Per-path byte totals that survive reconnects: a closed connection's last figures are kept in a base.

    Connections are only looked at when scraped, so what a connection moved after the last scrape before it
    closed is not counted (documented in docs/observability.md)."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, ...], tuple[int, tuple[int, int, int]]] = {}  # key -> (conn id, figures)
        self._base: dict[tuple[str, ...], list[int]] = {}

    def update(self, key: tuple[str, ...], conn: Any) -> tuple[int, int, int]:
        base = self._base.setdefault(key, [0, 0, 0])
        last = self._last.get(key)
        figures = None
        if conn is not None:
            transport = getattr(conn, "transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            figures = tcp_counters(sock)
        if last is not None and (conn is None or id(conn) != last[0] or figures is None):
            for i in range(3):  # the connection we saw last is gone: keep what it did
                base[i] += last[1][i]
            del self._last[key]
        if conn is not None and figures is not None:
            self._last[key] = (id(conn), figures)
            return base[0] + figures[0], base[1] + figures[1], base[2] + figures[2]
        return base[0], base[1], base[2]

    def keys(self) -> Iterable[tuple[str, ...]]:
        return list(self._base)


class StateCollector(Collector):
    """Reads one system's live state when scraped."""

    def __init__(self, ctx: StorageContext) -> None:
        self.ctx = ctx
        self._link_bytes = _LinkBytes()

    def collect(self) -> Iterator[Metric]:
        yield from self._pairs()
        yield from self._journals()
        yield from self._link()
        yield from self._nbd()
        yield from self._faults()

    # -- pairs ----------------------------------------------------------------------------------------------
    def _pairs(self) -> Iterator[Metric]:
        rep = self.ctx.replication
        by_status = GaugeMetricFamily("vspemu_pairs", "Pairs by this system's status of its own volume",
                                      labels=["status", "replication_type", "role"])
        info = GaugeMetricFamily("vspemu_pair_info", "One series per pair: its status here and the last known "
                                 "status of the other side", labels=["copy_group", "pair", "replication_type",
                                                                     "role", "status", "peer_status"])
        progress = GaugeMetricFamily("vspemu_pair_copy_progress_percent",
                                     "While COPY: tracks copied of those to copy; otherwise the share of "
                                     "tracks not marked in the differential bitmap", labels=["copy_group", "pair"])
        dirty = GaugeMetricFamily("vspemu_pair_dirty_bytes", "Bytes marked in the pair's differential bitmap "
                                  "(tracks to copy at the next resync or copy)", labels=["copy_group", "pair"])
        counts: dict[tuple[str, str, str], int] = {(s, t, r): 0 for s in PAIR_STATUSES
                                                    for t in REPLICATION_TYPES for r in ("P", "S")}
        if rep is not None:
            for pair in list(rep.pairs.values()):
                group = rep.groups.get(pair.group)
                rtype = group.replication_type if group is not None else "TC"
                key = (pair.status, rtype, pair.role)
                counts[key] = counts.get(key, 0) + 1
                info.add_metric([pair.group, pair.name, rtype, pair.role, pair.status, pair.peer_status], 1)
                percent, marked = pair_progress(rep, pair)
                progress.add_metric([pair.group, pair.name], percent)
                dirty.add_metric([pair.group, pair.name], marked)
        for (status, rtype, role), n in sorted(counts.items()):
            by_status.add_metric([status, rtype, role], n)
        yield from (by_status, info, progress, dirty)

    # -- journals -------------------------------------------------------------------------------------------
    def _journals(self) -> Iterator[Metric]:
        used = GaugeMetricFamily("vspemu_journal_used_bytes", "Bytes held in a master journal",
                                 labels=["journal"])
        cap = GaugeMetricFamily("vspemu_journal_capacity_bytes", "Capacity of a journal's volumes",
                                labels=["journal"])
        pct = GaugeMetricFamily("vspemu_journal_usage_percent", "Journal usage rate (as usageRate)",
                                labels=["journal"])
        qcount = GaugeMetricFamily("vspemu_mirror_q_count", "Journal entries a mirror's secondary has still to "
                                   "restore (qCount)", labels=["journal", "mu", "copy_group"])
        lag = GaugeMetricFamily("vspemu_mirror_lag_seconds", "Age of the oldest entry not yet restored on the "
                                "secondary (0 when caught up); primary side", labels=["journal", "mu", "copy_group"])
        rep = self.ctx.replication
        for journal in self.ctx.journals.list():
            jid = str(journal.journal_id)
            capacity = self.ctx.journals.capacity_blocks(journal) * 512
            mj = rep.ur.masters.get(journal.journal_id) if rep is not None else None
            if mj is not None:
                used.add_metric([jid], mj.used)
                cap.add_metric([jid], mj.capacity)
                pct.add_metric([jid], mj.usage_rate())
            else:
                used.add_metric([jid], 0)
                cap.add_metric([jid], capacity)
                pct.add_metric([jid], journal.usage_rate)
        if rep is not None:
            for group in list(rep.groups.values()):
                if group.replication_type != "UR" or group.local_journal_id is None:
                    continue
                labels = [str(group.local_journal_id), str(group.mu_number), group.name]
                figures = mirror_lag(rep, group)
                if figures:
                    qcount.add_metric(labels, figures.get("qCount", 0))
                    lag.add_metric(labels, figures.get("lagSeconds", 0.0))
                else:  # the restoring side: what it knows it has still to apply
                    rt = rep.ur.mirrors.get(group.name)
                    qcount.add_metric(labels, max(0, rt.remote_last_seq - rt.restored) if rt is not None else 0)
        yield from (used, cap, pct, qcount, lag)

    # -- link -----------------------------------------------------------------------------------------------
    def _link(self) -> Iterator[Metric]:
        labels = ["remote", "direction", "local_port", "remote_port"]
        up = GaugeMetricFamily("vspemu_remote_path_up", "1 if the remote path's connection is up (outbound: "
                               "this system's path groups)", labels=[*labels, "path_group", "status"])
        sent = CounterMetricFamily("vspemu_link_sent_bytes", "Bytes sent on a remote path's TCP connections "
                                   "and acknowledged (kernel tcpi_bytes_acked)", labels=labels)
        received = CounterMetricFamily("vspemu_link_received_bytes", "Bytes received on a remote path's TCP "
                                       "connections (kernel tcpi_bytes_received)", labels=labels)
        retrans = CounterMetricFamily("vspemu_link_retransmitted_segments", "TCP segments retransmitted on a "
                                      "remote path's connections", labels=labels)
        path_labels = ["remote", "local_port", "remote_port", "path_group"]
        errors = CounterMetricFamily("vspemu_remote_path_errors", "Failures of an outbound remote path: "
                                     "connect_failed (refused by the OS, unreachable, timed out, protocol error), "
                                     "refused (handshake refused, port offline, path held down by a fault), "
                                     "disconnected (an established connection went down)",
                                     labels=[*path_labels, "kind"])
        connects = CounterMetricFamily("vspemu_remote_path_connects", "Connections an outbound remote path "
                                       "established (the first one and every reconnect)", labels=path_labels)
        link = self.ctx.link
        seen: dict[tuple[str, ...], tuple[int, int, int]] = {}
        key: tuple[str, ...]
        if link is not None:
            for group in list(link.groups.values()):
                for path in list(group.paths.values()):
                    key = (group.remote_device_id, "outbound", path.local_port_id, path.remote_port_id)
                    up.add_metric([*key, str(group.path_group_id), path.status], 1 if path.is_up else 0)
                    ids = [group.remote_device_id, path.local_port_id, path.remote_port_id, str(group.path_group_id)]
                    errors.add_metric([*ids, "connect_failed"], path.connect_failures)
                    errors.add_metric([*ids, "refused"], path.refusals)
                    errors.add_metric([*ids, "disconnected"], path.disconnects)
                    connects.add_metric(ids, path.connects)
                    seen[key] = self._link_bytes.update(key, path.conn if path.is_up else None)
            for conns in list(getattr(link, "_inbound", {}).values()):
                for conn in list(conns):
                    peer = conn.peer
                    key = (peer.storage_device_id, "inbound", peer.local_port_id, peer.remote_port_id)
                    seen[key] = self._link_bytes.update(key, conn if conn.is_open else None)
        for key in self._link_bytes.keys():
            if key not in seen:
                seen[key] = self._link_bytes.update(key, None)
        for key, (s, r, t) in sorted(seen.items()):
            sent.add_metric(list(key), s)
            received.add_metric(list(key), r)
            retrans.add_metric(list(key), t)
        yield from (up, sent, received, retrans, errors, connects)

    # -- NBD ------------------------------------------------------------------------------------------------
    def _nbd(self) -> Iterator[Metric]:
        stats = nbd_module.STATS
        ops = CounterMetricFamily("vspemu_nbd_requests", "NBD requests served, by operation", labels=["op"])
        nbytes = CounterMetricFamily("vspemu_nbd_bytes", "Bytes read or written over NBD", labels=["op"])
        errors = CounterMetricFamily("vspemu_nbd_errors", "NBD requests answered with an error")
        latency = HistogramMetricFamily("vspemu_nbd_request_seconds", "Server-side NBD request latency "
                                        "(request parsed to reply queued)", labels=["op"])
        bounds = [*(f"{b:g}" for b in nbd_module.LATENCY_BOUNDS), "+Inf"]
        for i, op in enumerate(nbd_module.OP_NAMES):
            ops.add_metric([op], sum(stats.buckets[i]))
            nbytes.add_metric([op], stats.nbytes[i])
            cumulative, buckets = 0, []
            for bound, n in zip(bounds, stats.buckets[i], strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            latency.add_metric([op], buckets, stats.seconds[i])
        errors.add_metric([], stats.errors)
        yield from (ops, nbytes, errors, latency)


    # -- faults on demand -----------------------------------------------------------------------------------
    def _faults(self) -> Iterator[Metric]:
        active = GaugeMetricFamily("vspemu_faults_active", "Faults on demand in force on this system, by kind",
                                   labels=["kind"])
        counts = dict.fromkeys(FAULT_KINDS, 0)
        for doc in active_faults(self.ctx):
            counts[doc["kind"]] = counts.get(doc["kind"], 0) + 1
        for kind, n in counts.items():
            active.add_metric([kind], n)
        yield active


def active_faults(ctx: StorageContext) -> list[dict[str, Any]]:
    """The faults in force (the registry's documents; [] on a system without the registry)."""
    faults = getattr(ctx, "faults", None)
    return faults.list() if faults is not None else []


def fault_target(doc: dict[str, Any]) -> str:
    """What a fault acts on, in words (the status page's "target" column)."""
    kind = doc.get("kind")
    if kind == "path":
        return f"path {doc.get('localPortId')} -> serial {doc.get('remoteSerialNumber')} {doc.get('remotePortId')}"
    if kind in ("path-group", "path-delay"):
        target = f"path group {doc.get('pathGroupId')} to serial {doc.get('remoteSerialNumber')}"
        if kind == "path-delay":
            bw = doc.get("bandwidthMiBps")
            target += f" ({doc.get('latencyMs')} ms, {f'{bw:g} MiB/s limit' if bw else 'no bandwidth limit'})"
        return target
    if kind == "journal-full":
        return f"journal {doc.get('journalId')}"
    if kind == "ldev-eio":
        return f"LDEV {doc.get('ldevId')}"
    return "system"


def mirror_lag(rep: Any, group: Any) -> dict[str, Any]:
    """A UR mirror's lag figures on its primary ({} elsewhere, or if its journal cannot be read now)."""
    if group.replication_type != "UR" or group.role != "P":
        return {}
    try:
        return dict(rep.ur.lag(group))
    except Exception:  # noqa: BLE001 - a scrape must not fail because one mirror's journal is unreadable
        log.warning("metrics: no lag figures for copy group %s", group.name, exc_info=True)
        return {}


def pair_progress(rep: Any, pair: Any) -> tuple[int, int]:
    """(copy progress percent, dirty bytes) of a pair, as the metrics and the status page show them."""
    bm = rep.bitmaps.get(pair.key)
    marked = bm.count() * TRACK if bm is not None else 0
    if pair.status == COPY:
        percent = pair.copy_done * 100 // pair.copy_total if pair.copy_total > 0 else 0
        return min(percent, 99), marked
    total = bm.ntracks * TRACK if bm is not None else 0
    percent = 100 if total <= 0 else max(0, min(100, (total - marked) * 100 // total))
    return percent, marked


class Metrics:
    """The registry of one system's app: the state collector plus REST and job instruments."""

    def __init__(self, ctx: StorageContext) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StateCollector(ctx))
        self.rest_requests = Counter("vspemu_rest_requests", "REST requests answered",
                                     ["method", "route", "status"], registry=self.registry)
        self.rest_seconds = Histogram("vspemu_rest_request_seconds", "REST request handling time",
                                      ["method", "route"], buckets=REST_BUCKETS, registry=self.registry)
        self.job_seconds = Histogram("vspemu_job_seconds", "Job durations (created to completed)",
                                     ["method", "state"], buckets=JOB_BUCKETS, registry=self.registry)
        ctx.jobs.observers.append(self.job_done)

    def job_done(self, job: Job) -> None:
        done = job.completed if job.completed is not None else time.time()
        self.job_seconds.labels(job.request_method, job.state).observe(max(0.0, done - job.created))
